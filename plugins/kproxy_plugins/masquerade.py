"""masquerade: source NAT of Service traffic, decided by a mark bit.

Connections to a ClusterIP from outside the cluster (as the local-traffic detector
sees it, see ``localdetect``), all of them with ``masqueradeAll``, and hairpin
connections (an endpoint reaching itself through its Service) get the masquerade bit
(``masqueradeBit``, default 14 = 0x4000) set in their mark; ``nat-postrouting``
masquerades (``fully-random``) every marked connection and clears the bit. Other
plugins request masquerade the same way, by setting the bit.

Hairpin is detected after DNAT through the set ``hairpin`` of ``endpoint . endpoint``
address pairs: a DNATed connection whose source equals its new destination. Only
endpoints on this node (or of no node) are listed: a pod elsewhere reaching itself is
DNATed on its own node, never here.
"""

from __future__ import annotations

from kproxy import hookimpl
from kproxy.nft import Chain, Set
from kproxy.nft import values as v

from . import layout as L
from .localdetect import non_local_match

SRCNAT_PRIORITY = 100


@hookimpl
def kproxy_pre_render(ctx):
    """Declare the masquerade chains and the hairpin pairs of every endpoint."""
    here = {ctx.config.node_name, ""}  # this node, or no node
    services = ctx.services()
    endpoints = ctx.state.service_endpoints
    for version in (4, 6):
        fam, table = ctx.family(version), ctx.table(version).name
        ctx.declare(Chain(fam, table, "nat-postrouting", "nat", "postrouting", SRCNAT_PRIORITY))
        ctx.declare(Chain(fam, table, L.MASQUERADING))
        addr_t = v.addr_type(fam)
        hairpin = ctx.declare(Set(fam, table, L.HAIRPIN, f"{addr_t} . {addr_t}", comment="endpoint . endpoint"))
        for svc in services:
            if not svc.cluster_ips_of(version):
                continue  # a family handles only the Services with a ClusterIP of it: no DNAT here
            # only a pod of this node can reach itself through this node's DNAT
            # the model holds addresses canonically: no second validation
            addrs = [ep.ip for port in svc.ports for ep in endpoints(svc, port, version) if ep.node_name in here]
            if addrs:  # most Services have no endpoint here: their scope is not even entered
                with ctx.scope_of(svc):
                    for addr in addrs:
                        ctx.add_element(hairpin, f"{addr} . {addr}")


@hookimpl(tryfirst=True)
def kproxy_render_chain(ctx, chain):
    """Mark off-cluster sources in the ``services`` chain (before dispatch); mark
    hairpin connections and masquerade marked ones in postrouting."""
    mark = L.mark_statement(ctx)
    version = 6 if chain.family == "ip6" else 4
    a = v.addr_keyword(chain.family)
    if chain.name == L.SERVICES:
        if ctx.config.masquerade_all:
            return [f"{a} daddr @{L.CLUSTER_IPS} {mark}"]
        match = non_local_match(ctx, version)
        return [f"{a} daddr @{L.CLUSTER_IPS} {match} {mark}"] if match else None
    if not ctx.owns(chain):
        return None
    bit = hex(ctx.config.masquerade_mark)
    if chain.name == "nat-postrouting":
        return [(f"ct status dnat {a} saddr . {a} daddr @{L.HAIRPIN} {mark}", "hairpin"), f"jump {L.MASQUERADING}"]
    if chain.name == L.MASQUERADING:
        return [f"meta mark & {bit} == 0 return", f"meta mark set meta mark xor {bit}", "masquerade fully-random"]
    return None
