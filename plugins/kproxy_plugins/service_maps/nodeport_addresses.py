"""Which node addresses accept NodePort traffic (``nodePortAddresses``)."""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("kproxy.service-maps")


def local_addresses(version: int) -> list[str]:
    """The addresses of this network namespace's interfaces (loopback excluded)."""
    from pyroute2 import IPRoute

    family = 2 if version == 4 else 10
    with IPRoute() as ipr:
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=family)]
    return sorted({a for a in addrs if a and not ipaddress.ip_address(a).is_loopback})


def match_all(cidrs, version: int) -> bool:
    """Whether the configured CIDRs cover every address of the family (0.0.0.0/0, ::/0)."""
    return any(ipaddress.ip_network(c).prefixlen == 0 and ipaddress.ip_network(c).version == version for c in cidrs)


def nodeport_ips(ctx, version: int) -> list[str] | None:
    """The node IPs for NodePorts, or None meaning every local address."""
    cfg = ctx.config
    if cfg.node_port_addresses == ("primary",):
        node = ctx.state.node
        ip = node.primary_ip(version) if node else None
        return [ip] if ip else []
    cidrs = [ipaddress.ip_network(c) for c in cfg.node_port_addresses if ipaddress.ip_network(c).version == version]
    if match_all(cfg.node_port_addresses, version):
        return None
    try:
        local = local_addresses(version)
    except Exception as e:
        log.warning("cannot list local addresses for nodePortAddresses: %s", e)
        return []
    return [a for a in local if any(ipaddress.ip_address(a) in c for c in cidrs)]
