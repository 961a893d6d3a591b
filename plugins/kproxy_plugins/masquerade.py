"""masquerade: local-traffic detection and source NAT of Service traffic, by mark.

Connections to a ClusterIP from outside the cluster (as the local-traffic detector
sees it), all of them with ``masqueradeAll``, and hairpin connections (an endpoint
reaching itself through its Service) are marked with the ``masqueradeBit`` (default 14,
0x4000) and masqueraded (``fully-random``) in postrouting, where the mark is cleared.

Detectors (``detectLocalMode``): ClusterCIDR (``clusterCIDR``), NodeCIDR (the Node's
podCIDRs), BridgeInterface and InterfaceNamePrefix (input interface by name, so the
interface need not exist yet). With ClusterCIDR mode and no clusterCIDR there is no
detector: nothing is masqueraded for coming from off-cluster.

Hairpin is detected after DNAT through the set ``hairpin`` of ``endpoint . endpoint``
address pairs: a DNATed connection whose source equals its new destination.
"""

from __future__ import annotations

import ipaddress

from kproxy import hookimpl
from kproxy.nft import Chain, Set
from kproxy.nft import values as v

from . import layout as L

SRCNAT_PRIORITY = 100


def non_local_match(ctx, version: int) -> str | None:
    """The match for traffic that does not come from a local pod, or None (no detector)."""
    cfg = ctx.config
    fam = ctx.family(version)
    a = v.addr_keyword(fam)
    mode = cfg.detect_local_mode
    if mode == "ClusterCIDR":
        cidr = cfg.cluster_cidr(version)
        return f"{a} saddr != {v.cidr(cidr, version)}" if cidr else None
    if mode == "NodeCIDR":
        node = ctx.state.node
        cidrs = [c for c in (node.pod_cidrs if node else ()) if ipaddress.ip_network(c).version == version]
        return f"{a} saddr != {v.cidr(cidrs[0], version)}" if cidrs else None
    if mode == "BridgeInterface":
        return f'iifname != "{v.ifname(cfg.bridge_interface)}"'
    if mode == "InterfaceNamePrefix":
        return f'iifname != "{v.ifname(cfg.interface_name_prefix + "*")}"'
    return None


@hookimpl
def kproxy_pre_render(ctx):
    """Declare the masquerade chains and the hairpin pairs of every endpoint."""
    for version in (4, 6):
        fam, table = ctx.family(version), ctx.table(version).name
        ctx.declare(Chain(fam, table, "nat-postrouting", "nat", "postrouting", SRCNAT_PRIORITY))
        ctx.declare(Chain(fam, table, L.MASQUERADING))
        ctx.declare(Chain(fam, table, L.MARK_FOR_MASQUERADE))
        addr_t = v.addr_type(fam)
        hairpin = ctx.declare(Set(fam, table, L.HAIRPIN, f"{addr_t} . {addr_t}", comment="endpoint . endpoint"))
        seen = set()
        for svc in ctx.state.services.values():
            for port in svc.ports:
                for ep in ctx.state.service_endpoints(svc, port, version):
                    if ep.ip not in seen:
                        seen.add(ep.ip)
                        addr = v.ip(ep.ip, version)
                        ctx.add_element(hairpin, f"{addr} . {addr}")


@hookimpl(tryfirst=True)
def kproxy_render_chain(ctx, chain):
    """Marking rules: off-cluster sources in the ``services`` chain (before dispatch),
    hairpin and the masquerade itself in postrouting."""
    mark = hex(ctx.config.masquerade_mark)
    version = 6 if chain.family == "ip6" else 4
    a = v.addr_keyword(chain.family)
    if chain.name == L.SERVICES:
        if ctx.config.masquerade_all:
            return [f"{a} daddr @{L.CLUSTER_IPS} jump {L.MARK_FOR_MASQUERADE}"]
        match = non_local_match(ctx, version)
        return [f"{a} daddr @{L.CLUSTER_IPS} {match} jump {L.MARK_FOR_MASQUERADE}"] if match else None
    if not ctx.owns(chain):
        return None
    if chain.name == "nat-postrouting":
        return [(f"ct status dnat {a} saddr . {a} daddr @{L.HAIRPIN} jump {L.MARK_FOR_MASQUERADE}", "hairpin"),
                f"jump {L.MASQUERADING}"]
    if chain.name == L.MARK_FOR_MASQUERADE:
        return [f"meta mark set meta mark | {mark}"]
    if chain.name == L.MASQUERADING:
        return [f"meta mark & {mark} == 0 return", f"meta mark set meta mark xor {mark}", "masquerade fully-random"]
    return None
