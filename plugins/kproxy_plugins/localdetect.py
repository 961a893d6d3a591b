"""The local-traffic detector (``detectLocalMode``), shared by the built-in plugins.

It tells traffic from this cluster's pods from everything else: masquerade uses it to
decide which ClusterIP traffic to masquerade, service-maps to short-circuit pod traffic
to externalTrafficPolicy=Local destinations. Modes: ClusterCIDR (``clusterCIDR``),
NodeCIDR (the Node's podCIDRs), BridgeInterface and InterfaceNamePrefix (input interface
by name, so the interface need not exist yet). ClusterCIDR mode without a clusterCIDR
of the family means no detector.
"""

from __future__ import annotations

import ipaddress

from kproxy.nft import values as v


def _source(ctx, version: int) -> str | None:
    cfg = ctx.config
    mode = cfg.detect_local_mode
    if mode == "ClusterCIDR":
        cidr = cfg.cluster_cidr(version)
        return v.cidr(cidr, version) if cidr else None
    if mode == "NodeCIDR":
        node = ctx.state.node
        cidrs = [c for c in (node.pod_cidrs if node else ()) if ipaddress.ip_network(c).version == version]
        return v.cidr(cidrs[0], version) if cidrs else None
    return None


def _interface(ctx) -> str | None:
    cfg = ctx.config
    if cfg.detect_local_mode == "BridgeInterface":
        return v.ifname(cfg.bridge_interface)
    if cfg.detect_local_mode == "InterfaceNamePrefix":
        return v.ifname(cfg.interface_name_prefix + "*")
    return None


def local_match(ctx, version: int) -> str | None:
    """nft match for traffic from local pods, or None without a detector."""
    src, iface = _source(ctx, version), _interface(ctx)
    if src:
        return f"{v.addr_keyword(ctx.family(version))} saddr {src}"
    return f'iifname "{iface}"' if iface else None


def non_local_match(ctx, version: int) -> str | None:
    """nft match for traffic not from local pods, or None without a detector."""
    src, iface = _source(ctx, version), _interface(ctx)
    if src:
        return f"{v.addr_keyword(ctx.family(version))} saddr != {src}"
    return f'iifname != "{iface}"' if iface else None
