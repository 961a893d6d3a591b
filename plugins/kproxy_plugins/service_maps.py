"""service-maps: Service dispatch, load balancing and the no-endpoint checks.

The layout is chain-light: the number of chains does not grow with Services or
endpoints. Every Service port is a handful of map elements:

- ``cluster-ips``: every ClusterIP (traffic to a live ClusterIP on a port it does not
  serve is rejected in ``cluster-ips-check``);
- ``service-ips``: ``addr . proto . port : goto endpoints-N`` where N is the number of
  endpoints that serve it;
- ``backends``: ``addr . proto . port . i : endpoint-addr . endpoint-port`` for i < N;
  the chain ``endpoints-N`` DNATs through this map with ``numgen random mod N``, so
  every new connection picks one of the N endpoints uniformly at random;
- ``no-endpoint-services``: ``addr . proto . port : goto reject-chain`` when the port
  has no usable endpoint (checked in the filter hooks, after DNAT would have happened).

One chain ``endpoints-N`` exists per distinct endpoint count in use.
"""

from __future__ import annotations

from kproxy import hookimpl
from kproxy.endpoints import categorize
from kproxy.nft import Chain, Set
from kproxy.nft import values as v

from . import layout as L

NAT_PRIORITY = -100  # dstnat
FILTER_PRIORITY = 0


def _base_chains(fam, table):
    return [
        Chain(fam, table, "nat-prerouting", "nat", "prerouting", NAT_PRIORITY),
        Chain(fam, table, "nat-output", "nat", "output", NAT_PRIORITY),
        Chain(fam, table, "filter-forward", "filter", "forward", FILTER_PRIORITY),
        Chain(fam, table, "filter-input", "filter", "input", FILTER_PRIORITY),
        Chain(fam, table, "filter-output", "filter", "output", FILTER_PRIORITY),
    ]


@hookimpl
def kproxy_pre_render(ctx):
    """Declare the dispatch chains and maps, and one set of elements per Service port."""
    state = ctx.state
    node_name = ctx.config.node_name
    zone = state.node.zone if state.node else ""
    for version in (4, 6):
        fam, table = ctx.family(version), ctx.table(version).name
        addr_t = v.addr_type(fam)
        a = v.addr_keyword(fam)
        for c in _base_chains(fam, table):
            ctx.declare(c)
        for name in (L.SERVICES, "service-endpoints-check", "cluster-ips-check", L.REJECT_CHAIN):
            ctx.declare(Chain(fam, table, name))
        cluster_ips = ctx.declare(Set(fam, table, L.CLUSTER_IPS, addr_t, comment="Active ClusterIPs"))
        service_ips = ctx.declare(Set(fam, table, L.SERVICE_IPS, f"{addr_t} . inet_proto . inet_service", "verdict",
                                      comment="ClusterIP traffic"))
        no_endpoints = ctx.declare(Set(fam, table, L.NO_ENDPOINT_SERVICES, f"{addr_t} . inet_proto . inet_service",
                                       "verdict", comment="Service ports without usable endpoints"))
        backends = ctx.declare(Set(fam, table, L.BACKENDS,
                                   f"{a} daddr . meta l4proto . th dport . numgen random mod 1",
                                   f"{a} daddr . th dport", typeof=True, comment="Endpoints by service port and index"))
        counts = set()
        for svc in state.services.values():
            ips = [ip for ip in svc.cluster_ips if (":" in ip) == (version == 6)]
            if not ips:
                continue
            for port in svc.ports:
                eps = categorize(state.service_endpoints(svc, port, version), node_name, zone)
                internal = eps.for_internal(svc)
                proto, pnum = v.proto(port.protocol), v.port(port.port)
                for ip in ips:
                    dest = f"{v.ip(ip, version)} . {proto} . {pnum}"
                    ctx.add_element(cluster_ips, v.ip(ip, version))
                    if internal:
                        counts.add(len(internal))
                        ctx.add_element(service_ips, dest, f"goto endpoints-{len(internal)}", svc.port_name(port))
                        for i, ep in enumerate(internal):
                            ctx.add_element(backends, f"{dest} . {i}", f"{v.ip(ep.ip, version)} . {v.port(ep.port)}")
                    else:
                        verdict = "drop" if eps.has_any else f"goto {L.REJECT_CHAIN}"
                        ctx.add_element(no_endpoints, dest, verdict, svc.port_name(port))
        for n in sorted(counts):
            ctx.declare(Chain(fam, table, f"endpoints-{n}"))


@hookimpl
def kproxy_render_chain(ctx, chain):
    """Rules of the chains this plugin declared."""
    if not ctx.owns(chain):
        return None
    a = v.addr_keyword(chain.family)
    name = chain.name
    if name in ("nat-prerouting", "nat-output"):
        return [f"jump {L.SERVICES}"]
    if name in ("filter-forward", "filter-output"):
        return ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"]
    if name == "filter-input":
        return ["ct state new jump service-endpoints-check"]
    if name == L.SERVICES:
        return [f"{a} daddr . meta l4proto . th dport vmap @{L.SERVICE_IPS}"]
    if name == "service-endpoints-check":
        return [f"{a} daddr . meta l4proto . th dport vmap @{L.NO_ENDPOINT_SERVICES}"]
    if name == "cluster-ips-check":
        return [(f"{a} daddr @{L.CLUSTER_IPS} reject", "Reject traffic to invalid ports of ClusterIPs")]
    if name == L.REJECT_CHAIN:
        return ["reject"]
    if name.startswith("endpoints-"):
        n = int(name.split("-", 1)[1])
        return [f"dnat {a} to {a} daddr . meta l4proto . th dport . numgen random mod {n} map @{L.BACKENDS}"]
    return None
