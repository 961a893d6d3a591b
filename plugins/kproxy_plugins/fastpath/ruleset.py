"""The fastpath table: its objects, its rules, and the offloadable Service ports.

Table ``inet kproxy-fastpath`` (one table for both families):

- flowtable ``fastpath`` (hook ingress, priority filter) on the eligible devices;
- sets ``offload-v4`` / ``offload-v6`` of ``ClusterIP . protocol . port``;
- chain ``forward`` (filter, hook forward, priority ``PRIORITY``) with one rule per
  family and protocol::

      meta nfproto ipv4 meta l4proto tcp ct original ip daddr . meta l4proto . ct original proto-dst @offload-v4 ct packets > 20 flow add @fastpath

Why the key is *ClusterIP . protocol . port* and not the ClusterIP alone (the seed's
``@cluster-ips``): the rule then offloads exactly the Service ports kproxy serves, as
written in the Service, and nothing else that happens to be addressed to a ClusterIP;
flowtables only handle TCP and UDP, so SCTP ports never enter the set; and it leaves room
for per-port control. The price is one element per Service port instead of one per
ClusterIP, and one rule per protocol: ``ct original proto-dst`` in a concatenation needs
the protocol as context for nft 1.0.6, given by ``meta l4proto tcp`` in front. The
original destination is matched because the forward hook runs after DNAT. ``meta
nfproto`` is needed in an inet table: nft adds no family check for ``ct original ip
daddr``, which would otherwise read the first 4 bytes of an IPv6 connection's address.

``ct packets`` counts the connection's packets in both directions (nft turns on
conntrack accounting when such a rule is loaded). The chain runs at ``PRIORITY``,
after the usual filter priority 0, so a packet a forward filter at priority 0 drops
never gets its connection offloaded.
"""

from __future__ import annotations

import ipaddress
import logging

from kproxy.nft import Chain, Flowtable, Rule, Set, Table, Transaction
from kproxy.nft.objects import Elements, check_element_text
from kproxy.nft import values as v

from .devices import chunks

log = logging.getLogger("kproxy.fastpath")

FAMILY = "inet"
TABLE_NAME = "kproxy-fastpath"
TABLE = Table(FAMILY, TABLE_NAME, "kproxy fastpath: flowtable offload of long ClusterIP connections")
FLOWTABLE = "fastpath"
CHAIN = "forward"
PRIORITY = 10  # filter + 10
SETS = {4: "offload-v4", 6: "offload-v6"}
ANNOTATION = "kproxy.io/fastpath"
MODES = ("opt-out", "opt-in")
OFFLOAD_PROTOCOLS = ("tcp", "udp")  # what a flowtable can offload

_bad_annotation: set[tuple] = set()


def flowtable(devices=()) -> Flowtable:
    return Flowtable(FAMILY, TABLE_NAME, FLOWTABLE, "ingress", "filter", tuple(devices))


def chain() -> Chain:
    return Chain(FAMILY, TABLE_NAME, CHAIN, "filter", "forward", PRIORITY)


def offload_set(version: int) -> Set:
    return Set(FAMILY, TABLE_NAME, SETS[version], f"{v.addr_type(v.ip_family_of(version))} . inet_proto . inet_service",
               comment=f"IPv{version} ClusterIP . protocol . port whose connections may be offloaded")


def rules(threshold: int) -> list[Rule]:
    """The offload rules (each rendered as its own ``add rule`` line)."""
    n = v.integer(threshold, 1)
    out = []
    for version, addr in ((4, "ip"), (6, "ip6")):
        for proto in OFFLOAD_PROTOCOLS:
            text = (f"meta nfproto ipv{version} meta l4proto {proto} ct original {addr} daddr . meta l4proto . ct original proto-dst "
                    f"@{SETS[version]} ct packets > {n} flow add @{FLOWTABLE}")
            out.append(Rule(FAMILY, TABLE_NAME, CHAIN, text))
    return out


ELEMENTS_PER_OP = 1000


def element_ops(keys) -> list[Elements]:
    """``(version, key)`` pairs as a few multi-element operations (one per set and chunk)."""
    ops = []
    for version in SETS:
        mine = sorted(k for ver, k in keys if ver == version)
        for i in range(0, len(mine), ELEMENTS_PER_OP):
            items = tuple((check_element_text(k, SETS[version]), None, None) for k in mine[i:i + ELEMENTS_PER_OP])
            ops.append(Elements(FAMILY, TABLE_NAME, SETS[version], items))
    return ops


# -- which Services ---------------------------------------------------------------------

def wants_offload(svc, mode: str) -> bool:
    """The Service's choice (annotation ``kproxy.io/fastpath``: "true"/"false"), or the
    mode's default: every Service in ``opt-out`` mode, none in ``opt-in`` mode."""
    raw = (svc.annotations or {}).get(ANNOTATION)
    if raw is not None:
        val = raw.strip().lower()
        if val in ("true", "false"):
            return val == "true"
        if (svc.key, raw) not in _bad_annotation:
            _bad_annotation.add((svc.key, raw))
            log.warning("Service %s/%s: annotation %s=%r is neither \"true\" nor \"false\"; ignored",
                        svc.namespace, svc.name, ANNOTATION, raw)
    return mode == "opt-out"


def service_keys(svc, mode: str) -> frozenset:
    """The (IP version, set element) pairs one Service contributes."""
    if not wants_offload(svc, mode):
        return frozenset()
    out = set()
    for ip in svc.cluster_ips:
        try:
            version = ipaddress.ip_address(ip).version
        except ValueError:
            continue  # "None" (headless) or garbage: nothing to offload
        for port in svc.ports:
            proto = port.protocol.lower()
            if proto in OFFLOAD_PROTOCOLS:
                out.add((version, f"{v.ip(ip, version)} . {v.proto(proto)} . {v.port(port.port)}"))
    return frozenset(out)


# -- transactions -------------------------------------------------------------------------

def build(threshold: int, devices, keys, replace: bool = True) -> Transaction:
    """The whole table. ``replace``: delete an existing one first, in the same
    transaction (so the kernel switches atomically and nothing stale survives)."""
    txn = Transaction()
    if replace:
        txn.add(Table(FAMILY, TABLE_NAME)).delete(Table(FAMILY, TABLE_NAME))
    txn.add(TABLE)
    for chunk in chunks(sorted(devices)):
        txn.add(flowtable(chunk))
    for version in SETS:
        txn.add(offload_set(version))
    for op in element_ops(keys):
        txn.add(op)
    txn.add(chain())
    for r in rules(threshold):
        txn.add(r)
    return txn


def add_devices(devices) -> Transaction:
    """Add devices to the flowtable (the ones it has already are ignored by the kernel)."""
    txn = Transaction()
    for chunk in chunks(sorted(devices)):
        if chunk:
            txn.add(flowtable(chunk))
    return txn


def rebuild_flowtable(threshold: int, devices) -> Transaction:
    """Replace the flowtable by one with exactly ``devices``: the only way to remove
    devices through kproxy's nft layer. The rules referencing the flowtable go first
    and come back after, all in one transaction. Connections offloaded so far go back
    to the normal path and are offloaded again at their next packet."""
    txn = Transaction()
    txn.flush(chain())
    txn.delete(flowtable())
    for chunk in chunks(sorted(devices)):
        txn.add(flowtable(chunk))
    for r in rules(threshold):
        txn.add(r)
    return txn


def elements_delta(added, removed) -> Transaction:
    txn = Transaction()
    for op in element_ops(removed):
        txn.delete(op)
    for op in element_ops(added):
        txn.add(op)
    return txn


def probe_transaction() -> Transaction:
    """Create a flowtable and a ``flow add`` rule in a scratch table and remove it again
    (one transaction: nothing stays, whether it works or not)."""
    t = Table(FAMILY, "kproxy-fastpath-probe")
    ft = Flowtable(FAMILY, t.name, "probe", "ingress", "filter", ())
    c = Chain(FAMILY, t.name, "probe")
    txn = Transaction()
    txn.add(t).add(ft).add(c)
    txn.add(Rule(FAMILY, t.name, c.name, "meta l4proto tcp ct packets > 1 flow add @probe"))
    txn.delete(t)
    return txn


# Lines of probe_transaction() and the kernel feature each one needs.
PROBE_FEATURES = {
    2: "nftables flowtables (nf_flow_table / nf_flow_table_inet; kernel options CONFIG_NF_FLOW_TABLE, "
       "CONFIG_NF_FLOW_TABLE_INET)",
    4: "the nftables 'flow add' expression (nft_flow_offload; kernel option CONFIG_NFT_FLOW_OFFLOAD)",
}
