"""An in-memory nftables backend for unit tests.

It keeps the state a kernel would keep and rejects what the kernel would reject: objects
in a missing table or chain, references to missing chains, sets, flowtables or counters,
``create`` of something that exists, deleting what does not exist or what is still
referenced, a map element whose key exists with another value. Like the kernel it applies a transaction
whole or not at all, and a reader in another thread never sees half of one.
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass, field

from .errors import NftError
from .objects import Chain, Counter, Element, Elements, Flowtable, Listing, Rule, Set, Table
from .transaction import Op, Transaction

_CHAIN_REF = re.compile(r"\b(?:jump|goto)\s+([A-Za-z_][\w.\-]*)")
_SET_REF = re.compile(r"@([A-Za-z_][\w.\-]*)")
_FLOWTABLE_REF = re.compile(r"\bflow\s+(?:add|offload)\s+@([A-Za-z_][\w.\-]*)")
_COUNTER_REF = re.compile(r"\bcounter\s+name\s+\"([A-Za-z_][\w.\-]*)\"")  # counter name "c" (quoted)


@dataclass
class _Table:
    table: Table
    chains: dict[str, Chain] = field(default_factory=dict)
    rules: dict[str, list[tuple[int, Rule]]] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    elements: dict[str, dict[str, tuple[str | None, str | None]]] = field(default_factory=dict)
    flowtables: dict[str, Flowtable] = field(default_factory=dict)
    counters: dict[str, list] = field(default_factory=dict)  # name -> [Counter, packets, bytes]


class FakeNft:
    """Drop-in replacement for ``NftCLI`` that keeps the ruleset in memory."""

    def __init__(self):
        self.tables: dict[tuple[str, str], _Table] = {}
        self._handle = 0
        self.transactions: list[Transaction] = []
        self._lock = threading.RLock()  # a transaction is applied in place: readers wait for it

    def available(self) -> bool:
        return True

    # -- backend interface -------------------------------------------------------------
    def apply(self, txn: Transaction) -> None:
        with self._lock:
            self._apply(txn)

    def _apply(self, txn: Transaction) -> None:
        for fam, name in txn.new_tables:  # a backend may build these early: they must be new
            if (fam, name) in self.tables:
                raise NftError(f"the transaction says table {fam} {name} is new, but it exists")
        state = copy.deepcopy(self.tables)
        handle = self._handle
        for lineno, op in enumerate(txn.ops, 1):
            try:
                self._apply_op(op)
            except NftError as e:
                self.tables, self._handle = state, handle
                raise NftError(e.message, lineno, op.render()) from None
        self.transactions.append(txn)

    def check(self, txn: Transaction) -> None:
        with self._lock:
            state, handle, applied = copy.deepcopy(self.tables), self._handle, list(self.transactions)
            try:
                self._apply(txn)
            finally:
                self.tables, self._handle, self.transactions = state, handle, applied

    def list_tables(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.tables)

    def list_objects(self, family: str, table: str) -> Listing:
        with self._lock:
            t = self.tables.get((family, table))
            if t is None:
                raise NftError(f"No such file or directory: table {family} {table}")
            return Listing(dict(t.chains), dict(t.sets), dict(t.flowtables))

    def list_elements(self, s: Set) -> dict[str, str | None]:
        """Like ``NftCLI.list_elements``."""
        with self._lock:
            t = self.tables.get((s.family, s.table))
            if t is None or s.name not in t.elements:
                raise NftError(f"No such file or directory: {s.ref()}")
            return self.elements(s.family, s.table, s.name)

    # -- inspection for tests ---------------------------------------------------------
    def rules(self, family: str, table: str, chain: str) -> list[str]:
        with self._lock:
            return [r.body() for _, r in self.tables[(family, table)].rules[chain]]

    def elements(self, family: str, table: str, set_name: str) -> dict[str, str | None]:
        with self._lock:
            return {k: v for k, (v, _) in self.tables[(family, table)].elements[set_name].items()}

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int, str | None]]:
        """name -> (packets, bytes, comment) of the table's named counters."""
        with self._lock:
            return {n: (c[1], c[2], c[0].comment) for n, c in self.tables[(family, table)].counters.items()}

    def count(self, family: str, table: str, name: str, packets: int, nbytes: int) -> None:
        """Pretend traffic hit a named counter."""
        c = self.tables[(family, table)].counters[name]
        c[1] += packets
        c[2] += nbytes

    def dump(self) -> str:
        """The whole ruleset as normalised text: tables, chains, sets sorted by name,
        elements sorted; rule order kept (it matters)."""
        with self._lock:
            return self._dump()

    def _dump(self) -> str:
        out = []
        for key in sorted(self.tables):
            t = self.tables[key]
            out.append(t.table.spec())
            for name in sorted(t.chains):
                out.append("  " + t.chains[name].spec())
                out.extend("    " + r.body() for _, r in t.rules[name])
            for name in sorted(t.sets):
                out.append("  " + t.sets[name].spec())
                for k in sorted(t.elements[name]):
                    val = t.elements[name][k][0]
                    out.append(f"    {k}" + (f" : {val}" if val is not None else ""))
            for name in sorted(t.flowtables):
                out.append("  " + t.flowtables[name].spec())
            for name in sorted(t.counters):
                out.append("  " + t.counters[name][0].spec())
        return "\n".join(out) + ("\n" if out else "")

    # -- operations ---------------------------------------------------------------------
    def _table(self, obj, *, what="table") -> _Table:
        t = self.tables.get(obj.table_key)
        if t is None:
            raise NftError(f"No such file or directory: {what} {obj.table_key[0]} {obj.table_key[1]} does not exist")
        return t

    def _apply_op(self, op: Op) -> None:
        o, verb = op.obj, op.verb
        handler = getattr(self, f"_{verb}_{type(o).__name__.lower()}", None)
        if handler is None:
            raise NftError(f"Operation not supported: {verb} {type(o).__name__.lower()}")
        handler(o, op)

    # tables
    def _add_table(self, o: Table, op):
        if o.table_key not in self.tables:
            self.tables[o.table_key] = _Table(o)

    def _create_table(self, o: Table, op):
        if o.table_key in self.tables:
            raise NftError(f"File exists: table {o.family} {o.name}")
        self._add_table(o, op)

    def _flush_table(self, o: Table, op):
        t = self._table(o)
        for name in t.rules:  # like nft: rules only, sets keep their elements
            t.rules[name] = []

    def _delete_table(self, o: Table, op):
        self._table(o)
        del self.tables[o.table_key]

    # chains
    def _add_chain(self, o: Chain, op):
        t = self._table(o)
        old = t.chains.get(o.name)
        if old is not None:
            if (old.type, old.hook, old.priority) != (o.type, o.hook, o.priority):
                raise NftError(f"File exists: chain {o.name} exists with another type, hook or priority")
            return
        t.chains[o.name] = o
        t.rules[o.name] = []

    def _create_chain(self, o: Chain, op):
        if o.name in self._table(o).chains:
            raise NftError(f"File exists: chain {o.name}")
        self._add_chain(o, op)

    def _existing_chain(self, o) -> _Table:
        t = self._table(o)
        name = o.name if isinstance(o, Chain) else o.chain
        if name not in t.chains:
            raise NftError(f"No such file or directory: chain {name} does not exist")
        return t

    def _flush_chain(self, o: Chain, op):
        self._existing_chain(o).rules[o.name] = []

    def _delete_chain(self, o: Chain, op):
        t = self._existing_chain(o)
        for chain, rules in t.rules.items():
            if chain != o.name and any(o.name in _CHAIN_REF.findall(r.text) for _, r in rules):
                raise NftError(f"Device or resource busy: chain {o.name} is referenced by a rule in {chain}")
        for set_name, elems in t.elements.items():
            if any(val and _CHAIN_REF.findall(val) == [o.name] for val, _ in elems.values()):
                raise NftError(f"Device or resource busy: chain {o.name} is referenced by an element of {set_name}")
        del t.chains[o.name]
        del t.rules[o.name]

    # rules
    def _check_rule_refs(self, t: _Table, o: Rule):
        for name in _CHAIN_REF.findall(o.text):
            if name not in t.chains:
                raise NftError(f"No such file or directory: rule jumps to missing chain {name}")
        flowtables = set(_FLOWTABLE_REF.findall(o.text))
        for name in _SET_REF.findall(o.text):
            if name in flowtables:
                if name not in t.flowtables:
                    raise NftError(f"No such file or directory: flowtable {name} does not exist")
            elif name not in t.sets:
                raise NftError(f"No such file or directory: set {name} does not exist")
        for name in _COUNTER_REF.findall(o.text):
            if name not in t.counters:
                raise NftError(f"No such file or directory: counter {name} does not exist")

    def _add_rule(self, o: Rule, op):
        t = self._existing_chain(o)
        self._check_rule_refs(t, o)
        self._handle += 1
        t.rules[o.chain].append((self._handle, o))

    _create_rule = _add_rule

    def _insert_rule(self, o: Rule, op):
        t = self._existing_chain(o)
        self._check_rule_refs(t, o)
        self._handle += 1
        rules = t.rules[o.chain]
        pos = 0 if op.handle is None else self._index(rules, op.handle)
        rules.insert(pos, (self._handle, o))

    def _replace_rule(self, o: Rule, op):
        t = self._existing_chain(o)
        self._check_rule_refs(t, o)
        rules = t.rules[o.chain]
        rules[self._index(rules, op.handle)] = (op.handle, o)

    def _delete_rule(self, o: Rule, op):
        rules = self._existing_chain(o).rules[o.chain]
        del rules[self._index(rules, op.handle)]

    @staticmethod
    def _index(rules, handle) -> int:
        for i, (h, _) in enumerate(rules):
            if h == handle:
                return i
        raise NftError(f"No such file or directory: no rule with handle {handle}")

    # sets and maps
    def _add_set(self, o: Set, op):
        t = self._table(o)
        old = t.sets.get(o.name)
        if old is not None:
            if (old.key_type, old.value_type, old.typeof, old.flags) != (o.key_type, o.value_type, o.typeof, o.flags):
                raise NftError(f"File exists: {o.kind} {o.name} exists with another type or flags")
            return
        t.sets[o.name] = o
        t.elements[o.name] = {}

    def _create_set(self, o: Set, op):
        if o.name in self._table(o).sets:
            raise NftError(f"File exists: {o.kind} {o.name}")
        self._add_set(o, op)

    def _existing_set(self, table_obj, name) -> _Table:
        t = self._table(table_obj)
        if name not in t.sets:
            raise NftError(f"No such file or directory: set {name} does not exist")
        return t

    def _flush_set(self, o: Set, op):
        self._existing_set(o, o.name).elements[o.name] = {}

    def _delete_set(self, o: Set, op):
        t = self._existing_set(o, o.name)
        for chain, rules in t.rules.items():
            if any(o.name in _SET_REF.findall(r.text) for _, r in rules):
                raise NftError(f"Device or resource busy: {o.kind} {o.name} is used by a rule in {chain}")
        del t.sets[o.name]
        del t.elements[o.name]

    # elements
    def _add_element(self, o: Element, op, create=False):
        t = self._existing_set(o, o.set)
        s = t.sets[o.set]
        if s.is_map != (o.value is not None):
            raise NftError(f"Invalid argument: element {o.key} {'needs' if s.is_map else 'cannot have'} a value in {s.kind} {o.set}")
        for name in _CHAIN_REF.findall(o.value or ""):
            if name not in t.chains:
                raise NftError(f"No such file or directory: element verdict jumps to missing chain {name}")
        if s.value_type == "counter" and o.value.strip('"') not in t.counters:
            raise NftError(f"No such file or directory: element {o.key} of {o.set} names missing counter {o.value}")
        elems = t.elements[o.set]
        if o.key in elems and (create or elems[o.key][0] != o.value):
            raise NftError(f"File exists: element {o.key} in {o.set}")
        elems[o.key] = (o.value, o.comment)

    def _add_elements(self, o: Elements, op):
        for el in o.split():
            self._add_element(el, op)

    def _delete_elements(self, o: Elements, op):
        for el in o.split():
            self._delete_element(el, op)

    def _create_element(self, o: Element, op):
        self._add_element(o, op, create=True)

    def _delete_element(self, o: Element, op):
        elems = self._existing_set(o, o.set).elements[o.set]
        if o.key not in elems:
            raise NftError(f"No such file or directory: element {o.key} not in {o.set}")
        del elems[o.key]

    # flowtables
    def _add_flowtable(self, o: Flowtable, op):
        t = self._table(o)
        old = t.flowtables.get(o.name)
        if old is not None:
            # like the kernel: re-adding a flowtable adds devices to it
            devices = tuple(sorted(set(old.devices) | set(o.devices)))
            t.flowtables[o.name] = Flowtable(o.family, o.table, o.name, o.hook, o.priority, devices)
        else:
            t.flowtables[o.name] = o

    def _create_flowtable(self, o: Flowtable, op):
        if o.name in self._table(o).flowtables:
            raise NftError(f"File exists: flowtable {o.name}")
        self._add_flowtable(o, op)

    def _delete_flowtable(self, o: Flowtable, op):
        t = self._table(o)
        if o.name not in t.flowtables:
            raise NftError(f"No such file or directory: flowtable {o.name} does not exist")
        for chain, rules in t.rules.items():
            if any(o.name in _FLOWTABLE_REF.findall(r.text) for _, r in rules):
                raise NftError(f"Device or resource busy: flowtable {o.name} is used by a rule in {chain}")
        del t.flowtables[o.name]

    # named counters
    def _add_counter(self, o: Counter, op):
        t = self._table(o)
        if o.name not in t.counters:  # like the kernel: an existing counter keeps its values
            t.counters[o.name] = [o, 0, 0]

    def _create_counter(self, o: Counter, op):
        if o.name in self._table(o).counters:
            raise NftError(f"File exists: counter {o.name}")
        self._add_counter(o, op)

    def _delete_counter(self, o: Counter, op):
        t = self._table(o)
        if o.name not in t.counters:
            raise NftError(f"No such file or directory: counter {o.name} does not exist")
        for chain, rules in t.rules.items():
            if any(o.name in _COUNTER_REF.findall(r.text) for _, r in rules):
                raise NftError(f"Device or resource busy: counter {o.name} is used by a rule in {chain}")
        for set_name, elems in t.elements.items():
            if t.sets[set_name].value_type == "counter" and any((val or "").strip('"') == o.name for val, _ in elems.values()):
                raise NftError(f"Device or resource busy: counter {o.name} is used by an element of {set_name}")
        del t.counters[o.name]
