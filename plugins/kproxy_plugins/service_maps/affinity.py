"""ClientIP session affinity for service-maps: one affinity per (client, Service port).

kube-proxy keeps a client on its endpoint through every address of the Service port
(ClusterIP, externalIPs, LB IPs, NodePort), for ``timeoutSeconds`` after the client's
last new connection. Here each Service port with affinity (its id ``H`` is a hash of
the port's name) has, per family:

  maps   ``affinity-H-addr`` / ``affinity-H-port``   client : endpoint address / port
         (and ``affinity-H-local-addr`` / ``-local-port`` when a traffic policy is Local)
  chains ``affinity-H`` (and ``affinity-H-local``): DNAT to the remembered endpoint, else
         dispatch through ``affinity-<group>-balance`` to the usual ``G-N`` chain
         ``affinity-H-record-T``: remember the endpoint of a new connection for T seconds

Dispatch elements of such a port say ``goto affinity-H`` (``-local`` for the Local
groups) instead of ``goto G-N``. The base chain ``affinity-record`` (nat postrouting,
after DNAT) finds a new connection's record chain by its original destination through
``affinity-records`` (address . protocol . port) or, for NodePorts,
``affinity-nodeport-records`` (protocol . NodePort . endpoint: the endpoint tells the
NodePort apart from another destination with the same port number). The Local maps
only remember this node's endpoints (``affinity-local-endpoints``), so traffic that must
stay local never follows a remote affinity.

Why two maps (address, port) instead of one of ``address . port``: nft 1.0.6 cannot
build a packet-path update of an IPv6-keyed map whose value concatenates an address and
a port (its register allocator asserts). Both entries are written by one rule, with one
timeout, so they live and expire together.

Entries that point at an endpoint the port no longer uses are deleted right after the
sync that stopped using it (``remove_stale``): clients of the remaining endpoints keep
their affinity, as in kube-proxy where only the removed endpoint's set goes away.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging

from kproxy.nft import Chain, Elements, NftError, Set, Transaction
from kproxy.nft import values as v

log = logging.getLogger(__name__)

PROTOS = ("tcp", "udp", "sctp")
GROUPS = ("cluster", "local", "nodeport-cluster", "nodeport-local")
PREFIX = "affinity-"


def port_id(svc, port) -> str:
    """A short, stable id for one Service port (nft names are limited in length)."""
    name = f"{svc.namespace}/{svc.name}/{port.protocol.lower()}/{port.name}"
    return base64.b32encode(hashlib.sha256(name.encode()).digest())[:8].decode()


def _maps(h: str, local: bool) -> tuple[str, str]:
    base = f"{PREFIX}{h}-local" if local else f"{PREFIX}{h}"
    return f"{base}-addr", f"{base}-port"


class PortAffinity:
    """The affinity of one Service port in one family, while it is being rendered."""

    def __init__(self, family_affinity: "Affinity", h: str, timeout: int, has_local: bool):
        self.fa, self.h, self.timeout, self.has_local = family_affinity, h, timeout, has_local
        self.used: dict[bool, set] = {False: set(), True: set()}  # local? -> endpoints

    def verdict(self, group: str, key: str, balance_verdict: str, endpoints) -> str:
        """The dispatch verdict for destination ``key`` of ``group`` (whose plain
        balancing verdict is ``balance_verdict``)."""
        local = group.endswith("local")
        self.fa.ctx.add_element(self.fa.balance[group], key, balance_verdict)
        self.used[local].update((ep.ip, ep.port) for ep in endpoints)
        return f"goto {PREFIX}{self.h}" + ("-local" if local else "")

    def record_address(self, dest: str) -> None:
        """Remember new connections to ``dest`` (address . protocol . port)."""
        self.fa.ctx.add_element(self.fa.records, dest, f"goto {self.record_chain}")

    def record_nodeport(self, key: str, endpoints) -> None:
        """Remember new connections to the NodePort ``key`` (protocol . port) that
        went to one of ``endpoints``."""
        # the model validated the endpoints and holds their addresses canonically
        for ip, port in sorted({(ep.ip, ep.port) for ep in endpoints}):
            self.fa.ctx.add_element(self.fa.nodeport_records, f"{key} . {ip} . {port}", f"goto {self.record_chain}")

    @property
    def record_chain(self) -> str:
        return f"{PREFIX}{self.h}-record-{self.timeout}"


class Affinity:
    """The affinity objects of one family's table."""

    def __init__(self, ctx, family: str, table: str):
        self.ctx, self.fam, self.table = ctx, family, table
        self.t = v.addr_type(family)
        self.balance: dict[str, Set] = {}
        self.records = self.nodeport_records = self.local_endpoints = None
        self.ports: dict[str, PortAffinity] = {}  # rendered in this sync, by id

    def _declare_shared(self):
        def vmap(name, key):
            return self.ctx.declare(Set(self.fam, self.table, PREFIX + name, key, "verdict"))

        dest, np = f"{self.t} . inet_proto . inet_service", "inet_proto . inet_service"
        self.records = vmap("records", dest)
        self.nodeport_records = vmap("nodeport-records", f"{np} . {self.t} . inet_service")
        self.balance = {g: vmap(f"{g}-balance", np if g.startswith("nodeport") else dest) for g in GROUPS}
        self.local_endpoints = self.ctx.declare(Set(
            self.fam, self.table, f"{PREFIX}local-endpoints", f"{self.t} . inet_service",
            comment="this node's endpoints of Service ports with affinity"))

    def port(self, svc, port, local_endpoints) -> PortAffinity:
        """Declare the objects of one Service port with ClientIP affinity (call inside
        the Service's scope)."""
        self._declare_shared()  # in every scope that needs them: they live while one does
        h = port_id(svc, port)
        has_local = svc.internal_policy_local or svc.external_policy_local
        pa = PortAffinity(self, h, svc.affinity_timeout, has_local)
        comment = svc.port_name(port)
        for local in (False, True) if has_local else (False,):
            addr_map, port_map = _maps(h, local)
            # explicit types, not typeof: these maps outlive full syncs, and nft 1.0.6
            # cannot read back a kernel map whose typeof mentions "th dport"
            self.ctx.declare(Set(self.fam, self.table, addr_map, self.t, self.t,
                                 flags=("dynamic", "timeout"), comment=comment))
            self.ctx.declare(Set(self.fam, self.table, port_map, self.t, "inet_service",
                                 flags=("dynamic", "timeout"), comment=comment))
            self.ctx.declare(Chain(self.fam, self.table, f"{PREFIX}{h}" + ("-local" if local else "")))
        self.ctx.declare(Chain(self.fam, self.table, pa.record_chain))
        if has_local:
            for ep in local_endpoints:
                self.ctx.add_element(self.local_endpoints, f"{ep.ip} . {ep.port}")
        self.ports[h] = pa
        return pa


def rules(ctx, chain, a: str) -> list | None:
    """Rules of the affinity chains (None for other chains)."""
    name = chain.name
    if name == "affinity-record":
        if ("set", chain.family, chain.table, f"{PREFIX}records") not in ctx.objects:
            return []  # no Service port with affinity
        out = []
        for proto in PROTOS:  # "ct original proto-dst" needs a protocol
            out.append(f"meta l4proto {proto} ct status dnat ct original {a} daddr . meta l4proto . "
                       f"ct original proto-dst vmap @{PREFIX}records")
            out.append(f"meta l4proto {proto} ct status dnat meta l4proto . ct original proto-dst . "
                       f"{a} daddr . th dport vmap @{PREFIX}nodeport-records")
        return out
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX):].split("-")
    h = parts[0]
    if parts[1:2] == ["record"]:
        timeout = parts[2]
        out = []
        for local in (False, True):
            addr_map, port_map = _maps(h, local)
            if ("set", chain.family, chain.table, addr_map) not in ctx.objects:
                continue
            only_local = f"{a} daddr . th dport @{PREFIX}local-endpoints " if local else ""
            out.append(f"{only_local}update @{addr_map} {{ {a} saddr timeout {timeout}s : {a} daddr }} "
                       f"update @{port_map} {{ {a} saddr timeout {timeout}s : th dport }}")
        return out
    local = parts[1:] == ["local"]
    addr_map, port_map = _maps(h, local)
    g = "local" if local else "cluster"
    return [f"meta l4proto {{ {', '.join(PROTOS)} }} dnat {a} to {a} saddr map @{addr_map} : {a} saddr map @{port_map}",
            f"{a} daddr . meta l4proto . th dport vmap @{PREFIX}{g}-balance",
            f"meta l4proto . th dport vmap @{PREFIX}nodeport-{g}-balance"]


# -- removing entries of endpoints no longer in use -----------------------------------------

def usable_endpoints(families) -> dict:
    """(family, table, id, local) -> the endpoints the affinity may remember, for every
    Service port rendered in this sync (the local maps only remember local ones)."""
    out = {}
    for fa in families:
        for h, pa in fa.ports.items():
            out[(fa.fam, fa.table, h, False)] = frozenset(pa.used[False] | pa.used[True])
            if pa.has_local:
                out[(fa.fam, fa.table, h, True)] = frozenset(pa.used[True])
    return out


def release_removed(backend, before: dict, now: dict) -> int:
    """After a sync: release clients whose remembered endpoint is no longer usable,
    for every affinity whose usable endpoints shrank (or are not known from before,
    e.g. after a restart). Returns the number of clients released."""
    released = 0
    for key, usable in now.items():
        prev = before.get(key)
        if prev is None or prev - usable:
            released += remove_stale(backend, key[0], key[1], key[2], key[3], usable)
    if released:
        log.info("released %d ClientIP-affinity clients of endpoints no longer in use", released)
    return released


def remove_stale(backend, family: str, table: str, h: str, local: bool, usable: set) -> int:
    """Delete the entries of one affinity that point at an endpoint outside ``usable``
    ((address, port) pairs); returns how many clients were released. Each entry is
    first re-added with its listed value, so an entry that expired since the listing
    cannot make the deletion fail."""
    addr_map, port_map = _maps(h, local)
    try:
        addrs, ports = (backend.list_elements(Set(family, table, name, "", "")) for name in (addr_map, port_map))
    except NftError as e:  # the map is gone: nothing to clean
        log.debug("affinity %s: %s", addr_map, e)
        return 0
    wanted = {(ipaddress.ip_address(ip), int(p)) for ip, p in usable}
    stale = {c for c in set(addrs) | set(ports)
             if c not in addrs or c not in ports or (ipaddress.ip_address(addrs[c]), int(ports[c])) not in wanted}
    if not stale:
        return 0
    txn = Transaction()
    for name, listed in ((addr_map, addrs), (port_map, ports)):
        present = sorted(c for c in stale if c in listed)
        if present:
            txn.add(Elements(family, table, name, tuple((c, listed[c], None) for c in present)))
            txn.delete(Elements(family, table, name, tuple((c, None, None) for c in present)))
    backend.apply(txn)
    return len(stale)
