"""A test plugin that replaces service-maps: every ClusterIP port goes to its first ready
endpoint, with one plain DNAT rule per port (public API only)."""

from kproxy import hookimpl
from kproxy.nft import Chain
from kproxy.nft import values as v


@hookimpl
def kproxy_pre_render(ctx):
    """Own nat prerouting and output chains in the main IPv4 table."""
    t = ctx.table(4)
    for name, hook in (("first-endpoint-pre", "prerouting"), ("first-endpoint-out", "output")):
        ctx.declare(Chain(t.family, t.name, name, "nat", hook, -100))


@hookimpl
def kproxy_render_chain(ctx, chain):
    """One DNAT rule per Service port with a ready endpoint."""
    if not ctx.owns(chain):
        return None
    rules = []
    for svc in ctx.state.services.values():
        for port in svc.ports:
            ready = [e for e in ctx.state.service_endpoints(svc, port, 4) if e.ready]
            for ip in svc.cluster_ips:
                if ready and ":" not in ip:
                    rules.append(f"ip daddr {v.ip(ip, 4)} {v.proto(port.protocol)} dport {v.port(port.port)} "
                                 f"dnat ip to {v.ip(ready[0].ip, 4)}:{v.port(ready[0].port)}")
    return rules
