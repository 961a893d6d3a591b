"""The real backend: feeds a whole transaction to ``nft -f -`` (one atomic batch)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import subprocess
import tempfile

from . import netlink
from .errors import NftError
from .objects import Chain, Elements, Flowtable, Listing, Rule, Set, Table
from .transaction import Transaction

log = logging.getLogger("kproxy.nft")
_SET_FLAGS = ("constant", "interval", "timeout", "dynamic")
_FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")  # nft's, not only those kproxy uses
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,254}")  # a table name as nft's command syntax has it

_SET_REF = re.compile(r"@([A-Za-z_][\w.\-]*)")
_LOCATION = re.compile(r"^(?:/dev/stdin|-):(\d+):[\d\-]+: Error: (.*)$")


class NftCLI:
    """Applies transactions with the ``nft`` program in the current network namespace."""

    programs_kernel = True  # plugins that act on the kernel themselves (conntrack) check this

    def __init__(self, nft: str = "nft", netlink: bool = True):
        self.nft = nft
        self.use_netlink = netlink  # build new tables ahead, their set elements through netlink

    def available(self) -> bool:
        return shutil.which(self.nft) is not None

    def _run(self, args, input_text=None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.nft, *args], input=input_text, capture_output=True, text=True)
        except FileNotFoundError:
            raise NftError(f"the nft program ({self.nft}) is not installed") from None

    def apply(self, txn: Transaction | str) -> None:
        """Apply a transaction whole, or raise ``NftError`` (then nothing was applied).

        A ``Transaction`` is written to nft one operation at a time, as it is rendered:
        the script of a large sync is never held in memory whole. A table it creates
        (``Transaction.new_tables``) is built ahead, see ``_build_ahead``."""
        if isinstance(txn, str):
            if not txn:
                return
            proc = self._run(["-f", "-"], txn)
            if proc.returncode != 0:
                raise parse_error(proc.stderr, txn)
            return
        if not txn.ops:
            return
        rest = self._build_ahead(txn) if self.use_netlink and txn.new_tables else None
        if rest is None:
            self._feed(txn)
            return
        try:
            self._feed(rest)
        except NftError:
            self._remove(txn.new_tables)
            raise

    def _feed(self, txn: Transaction, meanwhile=None):
        """Run nft on ``txn``; ``meanwhile()`` is called while nft works on it, and its
        result returned."""
        # nft's messages go to a file, not a pipe: nft could otherwise block writing
        # them while this process blocks writing the script
        with tempfile.TemporaryFile("w+") as err:
            try:
                proc = subprocess.Popen([self.nft, "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=err, text=True)
            except FileNotFoundError:
                raise NftError(f"the nft program ({self.nft}) is not installed") from None
            try:
                with proc.stdin as out:
                    for op in txn.ops:
                        out.write(op.render())
                        out.write("\n")
            except BrokenPipeError:
                pass  # nft stopped reading: its exit status and message say why
            result = meanwhile() if meanwhile else None
            if proc.wait() != 0:
                err.seek(0)
                raise parse_error(err.read(), txn.render())
            return result

    def _build_ahead(self, txn: Transaction) -> Transaction | None:
        """Build the new tables of ``txn`` without the rules of their base chains, then
        load their set elements that ``nft.netlink`` can encode in one netlink batch
        (nft's parsing of elements is most of a large first sync); returns what is left
        to apply (the rules of the base chains, and everything outside the new tables),
        or None when nothing was built (then the kernel is unchanged).

        A table whose base chains have no rules changes no packet, so the kernel
        switches to the new rules as the last step commits, all at once, as it would
        with one transaction."""
        new = txn.new_tables
        base = {(o.family, o.table, o.name) for o in (op.obj for op in txn.ops)
                if isinstance(o, Chain) and o.is_base and o.table_key in new}
        encoders, loads = {}, {}
        build, rest = Transaction(), Transaction()
        for op in txn.ops:
            o = op.obj
            if op.verb != "add" or o.table_key not in new or (
                    isinstance(o, Rule) and (o.family, o.table, o.chain) in base):
                rest.ops.append(op)
                continue
            if isinstance(o, Chain) and o.policy == "drop":
                # made here empty and accepting, which no packet notices (and the chains
                # keep their order); the drop policy comes with the rules
                build.add(dataclasses.replace(o, policy=None))
                rest.ops.append(op)
                continue
            if isinstance(o, Elements):
                load = loads.get((o.family, o.table, o.set))
                if load is not None:
                    load.append(o)
                    continue
            elif isinstance(o, Set):
                enc = netlink.encoder(o)
                if enc is not None:
                    encoders[(o.family, o.table, o.name)] = enc
                    loads[(o.family, o.table, o.name)] = []
            build.ops.append(op)
        if not any(loads.values()):
            return None  # nothing for netlink: one nft run is cheaper than two
        typeof = {enc.set.name for enc in encoders.values() if enc.set.typeof}
        if typeof and any(isinstance(op.obj, Rule) and typeof & set(_SET_REF.findall(op.obj.text)) for op in rest.ops):
            # nft 1.0.6 cannot always add a rule that uses a typeof map already in the
            # kernel ("conflicting protocols specified" for a value with "th dport")
            return None

        def encode():
            try:
                return netlink.batch([(encoders[k], loads[k]) for k in encoders])
            except ValueError as e:
                return e
        try:
            batch = self._feed(build, meanwhile=encode)  # encoding while nft builds
        except NftError:
            return None  # nothing was built; the whole transaction says what is wrong
        try:
            if isinstance(batch, ValueError):
                raise batch
            netlink.send(*batch)
        except (NftError, ValueError) as e:
            log.warning("loading set elements through netlink failed, nft loads them instead: %s", e)
            self._remove(new)
            return None
        return rest

    def _remove(self, tables) -> None:
        """Delete tables built ahead of a transaction that then failed."""
        undo = Transaction()
        for fam, name in sorted(tables):
            undo.delete(Table(fam, name))
        try:
            self._feed(undo)
        except NftError as e:
            log.warning("could not remove tables built for a failed transaction: %s", e)

    def check(self, txn: Transaction | str) -> None:
        """Let nft validate a transaction without applying it (``nft -c``)."""
        text = txn if isinstance(txn, str) else txn.render()
        proc = self._run(["-c", "-f", "-"], text)
        if proc.returncode != 0:
            raise parse_error(proc.stderr, text)

    def list_tables(self) -> list[tuple[str, str]]:
        """(family, name) of every table in this network namespace.

        Not ``nft list tables``: nft 1.0.6 fetches every rule and set element for it, even
        with -t (1.5 s at 10,000 Services × 10 endpoints); ``-t list ruleset`` leaves the
        elements out (a few ms there)."""
        proc = self._run(["-j", "-t", "list", "ruleset"])
        if proc.returncode != 0:
            raise NftError(f"nft list tables failed: {proc.stderr.strip()}")
        items = json.loads(proc.stdout or '{"nftables": []}')["nftables"]
        return [(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i]

    def list_objects(self, family: str, table: str) -> Listing:
        """Chains, sets, maps and flowtables of one table, without rules or elements.

        Not ``nft -t list table``: nft 1.0.6 fetches every set element for it even when
        terse (1.7 s and 226 MB at 10,000 Services × 10 endpoints); the family-wide
        ``list chains/maps/flowtables`` and terse ``list sets`` used here do not."""
        if family not in _FAMILIES or not _NAME.fullmatch(table):  # both go into the command file
            raise NftError(f"nft list table {family} {table} failed: not a family and table name nft reads")
        # "list sets table F T" fails for a missing table; nft 1.0.6 lists the sets of the
        # whole family with it all the same (and list chains/maps/flowtables take no table)
        commands = [f"list chains {family}", f"list sets table {family} {table}", f"list maps {family}",
                    f"list flowtables {family}"]
        # one nft run, one JSON document per command; a command file, not stdin: with -j,
        # nft 1.0.6 prints nothing for commands read from stdin
        with tempfile.NamedTemporaryFile("w", prefix="kproxy-list-", suffix=".nft") as f:
            f.write("".join(c + "\n" for c in commands))
            f.flush()
            proc = self._run(["-j", "-t", "-f", f.name])
        if proc.returncode != 0:
            why = proc.stderr.strip() or f"exit status {proc.returncode}"
            raise NftError(f"nft list table {family} {table} failed: {why}")
        try:
            docs = _json_documents(proc.stdout)
        except ValueError as e:
            raise NftError(f"nft list table {family} {table} failed: unreadable output ({e})") from None
        if len(docs) != len(commands):
            raise NftError(f"nft list table {family} {table} failed: {len(docs)} answers to {len(commands)} commands")
        items = [i for doc in docs for i in doc.get("nftables", ())]
        out = Listing()
        sets = []  # sets and maps in the order the kernel made them, as in ``list table``
        for item in items:
            kind = next(iter(item))
            obj = item[kind]
            if obj.get("table") != table or obj.get("family") != family:
                continue
            if kind == "chain":
                out.chains[obj["name"]] = Chain(family, table, obj["name"], obj.get("type"), obj.get("hook"),
                                                obj.get("prio"))
            elif kind in ("set", "map"):
                flags = tuple(f for f in obj.get("flags", ()) if f in _SET_FLAGS)
                sets.append((obj.get("handle", 0), Set(family, table, obj["name"], str(obj.get("type")),
                                                       str(obj["map"]) if "map" in obj else None, flags=flags)))
            elif kind == "flowtable":
                devs = obj.get("dev", ())
                out.flowtables[obj["name"]] = Flowtable(family, table, obj["name"],
                                                        devices=tuple([devs] if isinstance(devs, str) else devs))
        for _, s in sorted(sets, key=lambda hs: hs[0]):
            out.sets[s.name] = s
        return out

    def list_elements(self, s: Set) -> dict[str, str | None]:
        """The elements of set or map ``s`` as the kernel has them now (filled by the
        packet path too, for dynamic sets): key text -> value text (None in a set).
        Concatenations are joined with " . "; timeouts and expiry are left out."""
        proc = self._run(["-j", "list", s.kind, s.family, s.table, s.name])
        if proc.returncode != 0:
            raise NftError(f"nft list {s.ref()} failed: {proc.stderr.strip()}")
        out: dict[str, str | None] = {}
        for item in json.loads(proc.stdout)["nftables"]:
            s = item.get("set") or item.get("map")
            if s is None:
                continue
            for e in s.get("elem", ()):
                if isinstance(e, list):  # a map element: [key, value]
                    out[_element_text(e[0])] = _element_text(e[1])
                else:
                    out[_element_text(e)] = None
        return out

    def list_ruleset(self, family: str | None = None, table: str | None = None) -> str:
        args = ["list", "table", family, table] if table else ["list", "ruleset"]
        proc = self._run(args)
        if proc.returncode != 0:
            raise NftError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout


def _json_documents(text: str) -> list:
    """The JSON documents nft printed one after the other (one per command of a file)."""
    decoder = json.JSONDecoder()
    docs, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return docs
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)


def _element_text(item) -> str:
    """nft's JSON for one key or value, as element text."""
    if isinstance(item, dict):
        if "elem" in item:
            return _element_text(item["elem"]["val"])
        if "concat" in item:
            return " . ".join(_element_text(i) for i in item["concat"])
        if "prefix" in item:
            return f"{item['prefix']['addr']}/{item['prefix']['len']}"
        if "range" in item:
            return "-".join(_element_text(i) for i in item["range"])
        for verdict in ("goto", "jump"):
            if verdict in item:
                return f"{verdict} {item[verdict]['target']}"
        if len(item) == 1:  # accept, drop, ...
            return next(iter(item))
    return str(item)


def parse_error(stderr: str, text: str) -> NftError:
    """Turn nft's stderr into an NftError naming the first offending line."""
    lines = text.splitlines()
    for err_line in stderr.splitlines():
        m = _LOCATION.match(err_line)
        if m:
            n = int(m.group(1))
            return NftError(m.group(2), n, lines[n - 1] if 0 < n <= len(lines) else None)
    return NftError(stderr.strip() or "nft failed without a message")
