"""service-maps: Service dispatch, load balancing, traffic policies, affinity, firewall.

Semantics are kube-proxy's nftables mode; the layout is chain-light: the number of
chains does not grow with Services or endpoints, every Service port is a few map
elements. Per family (table ``ip kproxy`` / ``ip6 kproxy``):

Dispatch (chain ``services``, reached from nat prerouting and output):
  ``service-ips``        addr . proto . port : verdict   ClusterIPs, externalIPs, LB IPs
  ``service-nodeports``  proto . port : verdict          on ``nodeport-ips`` (or any
                                                         local address when
                                                         nodePortAddresses matches all)
  ``external-masq`` / ``nodeport-masq``  destinations whose traffic is masqueraded
                         (externalTrafficPolicy Cluster)
Load balancing: a verdict ``goto G-N`` picks one of N endpoints of group G uniformly at
random through the map ``G-backends`` (key: destination . index), where G is
``cluster`` / ``local`` (keyed by address . proto . port) or ``nodeport-cluster`` /
``nodeport-local`` (keyed by proto . port). One chain per group and distinct N in use.
externalTrafficPolicy Local: chains ``external-local`` / ``nodeport-local`` short-circuit
pod traffic and node traffic (masqueraded) to the cluster-wide endpoints through
``*-cluster-dispatch`` maps, and send the rest to local endpoints through
``*-local-dispatch``.
Session affinity (ClientIP): per Service port, see ``affinity``.
Checks (filter hooks, after DNAT would have happened): ``no-endpoint-services`` and
``no-endpoint-nodeports`` (drop or ``goto reject-chain``), ``cluster-ips-check``
(REJECT unserved ports of live ClusterIPs, DROP unallocated ServiceCIDR addresses),
``firewall-check`` before DNAT (loadBalancerSourceRanges: ``firewall-ips`` and the
interval set ``firewall-allow`` of destination . source range).
"""

from __future__ import annotations

import ipaddress

from kproxy import hookimpl
from kproxy.endpoints import categorize
from kproxy.nft import Chain, Set
from kproxy.nft import values as v

from .. import layout as L
from ..localdetect import local_match
from . import affinity as A
from .no_local import NoLocalEndpoints
from .nodeport_addresses import nodeport_ips

GROUPS = ("cluster", "local", "nodeport-cluster", "nodeport-local")
NO_LOCAL = "service-maps/no-local-endpoints"
BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("filter-forward", "filter", "forward", 0),
    ("filter-input", "filter", "input", 0),
    ("filter-output", "filter", "output", 0),
    ("affinity-record", "nat", "postrouting", 99),
)
REGULAR_CHAINS = (L.SERVICES, "external-local", "nodeport-local", "service-endpoints-check",
                  "nodeport-endpoints-check", "cluster-ips-check", "firewall-check", "reject-chain")


class FamilyMaps:
    """The sets and maps of one family, declared for this sync."""

    def __init__(self, ctx, version: int):
        self.version = version
        fam, table = ctx.family(version), ctx.table(version).name
        self.fam, self.table = fam, table
        t, a = v.addr_type(fam), v.addr_keyword(fam)
        self.a = a
        dest, np = f"{t} . inet_proto . inet_service", "inet_proto . inet_service"

        def decl(name, key, value=None, **kw):
            return ctx.declare(Set(fam, table, name, key, value, **kw))

        self.cluster_ips = decl(L.CLUSTER_IPS, t, comment="Active ClusterIPs")
        self.service_ips = decl("service-ips", dest, "verdict", comment="ClusterIP, ExternalIP and LoadBalancer IP traffic")
        self.service_nodeports = decl("service-nodeports", np, "verdict", comment="NodePort traffic")
        self.external_masq = decl("external-masq", dest, comment="external destinations with externalTrafficPolicy Cluster")
        self.nodeport_masq = decl("nodeport-masq", np, comment="NodePorts with externalTrafficPolicy Cluster")
        self.no_endpoint_services = decl("no-endpoint-services", dest, "verdict", comment="destinations without usable endpoints")
        self.no_endpoint_nodeports = decl("no-endpoint-nodeports", np, "verdict", comment="NodePorts without usable endpoints")
        self.firewall_ips = decl("firewall-ips", dest, comment="destinations subject to loadBalancerSourceRanges")
        self.firewall_allow = decl("firewall-allow", f"{dest} . {t}", flags=("interval",), comment="destination . allowed source")
        self.dispatch = {
            "cluster": decl("cluster-dispatch", dest, "verdict"),
            "local": decl("local-dispatch", dest, "verdict"),
            "nodeport-cluster": decl("nodeport-cluster-dispatch", np, "verdict"),
            "nodeport-local": decl("nodeport-local-dispatch", np, "verdict"),
        }
        addr_key = f"{a} daddr . meta l4proto . th dport . numgen random mod 1"
        port_key = "meta l4proto . th dport . numgen random mod 1"
        value = f"{a} daddr . th dport"
        self.backends = {g: decl(f"{g}-backends", port_key if g.startswith("nodeport") else addr_key, value, typeof=True)
                         for g in GROUPS}
        self.affinity = A.Affinity(ctx, fam, table)
        self.nodeport_ips = None
        self.no_local: dict = {}  # (IP version, Service key) -> [internal, external] Service ports, see ``no_local``
        self._ctx = ctx
        self._chains: dict = {}
        self._last_endpoints, self._last_values = None, ()

    def balance(self, group: str, key: str, endpoints, sticky: A.PortAffinity | None = None) -> str:
        """Add the backend elements of one destination (and declare the chain that
        balances over them); returns the verdict that reaches them (through the
        Service port's affinity chain when ``sticky``)."""
        n = len(endpoints)
        chain = self._chains.get((group, n))
        if chain is None:
            chain = self._chains[(group, n)] = Chain(self.fam, self.table, f"{group}-{n}")
        self._ctx.declare(chain)
        if endpoints is not self._last_endpoints:  # a port's endpoints are often balanced for several destinations
            # the model validated these and holds addresses canonically: no second check
            self._last_endpoints, self._last_values = endpoints, tuple([f"{ep.ip} . {ep.port}" for ep in endpoints])
        self._ctx.add_indexed(self.backends[group], key, self._last_values)
        verdict = f"goto {group}-{n}"
        return sticky.verdict(group, key, verdict, endpoints) if sticky else verdict


def _family_ips(ips, version: int) -> list[str]:
    return [v.ip(ip, version) for ip in ips if (":" in ip) == (version == 6)]


def _program_port(ctx, m: FamilyMaps, svc, cluster_ips, port, node_name: str, zone: str, node_ip: str | None):
    add = ctx.add_element
    version = m.version
    eps = categorize(ctx.state.service_endpoints(svc, port, version), node_name, zone)
    internal = eps.for_internal(svc)
    proto, pnum = v.proto(port.protocol), v.port(port.port)
    comment = svc.port_name(port)
    reject = "goto reject-chain"

    sticky = m.affinity.port(svc, port, eps.local) if svc.affinity_timeout and eps.has_any else None
    no_external = not eps.for_external(svc)
    if eps.has_any and (no_external or not internal):  # a Local policy, and no endpoint on this node
        counts = m.no_local.setdefault((version, svc.key), [0, 0])
        counts[0] += not internal
        counts[1] += no_external
    for ip in cluster_ips:
        dest = f"{ip} . {proto} . {pnum}"
        add(m.cluster_ips, ip)
        if internal:
            group = "local" if svc.internal_policy_local else "cluster"
            add(m.service_ips, dest, m.balance(group, dest, internal, sticky), comment)
            if sticky:
                sticky.record_address(dest)
        else:
            add(m.no_endpoint_services, dest, "drop" if eps.has_any else reject, comment)

    lb_ips = [i.ip for i in svc.lb_ingress if i.ip_mode != "Proxy"]
    for ip in _family_ips(list(svc.external_ips) + lb_ips, version):
        _program_external(ctx, m, svc, eps, f"{ip} . {proto} . {pnum}", "", sticky, comment)

    ranges = [r for r in svc.lb_source_ranges if ipaddress.ip_network(r).version == version]
    for ip in _family_ips(lb_ips, version) if ranges else ():
        dest = f"{ip} . {proto} . {pnum}"
        add(m.firewall_ips, dest)
        for r in ranges:
            add(m.firewall_allow, f"{dest} . {v.cidr(r, version)}")
        if node_ip and any(ipaddress.ip_address(node_ip) in ipaddress.ip_network(r) for r in ranges):
            for own in _family_ips(lb_ips, version):  # kube-proxy: traffic from the node to its LB VIPs
                add(m.firewall_allow, f"{dest} . {own}/{32 if version == 4 else 128}")

    if port.node_port and svc.type in ("NodePort", "LoadBalancer"):
        _program_external(ctx, m, svc, eps, f"{proto} . {v.port(port.node_port)}", "nodeport-", sticky, comment)


def _program_external(ctx, m: FamilyMaps, svc, eps, key: str, kind: str, sticky, comment: str):
    """The elements of one external destination: an externalIP or LB IP (``kind`` "",
    ``key`` addr . proto . port) or the NodePort (``kind`` "nodeport-", proto . port)."""
    add = ctx.add_element
    dispatch = m.service_nodeports if kind else m.service_ips
    if eps.has_any:
        if svc.external_policy_local:
            add(dispatch, key, f"goto {kind or 'external-'}local", comment)
            if eps.cluster:
                add(m.dispatch[f"{kind}cluster"], key, m.balance(f"{kind}cluster", key, eps.cluster, sticky))
            if eps.local:
                add(m.dispatch[f"{kind}local"], key, m.balance(f"{kind}local", key, eps.local, sticky))
        else:
            add(dispatch, key, m.balance(f"{kind}cluster", key, eps.cluster, sticky), comment)
            add(m.nodeport_masq if kind else m.external_masq, key)
        if sticky and kind:
            sticky.record_nodeport(key, set(eps.cluster) | set(eps.local))
        elif sticky:
            sticky.record_address(key)
    if not eps.for_external(svc):
        no_endpoints = m.no_endpoint_nodeports if kind else m.no_endpoint_services
        add(no_endpoints, key, "drop" if eps.has_any else "goto reject-chain", comment)


@hookimpl
def kproxy_pre_render(ctx):
    """Declare the chains and maps of both families and the elements of every Service port."""
    state = ctx.state
    node_name = ctx.config.node_name
    zone = state.node.zone if state.node else ""
    maps = ctx.plugin_data.setdefault("service-maps", {})
    for version in (4, 6):
        fam, table = ctx.family(version), ctx.table(version).name
        for name, kind, hook, prio in BASE_CHAINS:
            ctx.declare(Chain(fam, table, name, kind, hook, prio))
        for name in REGULAR_CHAINS:
            ctx.declare(Chain(fam, table, name))
        m = FamilyMaps(ctx, version)
        maps[version] = m
        np_ips = nodeport_ips(ctx, version)
        if np_ips is not None:
            m.nodeport_ips = ctx.declare(Set(fam, table, "nodeport-ips", v.addr_type(fam), comment="IPs that accept NodePort traffic"))
            for ip in np_ips:
                ctx.add_element(m.nodeport_ips, v.ip(ip, version))
        node_ip = state.node.primary_ip(version) if state.node else None
        for svc in ctx.services():
            cluster_ips = svc.cluster_ips_of(version)
            if not cluster_ips:
                continue  # like kube-proxy, a family handles only the Services with a ClusterIP of it
            with ctx.scope_of(svc):
                for port in svc.ports:
                    _program_port(ctx, m, svc, cluster_ips, port, node_name, zone, node_ip)


def _rules(ctx, chain) -> list | None:
    m: FamilyMaps = ctx.plugin_data["service-maps"][6 if chain.family == "ip6" else 4]
    a, name = m.a, chain.name
    dest = f"{a} daddr . meta l4proto . th dport"
    mark = L.mark_statement(ctx)
    on_nodeport_ips = f"{a} daddr @nodeport-ips" if m.nodeport_ips else \
        f"fib daddr type local {a} daddr != {'127.0.0.0/8' if a == 'ip' else '::1'}"
    fixed = {
        "filter-prerouting-pre-dnat": ["ct state new jump firewall-check"],
        "filter-output-pre-dnat": ["ct state new jump firewall-check"],
        "nat-prerouting": [f"jump {L.SERVICES}"],
        "nat-output": [f"jump {L.SERVICES}"],
        "filter-forward": ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"],
        "filter-input": ["ct state new jump nodeport-endpoints-check", "ct state new jump service-endpoints-check"],
        "filter-output": ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"],
        L.SERVICES: [f"{dest} @external-masq {mark}", f"{dest} vmap @service-ips",
                     f"{on_nodeport_ips} meta l4proto . th dport @nodeport-masq {mark}",
                     f"{on_nodeport_ips} meta l4proto . th dport vmap @service-nodeports"],
        "service-endpoints-check": [f"{dest} vmap @no-endpoint-services"],
        "nodeport-endpoints-check": [
            (f"{a} daddr @nodeport-ips" if m.nodeport_ips else f"{a} daddr != {'127.0.0.0/8' if a == 'ip' else '::1'}")
            + " meta l4proto . th dport vmap @no-endpoint-nodeports"],
        "firewall-check": [f"{dest} @firewall-ips {dest} . {a} saddr != @firewall-allow drop"],
        "reject-chain": ["reject"],
    }
    if name in fixed:
        return fixed[name]
    if name == "cluster-ips-check":
        rules = [(f"{a} daddr @{L.CLUSTER_IPS} reject", "Reject traffic to invalid ports of ClusterIPs")]
        cidrs = ctx.state.cidrs(m.version)
        if cidrs:
            rules.append((f"{a} daddr {{ {', '.join(v.cidr(c, m.version) for c in cidrs)} }} drop",
                          "Drop traffic to unallocated ClusterIPs"))
        return rules
    if name in ("external-local", "nodeport-local"):
        prefix, key = ("", dest) if name == "external-local" else ("nodeport-", "meta l4proto . th dport")
        rules = []
        pods = local_match(ctx, m.version)
        if pods:
            rules.append((f"{pods} {key} vmap @{prefix}cluster-dispatch", "short-circuit pod traffic"))
        rules += [(f"fib saddr type local {mark}", "masquerade local traffic"),
                  (f"fib saddr type local {key} vmap @{prefix}cluster-dispatch", "short-circuit local traffic"),
                  f"{key} vmap @{prefix}local-dispatch"]
        return rules
    sticky = A.rules(ctx, chain, a)
    if sticky is not None:
        return sticky
    group, _, n = name.rpartition("-")
    if group in GROUPS and n.isdigit():
        key = dest if not group.startswith("nodeport") else "meta l4proto . th dport"
        return [f"dnat {a} to {key} . numgen random mod {n} map @{group}-backends"]
    return None


@hookimpl
def kproxy_configure(app):
    """Register kube-proxy's gauge of Service ports without local endpoints."""
    app.plugin_data[NO_LOCAL] = NoLocalEndpoints(app.metrics)


@hookimpl
def kproxy_unconfigure(app):
    """Forget this app's state."""
    app.plugin_data.pop(NO_LOCAL, None)


@hookimpl
def kproxy_post_apply(ctx, result):
    """Recount the Service ports without local endpoints; release ClientIP-affinity
    clients of endpoints this sync stopped using."""
    if not result.ok or "service-maps" not in ctx.plugin_data:
        return
    no_local = ctx.app.plugin_data.get(NO_LOCAL)
    if no_local is not None:
        rendered = {k: n for m in ctx.plugin_data["service-maps"].values() for k, n in m.no_local.items()}
        no_local.update(rendered, ctx.full, ctx.changed or ())
    known = ctx.app.plugin_data.setdefault("service-maps/affinity", {})
    now = A.usable_endpoints(m.affinity for m in ctx.plugin_data["service-maps"].values())
    if ctx.full:  # forget Service ports that are gone
        before, known = known, {}
        ctx.app.plugin_data["service-maps/affinity"] = known
    else:
        before = known
    A.release_removed(ctx.app.backend, before, now)  # an error is logged by the engine
    known.update(now)


@hookimpl
def kproxy_render_chain(ctx, chain):
    """Rules of the chains this plugin declared."""
    return _rules(ctx, chain) if ctx.owns(chain) else None
