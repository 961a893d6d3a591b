"""kube-proxy's nftables-mode semantics, proven with real packets.

The facts (Services, endpoints, flows and their expected outcomes) come from
kube-proxy's packet-tracer tests in pkg/proxy/nftables/proxier_test.go
(TestClusterIPGeneral, TestLoadBalancer, TestNodePorts, TestExternalTrafficPolicyLocal,
TestExternalTrafficPolicyCluster, TestInternalTrafficPolicy, TestTerminatingEndpoints*,
TestInternalExternalMasquerade, TestNoEndpointsReject, TestLoadBalancerIngressRouteTypeProxy),
with the addresses moved into the lab. Each test names the kube-proxy test it follows.

The lab (on top of the session ``cluster`` of conftest.py, all in network namespaces):

    node      this node, "node-1" (Node object: InternalIP 192.168.50.1 and
              2001:db8:113::1, zone label zone-a, podCIDR 10.0.3.0/24). Listeners
              named "node" on TCP 3001-3003: a NodePort that is not DNATed is answered
              by the node itself, so "not programmed" is visible as an answer from "node".
    ep-a      endpoint pod, 10.0.21.2-9 (aliases) and fd00:10:21::2-9, answering as
              "ep-a" on TCP 8080 / UDP 5353 and as "ep-a/9443" on TCP 9443
    ep-b      the same on 10.0.22.2-9 and fd00:10:22::2-9
    client    pod inside clusterCIDR, 10.0.3.2 (from conftest)
    pc        pod inside clusterCIDR, 10.0.23.2 and fd00:10:23::2 (IPv6 client, and a pod
              outside the node's podCIDR / bridge for the detectLocalMode tests)
    ext       off-cluster client 192.168.50.2 (from conftest; the node is its gateway
              192.168.50.1, which is also the node's primary IP)
    far       off-cluster client 203.0.113.2 (and 203.0.113.130, 2001:db8:113::2)
    aff       20 source addresses 10.0.24.2-21 (session-affinity statistics)
    sink      what lies behind the node when kproxy does not handle a packet: the node
              routes the Service CIDR (172.30.0.0/16, fd00:172:30::/64), the externalIPs
              (192.168.99.0/24) and the LB IPs (1.2.3.0/24, 5.6.7.0/24, 9.10.11.0/24,
              2001:db8:99::/64) to it, and it answers on every such address as "sink".
              So a packet kproxy drops times out, one it rejects is refused at once, and
              one it does not touch is answered by "sink" (a real network would carry it
              on to whatever owns the address).

Endpoints are identified by the address the endpoint server saw the connection arrive
on (the DNAT target, ``ProbeResult.local``); whether a flow was masqueraded by what the
endpoint saw as the client address (``ProbeResult.peer``): a masqueraded flow shows the
node's address on the endpoint's link (10.0.21.1 / 10.0.22.1), an unmasqueraded one the
client's own address.

Where the kernel path makes a real packet differ from the tracer's model it is said in a
comment; the main one: traffic from the node itself goes through the output hook (nat
output, filter output), not prerouting, and is sent from an address we bind explicitly
(the node IP 192.168.50.1), as the tracer's "sourceIP: testNodeIP" flows assume.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from objects import answered_at, endpoint, endpoint_slice, lb_status, node, service, service_cidr

NODE_IP = "192.168.50.1"
NODE_IP6 = "2001:db8:113::1"
ALT_NODE_IP = "192.168.60.1"  # a second node address (kube-proxy's testNodeIPAlt)
CLUSTER_CIDRS = "10.0.0.0/16,fd00:10::/32"
SERVICE_CIDRS = ("172.30.0.0/16", "fd00:172:30::/112")
NODE_PORTS = (3001, 3002, 3003)
SINK_ROUTES = ("172.30.0.0/16", "192.168.99.0/24", "1.2.3.0/24", "5.6.7.0/24", "9.10.11.0/24")
SINK_ROUTES6 = ("fd00:172:30::/64", "2001:db8:99::/64")


def a(n):
    """Endpoint address n on ep-a (10.0.21.<n+1>): a(1) = 10.0.21.2 ..."""
    return f"10.0.21.{n + 1}"


def b(n):
    """Endpoint address n on ep-b (10.0.22.<n+1>)."""
    return f"10.0.22.{n + 1}"


def a6(n):
    return f"fd00:10:21::{n + 1}"


def b6(n):
    return f"fd00:10:22::{n + 1}"


HTTP = [("http", "TCP", 8080)]  # the endpoint side of a Service port named "http"
P80 = [("p80", "TCP", 8080)]


def the_node(**kw):
    """This node's Node object (primary IPs, zone-a, podCIDR 10.0.3.0/24)."""
    return node(addresses=[NODE_IP, NODE_IP6], zone="zone-a", pod_cidrs=["10.0.3.0/24"], **kw)


def base_objects(service_cidrs=True, node_obj=None):
    return [node_obj or the_node()] + ([service_cidr("kubernetes", *SERVICE_CIDRS)] if service_cidrs else [])


# -- the lab -----------------------------------------------------------------------------

@dataclass
class Client:
    """Where a probe starts: a namespace, the source address it binds (if any) and the
    address an endpoint sees when the flow is not masqueraded."""

    label: str
    ns: object
    addr: str
    addr6: str | None = None
    bind: bool = False  # bind the source address explicitly

    def probe(self, host, port, proto="tcp", count=1, timeout=2.0):
        v6 = ":" in host
        source = (self.addr6 if v6 else self.addr) if self.bind else None
        return self.ns.probe(host, port, proto, count=count, timeout=timeout, source=source)

    def seen_as(self, host):
        return self.addr6 if ":" in host else self.addr


class World:
    """The pods, routes, addresses and listeners above, added to the session cluster."""

    def __init__(self, cluster):
        self.cluster, self.node = cluster, cluster.node
        self.node_listeners = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        cluster = self.cluster
        lab, n = cluster.lab, cluster.node
        self.ep_a = lab.pod("ep-a", "10.0.21.2/24", gw="10.0.21.1/24", v6="fd00:10:21::2/64", gw6="fd00:10:21::1/64")
        self.ep_b = lab.pod("ep-b", "10.0.22.2/24", gw="10.0.22.1/24", v6="fd00:10:22::2/64", gw6="fd00:10:22::1/64")
        self.pc = lab.pod("pc", "10.0.23.2/24", gw="10.0.23.1/24", v6="fd00:10:23::2/64", gw6="fd00:10:23::1/64")
        self.aff = lab.pod("aff", "10.0.24.2/24", gw="10.0.24.1/24")
        self.far = lab.pod("far", "203.0.113.2/24", gw="203.0.113.1/24", v6="2001:db8:113::2/64", gw6=f"{NODE_IP6}/64")
        self.sink = lab.pod("sink", "10.0.30.2/24", gw="10.0.30.1/24", v6="fd00:10:30::2/64", gw6="fd00:10:30::1/64")
        for pod, one, one6 in ((self.ep_a, a, a6), (self.ep_b, b, b6)):
            pod.ip(*[f"addr add {one(i)}/24 dev eth0" for i in range(2, 9)],
                   *[f"addr add {one6(i)}/64 dev eth0 nodad" for i in range(2, 9)])
            pod.serve(8080, "tcp", name=pod.label)
            pod.serve(5353, "udp", name=pod.label)
            pod.serve(9443, "tcp", name=f"{pod.label}/9443")
        self.aff.ip(*[f"addr add 10.0.24.{i}/24 dev eth0" for i in range(3, 22)])
        self.aff_sources = [f"10.0.24.{i}" for i in range(2, 22)]
        self.far.ip("addr add 203.0.113.130/24 dev eth0")
        # The sink owns every address routed to it (AnyIP local routes).
        self.sink.ip(*[f"route add local {p} dev lo" for p in SINK_ROUTES],
                     *[f"route add local {p} dev lo" for p in SINK_ROUTES6])
        for port in (80, 443, 53):
            self.sink.serve(port, "both", name="sink")
        n.ip(*[f"route add {p} via {self.sink.addr}" for p in SINK_ROUTES],
             *[f"route add {p} via {self.sink.addr6}" for p in SINK_ROUTES6])
        n.add_address(f"{ALT_NODE_IP}/32", dev="alt0")
        for port in NODE_PORTS:
            self.node_listeners.append(n.serve(port, "tcp", name="node"))
        ext = cluster.ext
        self.clients = {
            "pod": Client("pod", cluster.client, cluster.client.addr),
            "pc": Client("pc", self.pc, self.pc.addr, self.pc.addr6),
            "node": Client("node", n, NODE_IP, NODE_IP6, bind=True),
            "ext": Client("ext", ext, ext.addr),
            "far": Client("far", self.far, "203.0.113.2", self.far.addr6, bind=True),
            "blocked": Client("blocked", self.far, "203.0.113.130", bind=True),
            # an endpoint calling its own Service (hairpin)
            "hairpin-a1": Client("hairpin-a1", self.ep_a, a(1), bind=True),
            # the node with the kernel's choice of source address (127.0.0.1 for loopback)
            "node-any": Client("node-any", n, NODE_IP),
        }

    def client(self, name):
        return name if isinstance(name, Client) else self.clients[name]

    def gateway_for(self, ip):
        """The node's address on the link of the pod that owns endpoint address ip."""
        addr = ipaddress.ip_address(ip)
        for pod in (self.ep_a, self.ep_b, self.cluster.pod_a, self.cluster.pod_b, self.pc):
            for cidr, gw in ((pod.cidr, pod.gw), (pod.cidr6, pod.gw6)):
                if cidr is not None and addr in cidr.network:
                    return gw
        raise KeyError(ip)

    def close(self):
        """Undo what __init__ did (also after a partial __init__)."""
        n = self.node
        for server in self.node_listeners:
            server.stop()
        n.ip(*[f"route del {p}" for p in SINK_ROUTES], *[f"route del {p}" for p in SINK_ROUTES6], check=False)
        n.ip("link del alt0", check=False)
        for label in ("ep-a", "ep-b", "pc", "aff", "far", "sink"):
            if label in self.cluster.lab.pods:
                self.cluster.lab.remove_pod(label)


@pytest.fixture(scope="module")
def world(cluster):
    w = World(cluster)
    try:
        yield w
    finally:
        w.close()


def drop_kproxy_tables(node):
    """What ``kproxy cleanup`` does (delete the tables kproxy and kproxy-*), in one nft
    call instead of a Python start: this runs twice per test."""
    tables = node.run(["nft", "list", "tables"]).stdout.split("\n")
    doomed = [line.split()[1:3] for line in tables if line.startswith("table ")]
    doomed = [(fam, name) for fam, name in doomed if name == "kproxy" or name.startswith("kproxy-")]
    if doomed:
        node.run(["nft", "-f", "-"], input="".join(f"delete table {fam} {name}\n" for fam, name in doomed))


def flush_conntrack(node):
    """Forget the node's connections. A new connection whose 5-tuple matches a
    conntrack entry that is still around (TIME_WAIT, CLOSE, or a SYN_SENT one from a
    REJECTed attempt) reopens that entry and keeps its old NAT decision instead of
    going through the current rules; with the same client addresses in every test, a
    reused source port would then test an earlier state."""
    node.run(["conntrack", "-F"], check=False)


@pytest.fixture
def env(world):
    """The world, with no kproxy tables and no tracked connections before and after."""
    drop_kproxy_tables(world.node)
    flush_conntrack(world.node)
    yield world
    drop_kproxy_tables(world.node)
    flush_conntrack(world.node)


def sync(world, objects, service_cidrs=True, node_obj=None, **config):
    """``kproxy run --once`` on objects (plus this Node, or ``node_obj``, and unless told
    otherwise the ServiceCIDR object), with the dual-stack clusterCIDR and ``config``."""
    cfg = {"clusterCIDR": CLUSTER_CIDRS, **config}
    proc = world.cluster.sync(base_objects(service_cidrs, node_obj) + list(objects), config=cfg)
    flush_conntrack(world.node)  # the flows that follow are new connections through the new rules
    return proc


# -- flows -------------------------------------------------------------------------------

REJECT, DROP = "REJECT", "DROP"
SINK, NODE = "sink", "node"  # answered by what is behind the address: kproxy left it alone


@dataclass
class Flow:
    """One packet-tracer case: ``expect`` is the set of endpoint addresses that may
    answer (all of them must), or REJECT / DROP, or SINK / NODE (not handled by kproxy)."""

    name: str
    client: str | Client  # a name from World.clients, or a Client
    dest: str
    port: int
    expect: object
    masq: bool | None = None
    proto: str = "tcp"
    count: int | None = None


@dataclass
class Outcome:
    flow: Flow
    problems: list[str] = field(default_factory=list)
    seen: dict = field(default_factory=dict)


def probe_count(n_endpoints):
    # P(one of n uniform endpoints never answers) <= n * (1 - 1/n)**count: 2 -> 2e-6, 3 -> 3e-6
    return {1: 15, 2: 20, 3: 32}.get(n_endpoints, 12 * n_endpoints)


def check_flow(world, flow: Flow) -> Outcome:
    out = Outcome(flow)
    client = world.client(flow.client)
    if flow.expect == REJECT:
        results = client.probe(flow.dest, flow.port, flow.proto, count=flow.count or 2, timeout=3.0)
        out.seen = answered_at(results)
        # "at once": well before the 3 s a DROP would take (generous for a loaded machine)
        if not all(r.outcome == "refused" and r.elapsed < 1.5 for r in results):
            out.problems.append(f"expected REJECT (refused at once), got {[(r.outcome, r.elapsed, r.local) for r in results]}")
        return out
    if flow.expect == DROP:
        results = client.probe(flow.dest, flow.port, flow.proto, count=flow.count or 2, timeout=0.6)
        out.seen = answered_at(results)
        if not all(r.outcome == "timeout" for r in results):
            out.problems.append(f"expected DROP (timeout), got {dict(out.seen)}")
        return out
    if flow.expect in (SINK, NODE):
        results = client.probe(flow.dest, flow.port, flow.proto, count=flow.count or 2, timeout=2.0)
        out.seen = dict(Counter(f"{r.name}@{r.local}" if r.ok else r.outcome for r in results))
        if not all(r.ok and r.name == flow.expect for r in results):
            out.problems.append(f"expected no DNAT (answered by {flow.expect}), got {out.seen}")
        return out
    expected = set(flow.expect)
    # 2 s per attempt: an answer never waits for it, and on a busy machine a SYN may
    # need its retransmission (after 1 s)
    results = client.probe(flow.dest, flow.port, flow.proto, count=flow.count or probe_count(len(expected)), timeout=2.0)
    out.seen = answered_at(results)
    seen = {r.local for r in results if r.ok}
    failed = [r.outcome for r in results if not r.ok]
    if failed:
        out.problems.append(f"{len(failed)} of {len(results)} attempts failed: {sorted(set(failed))}")
    if seen - expected:
        out.problems.append(f"answered by unexpected endpoints {sorted(seen - expected)}")
    if expected - seen:
        out.problems.append(f"expected endpoints never answered: {sorted(expected - seen)}")
    if flow.masq is not None:
        plain = client.seen_as(flow.dest)
        wrong = []
        for r in results:
            if not r.ok or r.local not in expected:
                continue
            want = world.gateway_for(r.local) if flow.masq else plain
            if r.peer != want:
                wrong.append(f"{r.local} saw {r.peer}")
        if wrong:
            what = "masqueraded (endpoint sees the node)" if flow.masq else "not masqueraded (endpoint sees the client)"
            out.problems.append(f"expected {what}: {sorted(set(wrong))}")
    return out


def run_flows(world, flows, workers=6):
    """Run every flow (in parallel) and fail with one line per wrong flow."""
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda f: check_flow(world, f), flows))
    bad = [o for o in outcomes if o.problems]
    if bad:
        lines = [f"{len(bad)} of {len(outcomes)} flows behave unlike kube-proxy:"]
        for o in bad:
            f = o.flow
            who = getattr(f.client, "label", f.client)
            lines.append(f"- {f.name} [{who} -> {f.dest}:{f.port}/{f.proto}]: {'; '.join(o.problems)} (seen {dict(o.seen)})")
        pytest.fail("\n".join(lines), pytrace=False)
    return outcomes


def in_ruleset(world, *needles):
    """Which of needles the node's ruleset mentions."""
    rules = world.cluster.ruleset()
    return [n for n in needles if n in rules]


# -- the lab itself ---------------------------------------------------------------------

def test_lab_without_kproxy_every_address_is_answered_by_what_owns_it(env):
    """Without kproxy's tables, Service addresses reach the sink and NodePorts the node:
    so in the tests below a DROP (timeout) or REJECT is kproxy's doing, and an answer
    from "sink" / "node" means kproxy left the packet alone."""
    run_flows(env, [
        Flow("ClusterIP range", "pod", "172.30.0.50", 80, SINK),
        Flow("ClusterIP range, UDP", "pod", "172.30.0.50", 53, SINK, proto="udp"),
        Flow("externalIP range", "ext", "192.168.99.11", 80, SINK),
        Flow("LB IP", "far", "1.2.3.4", 80, SINK),
        Flow("LB IP from the node", "node", "5.6.7.8", 80, SINK),
        Flow("IPv6 ClusterIP range", "pc", "fd00:172:30::50", 80, SINK),
        Flow("NodePort on the node IP", "ext", NODE_IP, 3001, NODE),
        Flow("NodePort on the alternate node IP", "far", ALT_NODE_IP, 3002, NODE),
        Flow("endpoint directly", "pod", a(1), 8080, {a(1)}, masq=False),
        Flow("IPv6 endpoint directly", "pc", b6(1), 8080, {b6(1)}, masq=False),
    ])


# -- ClusterIP ---------------------------------------------------------------------------

def test_clusterip_general(env):
    """TestClusterIPGeneral: DNAT to the endpoint port of the same NAME, TCP and UDP on
    one port number, several EndpointSlices merged, duplicates counted once, not-ready
    endpoints excluded, REJECT for unserved ports, DROP for unallocated ServiceCIDR IPs."""
    svc2_ports = [("http", "TCP", 80), ("https", "TCP", 443), ("dns-udp", "UDP", 53), ("dns-tcp", "TCP", 53)]
    # endpoint ports listed in another order and with other numbers: the join is by name
    ep_ports = [("dns-tcp", "TCP", 9443), ("dns-udp", "UDP", 5353), ("https", "TCP", 9443), ("http", "TCP", 8080)]
    sync(env, [
        service("svc1", "172.30.0.41", [("http", "TCP", 80)], ns="ns1"),
        endpoint_slice("svc1", [a(1)], HTTP, ns="ns1", name="svc1-1"),
        service("svc2", "172.30.0.42", svc2_ports, ns="ns2"),
        # three slices merged: a(1) and b(1) here, a(2) and a duplicate of a(1) in the
        # second, and a not-ready endpoint in the third
        endpoint_slice("svc2", [a(1), endpoint(b(1), node="node2")], ep_ports, ns="ns2", name="svc2-1"),
        endpoint_slice("svc2", [a(2), a(1)], ep_ports, ns="ns2", name="svc2-2"),
        endpoint_slice("svc2", [endpoint(b(2), ready=False)], ep_ports, ns="ns2", name="svc2-3"),
        # duplicates: a(3) in five slices, b(3) in one. Counted once each, they get half
        # the connections each; counted per copy, b(3) would get a sixth.
        service("dup", "172.30.0.44", [("http", "TCP", 80)], ns="ns2"),
        *[endpoint_slice("dup", [a(3)] + ([b(3)] if i == 0 else []), HTTP, ns="ns2", name=f"dup-{i}") for i in range(5)],
        # the same address ready in one slice and terminating in another (a pod moving
        # between slices, or an IP reused): the non-terminating copy wins, in either order
        service("moved1", "172.30.0.45", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("moved1", [a(4), b(4)], HTTP, ns="ns2", name="moved1-a"),
        endpoint_slice("moved1", [endpoint(a(4), ready=False, serving=True, terminating=True)], HTTP, ns="ns2",
                       name="moved1-b"),
        service("moved2", "172.30.0.46", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("moved2", [endpoint(a(4), ready=False, serving=True, terminating=True)], HTTP, ns="ns2",
                       name="moved2-a"),
        endpoint_slice("moved2", [a(4), b(4)], HTTP, ns="ns2", name="moved2-b"),
        # the endpoint port comes from each endpoint's own slice
        service("ports", "172.30.0.43", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("ports", [a(1)], [("http", "TCP", 8080)], ns="ns2", name="ports-8080"),
        endpoint_slice("ports", [b(1)], [("http", "TCP", 9443)], ns="ns2", name="ports-9443"),
        # an endpoint with several addresses: kube-proxy uses the first
        service("multi", "172.30.0.51", [("http", "TCP", 80)], ns="ns2"),
        {**endpoint_slice("multi", [], HTTP, ns="ns2"), "endpoints": [{"addresses": [a(1), b(1)], "nodeName": "node-1"}]},
        # condition defaults: ready and serving unset mean true, terminating unset false
        service("defaults", "172.30.0.48", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("defaults", [endpoint(a(5), ready=None)], HTTP, ns="ns2"),
        service("defaults-term", "172.30.0.49", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("defaults-term", [endpoint(a(5), ready=False, terminating=True)], HTTP, ns="ns2"),
        # a Service port no slice names has no endpoints
        service("partial", "172.30.0.47", [("http", "TCP", 80), ("metrics", "TCP", 9100)], ns="ns2"),
        endpoint_slice("partial", [a(1)], HTTP + [("metrics", "UDP", 9100)], ns="ns2"),
    ])
    svc2_eps = {a(1), b(1), a(2)}
    run_flows(env, [
        Flow("simple clusterIP", "pod", "172.30.0.41", 80, {a(1)}, masq=False),
        Flow("hairpin to cluster IP", "hairpin-a1", "172.30.0.41", 80, {a(1)}, masq=True),
        Flow("clusterIP with multiple endpoints", "pod", "172.30.0.42", 80, svc2_eps, masq=False),
        Flow("clusterIP with TargetPort (named port 443 -> 9443)", "pod", "172.30.0.42", 443, svc2_eps, masq=False),
        Flow("TCP, UDP on same port (TCP)", "pod", "172.30.0.42", 53, svc2_eps, masq=False),
        Flow("TCP, UDP on same port (UDP)", "pod", "172.30.0.42", 53, svc2_eps, masq=False, proto="udp"),
        Flow("TCP-only port does not match UDP traffic", "pod", "172.30.0.42", 80, REJECT, proto="udp"),
        Flow("svc1 does not accept svc2's ports", "pod", "172.30.0.41", 443, REJECT),
        Flow("packet to unallocated cluster ip", "pod", "172.30.0.50", 80, DROP),
        Flow("ready copy wins over a terminating one (ready first)", "pod", "172.30.0.45", 80, {a(4), b(4)}, masq=False),
        Flow("ready copy wins over a terminating one (terminating first)", "pod", "172.30.0.46", 80, {a(4), b(4)},
             masq=False),
        Flow("port with endpoints", "pod", "172.30.0.47", 80, {a(1)}, masq=False),
        Flow("per-slice endpoint ports", "pod", "172.30.0.43", 80, {a(1), b(1)}, masq=False),
        Flow("first address of an endpoint", "pod", "172.30.0.51", 80, {a(1)}, masq=False),
        Flow("no conditions: ready", "pod", "172.30.0.48", 80, {a(5)}, masq=False),
        Flow("not ready, terminating, serving unset: serving+terminating", "pod", "172.30.0.49", 80, {a(5)}, masq=False),
        Flow("port named by no slice (same name, other protocol): no endpoints", "pod", "172.30.0.47", 9100, REJECT),
    ])
    # the endpoint port is the one named like the Service port: 443 and TCP 53 reach the
    # 9443 servers, 80 the 8080 ones
    client = env.client("pod")
    assert {r.name for r in client.probe("172.30.0.42", 443, count=10)} <= {"ep-a/9443", "ep-b/9443"}
    assert {r.name for r in client.probe("172.30.0.42", 53, count=10)} <= {"ep-a/9443", "ep-b/9443"}
    assert {r.name for r in client.probe("172.30.0.42", 80, count=10)} <= {"ep-a", "ep-b"}
    assert {r.name for r in client.probe("172.30.0.43", 80, count=20)} == {"ep-a", "ep-b/9443"}
    # b(3) gets 50 of 100 on average (sd 5); counted per copy 17 (sd 3.7). Below 30 has
    # probability 2e-5 when right.
    dup = answered_at(client.probe("172.30.0.44", 80, count=100))
    assert set(dup) == {a(3), b(3)} and dup[b(3)] >= 30, f"duplicate endpoint counted more than once: {dup}"


def test_reused_address_prefers_the_non_terminating_copy(env):
    """An address reused by a new, not yet ready pod while the old pod with that address
    still terminates (serving): kube-proxy prefers the non-terminating copy, in either
    slice order; it is not usable, so no endpoint is left and the ClusterIP REJECTs."""
    sync(env, [
        service("reused1", "172.30.0.53", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("reused1", [endpoint(a(4), ready=False, serving=True, terminating=True)], HTTP, ns="ns2",
                       name="reused1-old"),
        endpoint_slice("reused1", [endpoint(a(4), ready=False, serving=False, terminating=False)], HTTP, ns="ns2",
                       name="reused1-new"),
        service("reused2", "172.30.0.54", [("http", "TCP", 80)], ns="ns2"),
        endpoint_slice("reused2", [endpoint(a(4), ready=False, serving=False, terminating=False)], HTTP, ns="ns2",
                       name="reused2-new"),
        endpoint_slice("reused2", [endpoint(a(4), ready=False, serving=True, terminating=True)], HTTP, ns="ns2",
                       name="reused2-old"),
    ])
    run_flows(env, [
        Flow("reused address: terminating copy first", "pod", "172.30.0.53", 80, REJECT),
        Flow("reused address: terminating copy second", "pod", "172.30.0.54", 80, REJECT),
    ])


def test_same_address_with_two_ports_is_two_endpoints(env):
    """kube-proxy keys endpoints on address:port, so one address with two ports (two
    hostNetwork pods on one node behind a named targetPort, say) is two endpoints that
    share the load."""
    sync(env, [service("hostnet", "172.30.0.52", [("http", "TCP", 80)]),
               endpoint_slice("hostnet", [a(1)], [("http", "TCP", 8080)], name="hostnet-1"),
               endpoint_slice("hostnet", [a(1)], [("http", "TCP", 9443)], name="hostnet-2")])
    names = {r.name for r in env.client("pod").probe("172.30.0.52", 80, count=20)}
    assert names == {"ep-a", "ep-a/9443"}, f"endpoints {a(1)}:8080 and {a(1)}:9443 should both answer, got {names}"


def test_no_endpoints_reject(env):
    """TestNoEndpointsReject: a Service without endpoints REJECTs at its ClusterIP,
    externalIP, NodePort and LB IP."""
    sync(env, [service("svc1", "172.30.0.41", [("p80", "TCP", 80, 3001)], ns="ns1", type="LoadBalancer",
                       externalIPs=["192.168.99.11"], status=lb_status("1.2.3.4"))])
    run_flows(env, [
        Flow("pod to cluster IP with no endpoints", "pod", "172.30.0.41", 80, REJECT),
        Flow("external to external IP with no endpoints", "ext", "192.168.99.11", 80, REJECT),
        Flow("pod to NodePort with no endpoints", "pod", NODE_IP, 3001, REJECT),
        Flow("external to NodePort with no endpoints", "ext", NODE_IP, 3001, REJECT),
        Flow("pod to LoadBalancer IP with no endpoints", "pod", "1.2.3.4", 80, REJECT),
        Flow("external to LoadBalancer IP with no endpoints", "ext", "1.2.3.4", 80, REJECT),
        # Not in the tracer: the same from the node itself. Its packets take the output
        # hook (filter output) and, to the NodePort, loop back through input.
        Flow("node to cluster IP with no endpoints", "node", "172.30.0.41", 80, REJECT),
        Flow("node to external IP with no endpoints", "node", "192.168.99.11", 80, REJECT),
        Flow("node to NodePort with no endpoints", "node", NODE_IP, 3001, REJECT),
        Flow("node to LoadBalancer IP with no endpoints", "node", "1.2.3.4", 80, REJECT),
    ])


# -- LoadBalancer, NodePort, externalIPs -------------------------------------------------

def lb_service(name="svc1", cluster_ip="172.30.0.41", node_port=3001, lb_ips=("1.2.3.4",), ns="ns1",
               port_name="p80", **spec):
    return service(name, cluster_ip, [(port_name, "TCP", 80, node_port)], ns=ns, type="LoadBalancer",
                   status=lb_status(*lb_ips) if lb_ips else None, **spec)


def test_load_balancer_ingress_and_source_ranges(env):
    """TestLoadBalancer + TestLoadBalancerIngressRouteTypeProxy: LB IPs work (ipMode VIP
    or unset), an ipMode Proxy ingress gets no rule, loadBalancerSourceRanges DROP other
    sources for the LB IPs only, and the node IP inside a range lets the node in."""
    status = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "5.6.7.8", "ipMode": "VIP"},
                                           {"ip": "9.10.11.12", "ipMode": "Proxy"}]}}
    sync(env, [
        service("svc1", "172.30.0.41", [("p80", "TCP", 80, 3001)], ns="ns1", type="LoadBalancer", status=status,
                # the node IP is in the first range; whitespace must be tolerated
                loadBalancerSourceRanges=["192.168.50.0/24", " 203.0.113.0/25"], externalIPs=["192.168.99.11"]),
        endpoint_slice("svc1", [endpoint(a(1), node=None)], P80, ns="ns1"),
        # the node IP in no range: the node is a source like any other
        service("svc2", "172.30.0.42", [("p80", "TCP", 80, 3002)], ns="ns1", type="LoadBalancer",
                status=lb_status("1.2.3.42"), loadBalancerSourceRanges=["203.0.113.0/25"]),
        endpoint_slice("svc2", [endpoint(b(1), node=None)], P80, ns="ns1"),
    ])
    ep = {a(1)}
    run_flows(env, [
        Flow("pod to cluster IP", "pod", "172.30.0.41", 80, ep, masq=False),
        Flow("external to nodePort", "far", NODE_IP, 3001, ep, masq=True),
        Flow("nodePort bypasses LoadBalancerSourceRanges", "blocked", NODE_IP, 3001, ep, masq=True),
        Flow("accepted external to LB1", "far", "1.2.3.4", 80, ep, masq=True),
        Flow("accepted external to LB2", "far", "5.6.7.8", 80, ep, masq=True),
        Flow("blocked external to LB1", "blocked", "1.2.3.4", 80, DROP),
        Flow("blocked external to LB2", "blocked", "5.6.7.8", 80, DROP),
        Flow("pod to LB1 (blocked by LoadBalancerSourceRanges)", "pod", "1.2.3.4", 80, DROP),
        Flow("pod to LB2 (blocked by LoadBalancerSourceRanges)", "pod", "5.6.7.8", 80, DROP),
        # node traffic takes the output hook: filter-output-pre-dnat, then nat output
        Flow("node to LB1 (allowed by LoadBalancerSourceRanges)", "node", "1.2.3.4", 80, ep, masq=True),
        Flow("node to LB2 (allowed by LoadBalancerSourceRanges)", "node", "5.6.7.8", 80, ep, masq=True),
        # not in the tracer: source ranges apply neither to the ClusterIP nor to externalIPs
        Flow("blocked external to cluster IP", "blocked", "172.30.0.41", 80, ep, masq=True),
        Flow("blocked external to external IP", "blocked", "192.168.99.11", 80, ep, masq=True),
        Flow("node to LB, node IP in no range", "node", "1.2.3.42", 80, DROP),
        Flow("accepted external to LB, node IP in no range", "far", "1.2.3.42", 80, {b(1)}, masq=True),
        # TestLoadBalancerIngressRouteTypeProxy: no rule, the packet goes on to the LB
        Flow("external to ipMode Proxy ingress", "far", "9.10.11.12", 80, SINK),
        Flow("pod to ipMode Proxy ingress", "pod", "9.10.11.12", 80, SINK),
    ])
    # "same node to LB1, SNATted to LB1 (implicitly allowed)": the tracer assumes something
    # outside kube-proxy makes node->LB traffic come from the LB IP. Here the node owns
    # 1.2.3.4 (as with an L2 LB announcer) and sends from it.
    env.node.ip("addr add 1.2.3.4/32 dev alt0")
    try:
        run_flows(env, [Flow("same node to LB1, from LB1", Client("node-as-lb1", env.node, "1.2.3.4", bind=True),
                             "1.2.3.4", 80, ep, masq=True)])
    finally:
        env.node.ip("addr del 1.2.3.4/32 dev alt0")


NODEPORT_CASES = {
    # nodePortAddresses -> node addresses that must accept NodePorts / must not
    "primary": (None, [NODE_IP], [ALT_NODE_IP, "10.0.3.1"]),
    # a loopback CIDR in the list is ignored (kube-proxy drops loopback addresses with an error)
    "cidr-list": (["127.0.0.0/8", "192.168.50.0/24", "192.168.60.0/24", "2001:db8:113::/64"], [NODE_IP, ALT_NODE_IP],
                  ["10.0.3.1"]),
    "match-all": (["0.0.0.0/0", "::/0"], [NODE_IP, ALT_NODE_IP, "10.0.3.1"], []),
}


@pytest.mark.parametrize("case", list(NODEPORT_CASES))
def test_nodeports(env, case):
    """TestNodePorts: NodePorts on the addresses nodePortAddresses selects (default
    "primary": the Node object's InternalIP), for IPv4 and IPv6, masqueraded; an
    address not selected is not DNATed (the node's own listener answers)."""
    cidrs, accepting, refusing = NODEPORT_CASES[case]
    sync(env, [
        service("svc1", ["172.30.0.41", "fd00:172:30::41"], [("p80", "TCP", 80, 3001)], ns="ns1", type="NodePort",
                ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack"),
        endpoint_slice("svc1", [endpoint(a(1), node=None), b(1)], P80, ns="ns1", name="svc1-v4"),
        endpoint_slice("svc1", [endpoint(a6(1), node=None), b6(1)], P80, ns="ns1", name="svc1-v6", address_type="IPv6"),
    ], **({"nodePortAddresses": cidrs} if cidrs else {}))
    eps, eps6 = {a(1), b(1)}, {a6(1), b6(1)}
    flows = [
        Flow("pod to cluster IP", "pod", "172.30.0.41", 80, eps, masq=False),
        Flow("node to nodePort", "node", NODE_IP, 3001, eps, masq=True),
        Flow("pod to nodePort", "pod", NODE_IP, 3001, eps, masq=True),
        Flow("external to nodePort (IPv6)", "far", NODE_IP6, 3001, eps6, masq=True),
    ]
    # the external client reaches every node address through the node (its gateway)
    flows += [Flow(f"external to nodePort on {ip}", "far", ip, 3001, eps, masq=True) for ip in accepting]
    flows += [Flow(f"{ip} ignores NodePorts", "far", ip, 3001, NODE) for ip in refusing]
    if case != "primary":
        # loopback is never a NodePort address (kube-proxy: "ip daddr != 127.0.0.0/8")
        flows.append(Flow("node to nodePort on 127.0.0.1", "node-any", "127.0.0.1", 3001, NODE))
    run_flows(env, flows)


def etp_service(policy, name="svc1", cluster_ip="172.30.0.41"):
    return lb_service(name, cluster_ip, externalIPs=["192.168.99.11"], externalTrafficPolicy=policy,
                      healthCheckNodePort=30000 if policy == "Local" else 0)


def test_external_traffic_policy_local(env):
    """TestExternalTrafficPolicyLocal (+ the eTP:Local rows of TestInternalExternalMasquerade
    and TestOverallNFTablesRules' svc2): external clients reach only local endpoints,
    unmasqueraded; pods are short-circuited to all endpoints, unmasqueraded; the node
    is masqueraded and short-circuited; without a local endpoint external traffic is
    DROPped."""
    # a(1) has no nodeName (not local), b(1) is on this node
    sync(env, [etp_service("Local"), endpoint_slice("svc1", [endpoint(a(1), node=None), b(1)], P80, ns="ns1")])
    both, local = {a(1), b(1)}, {b(1)}
    run_flows(env, [
        Flow("pod to cluster IP hits both endpoints, unmasqueraded", "pod", "172.30.0.41", 80, both, masq=False),
        Flow("pod to external IP hits both endpoints, unmasqueraded", "pod", "192.168.99.11", 80, both, masq=False),
        Flow("external to external IP hits only local endpoint, unmasqueraded", "ext", "192.168.99.11", 80, local, masq=False),
        Flow("pod to LB IP hits only both endpoints, unmasqueraded", "pod", "1.2.3.4", 80, both, masq=False),
        Flow("external to LB IP hits only local endpoint, unmasqueraded", "ext", "1.2.3.4", 80, local, masq=False),
        Flow("pod to NodePort hits both endpoints, unmasqueraded", "pod", NODE_IP, 3001, both, masq=False),
        Flow("external to NodePort hits only local endpoint, unmasqueraded", "ext", NODE_IP, 3001, local, masq=False),
        # node traffic (output hook; "fib saddr type local") is masqueraded and short-circuited
        Flow("node to LB IP", "node", "1.2.3.4", 80, both, masq=True),
        Flow("node to NodePort", "node", NODE_IP, 3001, both, masq=True),
        Flow("node to external IP", "node", "192.168.99.11", 80, both, masq=True),
    ])
    # Only a remote endpoint left: external traffic is dropped (no-endpoint-* "drop"),
    # pods and the node still get short-circuited to it.
    sync(env, [etp_service("Local"), endpoint_slice("svc1", [endpoint(a(1), node="node-2")], P80, ns="ns1")])
    remote = {a(1)}
    run_flows(env, [
        Flow("external to external IP, no local endpoint", "ext", "192.168.99.11", 80, DROP),
        Flow("external to LB IP, no local endpoint", "ext", "1.2.3.4", 80, DROP),
        Flow("external to NodePort, no local endpoint", "ext", NODE_IP, 3001, DROP),
        Flow("pod to cluster IP", "pod", "172.30.0.41", 80, remote, masq=False),
        Flow("pod to LB IP, short-circuited", "pod", "1.2.3.4", 80, remote, masq=False),
        Flow("pod to NodePort, short-circuited", "pod", NODE_IP, 3001, remote, masq=False),
        Flow("node to LB IP, short-circuited", "node", "1.2.3.4", 80, remote, masq=True),
        Flow("node to NodePort, short-circuited", "node", NODE_IP, 3001, remote, masq=True),
    ])


def test_external_traffic_policy_cluster(env):
    """TestExternalTrafficPolicyCluster: every external destination is masqueraded and
    reaches all endpoints; the ClusterIP is not masqueraded for pods."""
    sync(env, [etp_service("Cluster"), endpoint_slice("svc1", [endpoint(a(1), node=None), b(1)], P80, ns="ns1")])
    both = {a(1), b(1)}
    run_flows(env, [
        Flow("pod to cluster IP hits both endpoints, unmasqueraded", "pod", "172.30.0.41", 80, both, masq=False),
        Flow("pod to external IP hits both endpoints, masqueraded", "pod", "192.168.99.11", 80, both, masq=True),
        Flow("external to external IP hits both endpoints, masqueraded", "ext", "192.168.99.11", 80, both, masq=True),
        Flow("pod to LB IP hits both endpoints, masqueraded", "pod", "1.2.3.4", 80, both, masq=True),
        Flow("external to LB IP hits both endpoints, masqueraded", "ext", "1.2.3.4", 80, both, masq=True),
        Flow("pod to NodePort hits both endpoints, masqueraded", "pod", NODE_IP, 3001, both, masq=True),
        Flow("external to NodePort hits both endpoints, masqueraded", "ext", NODE_IP, 3001, both, masq=True),
    ])


def test_node_originated_traffic(env):
    """Traffic from the node itself takes the output hook (nat output, filter output) to
    ClusterIPs, NodePorts, LB IPs and externalIPs, TCP and UDP; it is masqueraded (the
    node IP is outside the clusterCIDR). Not a tracer test of its own: the tracer models
    these flows as "sourceIP: testNodeIP" through the same chains."""
    sync(env, [
        service("svc1", "172.30.0.41", [("p80", "TCP", 80, 3001), ("dns", "UDP", 53, 3002)], ns="ns1",
                type="LoadBalancer", externalIPs=["192.168.99.11"], status=lb_status("1.2.3.4")),
        endpoint_slice("svc1", [a(1), endpoint(b(1), node="node-2")], P80 + [("dns", "UDP", 5353)], ns="ns1"),
    ])
    both = {a(1), b(1)}
    flows = []
    for dest, port, what in (("172.30.0.41", 80, "cluster IP"), (NODE_IP, 3001, "NodePort"),
                             ("1.2.3.4", 80, "LB IP"), ("192.168.99.11", 80, "external IP")):
        flows.append(Flow(f"node to {what}", "node", dest, port, both, masq=True))
        flows.append(Flow(f"node to {what}, kernel-chosen source", "node-any", dest, port, both))
    for dest, port, what in (("172.30.0.41", 53, "cluster IP"), (NODE_IP, 3002, "NodePort"),
                             ("1.2.3.4", 53, "LB IP"), ("192.168.99.11", 53, "external IP")):
        flows.append(Flow(f"node to {what} (UDP)", "node", dest, port, both, masq=True, proto="udp"))
    flows.append(Flow("node to an unserved port of the cluster IP", "node", "172.30.0.41", 81, REJECT))
    flows.append(Flow("node to an unallocated cluster IP", "node", "172.30.0.50", 80, DROP))
    run_flows(env, flows)


# -- masquerading ------------------------------------------------------------------------

def masquerade_objects():
    """TestInternalExternalMasquerade's Services: svc1 plain, svc2 eTP:Local, svc3 iTP:Local;
    each with a local endpoint (on ep-a) and a remote one (on ep-b)."""
    objs = []
    for i, extra in ((1, {}), (2, {"externalTrafficPolicy": "Local", "healthCheckNodePort": 30002}),
                     (3, {"internalTrafficPolicy": "Local"})):
        lb_ip = ("1.2.3.4", "5.6.7.8", "9.10.11.12")[i - 1]
        objs.append(lb_service(f"svc{i}", f"172.30.0.4{i}", 3000 + i, (lb_ip,), ns=f"ns{i}", **extra))
        objs.append(endpoint_slice(f"svc{i}", [a(i), endpoint(b(i), node="remote")], P80, ns=f"ns{i}"))
    return objs


def masquerade_flows():
    """The tracer's flows, with the outcome for a working detector without masqueradeAll."""
    e1, e2, e3 = {a(1), b(1)}, {a(2), b(2)}, {a(3), b(3)}
    return [
        Flow("pod to ClusterIP", "pod", "172.30.0.41", 80, e1, masq=False),
        Flow("pod to NodePort", "pod", NODE_IP, 3001, e1, masq=True),
        Flow("pod to LB", "pod", "1.2.3.4", 80, e1, masq=True),
        Flow("node to ClusterIP", "node", "172.30.0.41", 80, e1, masq=True),
        Flow("node to NodePort", "node", NODE_IP, 3001, e1, masq=True),
        Flow("node to LB", "node", "1.2.3.4", 80, e1, masq=True),
        Flow("external to ClusterIP", "ext", "172.30.0.41", 80, e1, masq=True),
        Flow("external to NodePort", "ext", NODE_IP, 3001, e1, masq=True),
        Flow("external to LB", "ext", "1.2.3.4", 80, e1, masq=True),
        Flow("pod to ClusterIP with eTP:Local", "pod", "172.30.0.42", 80, e2, masq=False),
        Flow("pod to NodePort with eTP:Local", "pod", NODE_IP, 3002, e2, masq=False),
        Flow("pod to LB with eTP:Local", "pod", "5.6.7.8", 80, e2, masq=False),
        Flow("node to ClusterIP with eTP:Local", "node", "172.30.0.42", 80, e2, masq=True),
        # The tracer's case uses port 3001 here (svc1's NodePort, so it duplicates "node
        # to NodePort"); its comment says it means svc2's, which is what we send to.
        Flow("node to NodePort with eTP:Local", "node", NODE_IP, 3002, e2, masq=True),
        Flow("node to LB with eTP:Local", "node", "5.6.7.8", 80, e2, masq=True),
        Flow("external to ClusterIP with eTP:Local", "ext", "172.30.0.42", 80, e2, masq=True),
        Flow("external to NodePort with eTP:Local", "ext", NODE_IP, 3002, {a(2)}, masq=False),
        Flow("external to LB with eTP:Local", "ext", "5.6.7.8", 80, {a(2)}, masq=False),
        Flow("pod to ClusterIP with iTP:Local", "pod", "172.30.0.43", 80, {a(3)}, masq=False),
        Flow("pod to NodePort with iTP:Local", "pod", NODE_IP, 3003, e3, masq=True),
        Flow("pod to LB with iTP:Local", "pod", "9.10.11.12", 80, e3, masq=True),
        Flow("node to ClusterIP with iTP:Local", "node", "172.30.0.43", 80, {a(3)}, masq=True),
        Flow("node to NodePort with iTP:Local", "node", NODE_IP, 3003, e3, masq=True),
        Flow("node to LB with iTP:Local", "node", "9.10.11.12", 80, e3, masq=True),
        Flow("external to ClusterIP with iTP:Local", "ext", "172.30.0.43", 80, {a(3)}, masq=True),
        Flow("external to NodePort with iTP:Local", "ext", NODE_IP, 3003, e3, masq=True),
        Flow("external to LB with iTP:Local", "ext", "9.10.11.12", 80, e3, masq=True),
    ]


_no_masq = {"masq": False}
_masq = {"masq": True}
MASQUERADE_CASES = {
    # name: (config, {flow name: overrides})
    "base": ({}, {}),
    "no-detector": ({"clusterCIDR": ""}, {
        # all traffic to a ClusterIP is assumed to come from a pod: not masqueraded
        "node to ClusterIP": _no_masq, "node to ClusterIP with eTP:Local": _no_masq,
        "node to ClusterIP with iTP:Local": _no_masq, "external to ClusterIP": _no_masq,
        "external to ClusterIP with eTP:Local": _no_masq, "external to ClusterIP with iTP:Local": _no_masq,
        # and no eTP:Local short-circuit for pods: they get only the local endpoints
        "pod to NodePort with eTP:Local": {"expect": {a(2)}}, "pod to LB with eTP:Local": {"expect": {a(2)}},
    }),
    "masquerade-all": ({"nftables": {"masqueradeAll": True}}, {
        "pod to ClusterIP": _masq, "pod to ClusterIP with eTP:Local": _masq, "pod to ClusterIP with iTP:Local": _masq,
    }),
    "masquerade-all-no-detector": ({"nftables": {"masqueradeAll": True}, "clusterCIDR": ""}, {
        "pod to ClusterIP": _masq, "pod to ClusterIP with eTP:Local": _masq, "pod to ClusterIP with iTP:Local": _masq,
        "pod to NodePort with eTP:Local": {"expect": {a(2)}}, "pod to LB with eTP:Local": {"expect": {a(2)}},
    }),
}


@pytest.mark.parametrize("case", list(MASQUERADE_CASES))
def test_internal_external_masquerade(env, case):
    """TestInternalExternalMasquerade: which flows are masqueraded and which endpoints
    they reach, for pod / node / external clients to ClusterIP, NodePort and LB IP of a
    plain, an eTP:Local and an iTP:Local Service; with and without a local-traffic
    detector and masqueradeAll."""
    config, overrides = MASQUERADE_CASES[case]
    sync(env, masquerade_objects(), **config)
    flows = masquerade_flows()
    assert set(overrides) <= {f.name for f in flows}
    for f in flows:
        for attr, value in overrides.get(f.name, {}).items():
            setattr(f, attr, value)
    run_flows(env, flows)


# -- endpoint selection ------------------------------------------------------------------

UNNAMED = [("", "TCP", 8080)]


def unnamed_service(name, cluster_ip, ns="ns1", **spec):
    return service(name, cluster_ip, [("", "TCP", 80)], ns=ns, **spec)


def test_internal_traffic_policy(env):
    """TestInternalTrafficPolicy (its four cases as four Services, unnamed ports):
    iTP Local sends ClusterIP traffic only to local endpoints, DROPs it when endpoints
    exist only elsewhere, and REJECTs it once the endpoints are gone."""
    cases = {  # name: (clusterIP, internalTrafficPolicy, endpoint nodes, expected)
        "itp-cluster": ("172.30.1.1", "Cluster", ["node-1", "node-2", "node-3"], {a(1), a(2), a(3)}),
        "itp-local-one": ("172.30.1.2", "Local", ["node-1", "node-2", "node-3"], {a(1)}),
        "itp-local-many": ("172.30.1.3", "Local", ["node-1", "node-1", "node-3"], {a(1), a(2)}),
        "itp-local-none": ("172.30.1.4", "Local", ["node-0", "node-2", "node-3"], DROP),
    }
    services = [unnamed_service(n, ip, internalTrafficPolicy=policy) for n, (ip, policy, _, _) in cases.items()]
    slices = [endpoint_slice(n, [endpoint(a(i + 1), node=nd) for i, nd in enumerate(nodes)], UNNAMED, ns="ns1")
              for n, (_, _, nodes, _) in cases.items()]
    # not in the tracer: Local policy falls back to the local serving+terminating endpoint,
    # even though a ready one exists on another node
    services.append(unnamed_service("itp-local-terminating", "172.30.1.5", internalTrafficPolicy="Local"))
    slices.append(endpoint_slice("itp-local-terminating", [cond(a(1), "serving-terminating"), cond(a(2), "ready", "node-2")],
                                 UNNAMED, ns="ns1"))
    cases["itp-local-terminating"] = ("172.30.1.5", "Local", None, {a(1)})
    sync(env, services + slices)
    run_flows(env, [Flow(f"{n}: pod to ClusterIP", "pod", ip, 80, want, masq=None if want == DROP else False)
                    for n, (ip, _, _, want) in cases.items()])
    sync(env, services)  # endpoints deleted
    run_flows(env, [Flow(f"{n}: endpoints deleted", "pod", ip, 80, REJECT) for n, (ip, _, _, _) in cases.items()])


def cond(ip, state, node="node-1"):
    """An endpoint in one of the tracer's condition combinations."""
    ready, serving, terminating = {"ready": (True, True, False), "serving-terminating": (False, True, True),
                                   "terminating": (False, False, True)}[state]
    return endpoint(ip, ready=ready, serving=serving, terminating=terminating, node=node)


# kube-proxy's 10.0.1.1-4 are on this node (a(1)-a(4)); 10.0.1.5 is on another (b(1)).
TERMINATING_CASES = {
    "ready endpoints exist": [cond(a(1), "ready"), cond(a(2), "ready"), cond(a(3), "serving-terminating"),
                              cond(a(4), "terminating"), cond(b(1), "ready", "node-2")],
    "only terminating endpoints exist": [cond(a(2), "serving-terminating"), cond(a(3), "serving-terminating"),
                                         cond(a(4), "terminating"), cond(b(1), "ready", "node-2")],
    "terminating endpoints on remote node": [cond(b(1), "serving-terminating", "node-2")],
    "no usable endpoints on any node": [cond(b(1), "terminating"), cond(b(1), "terminating", "node-2")],
}
# policy -> case -> (pod to ClusterIP, external to LB, masq of external to LB)
TERMINATING_EXPECT = {
    "Local": {
        "ready endpoints exist": ({a(1), a(2), b(1)}, {a(1), a(2)}, False),
        "only terminating endpoints exist": ({b(1)}, {a(2), a(3)}, False),
        "terminating endpoints on remote node": ({b(1)}, DROP, None),
        "no usable endpoints on any node": (REJECT, REJECT, None),
    },
    "Cluster": {
        "ready endpoints exist": ({a(1), a(2), b(1)}, {a(1), a(2), b(1)}, True),
        "only terminating endpoints exist": ({a(2), a(3), b(1)}, {a(2), a(3), b(1)}, True),
        "terminating endpoints on remote node": ({b(1)}, {b(1)}, True),
        "no usable endpoints on any node": (REJECT, REJECT, None),
    },
}


@pytest.mark.parametrize("policy", ["Local", "Cluster"])
def test_terminating_endpoints(env, policy):
    """TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster (each case as its own
    Service): ready endpoints first; with none ready, serving+terminating ones (cluster-wide
    for Cluster policy, local ones for Local policy); endpoints neither ready nor
    serving+terminating are never used. REJECT once the endpoints are deleted.

    The Cluster cases have the tracer's Cluster-test endpoints: in "ready endpoints
    exist" and "only terminating endpoints exist" 10.0.1.3-5 are on another node."""
    cases = dict(TERMINATING_CASES)
    if policy == "Cluster":
        cases["ready endpoints exist"] = [cond(a(1), "ready"), cond(a(2), "ready"),
                                          cond(a(3), "serving-terminating", "another-node"),
                                          cond(a(4), "terminating", "another-node"), cond(b(1), "ready", "another-node")]
        cases["only terminating endpoints exist"] = [cond(a(2), "serving-terminating"), cond(a(3), "serving-terminating"),
                                                     cond(a(4), "terminating", "another-node"),
                                                     cond(b(1), "serving-terminating", "another-node")]
    services, slices, flows, gone = [], [], [], []
    for i, (case, eps) in enumerate(cases.items(), start=1):
        name, cip, lb = f"svc{i}", f"172.30.1.{i}", f"1.2.3.{i}"
        services.append(service(name, cip, [("", "TCP", 80, 3000 + i)], ns="ns1", type="LoadBalancer",
                                externalTrafficPolicy=policy, status=lb_status(lb)))
        slices.append(endpoint_slice(name, eps, UNNAMED, ns="ns1"))
        to_cip, to_lb, lb_masq = TERMINATING_EXPECT[policy][case]
        flows.append(Flow(f"{case}: pod to clusterIP", "pod", cip, 80, to_cip, masq=None if to_cip == REJECT else False))
        flows.append(Flow(f"{case}: external to LB", "ext", lb, 80, to_lb, masq=lb_masq))
        gone += [Flow(f"{case}: pod to clusterIP after endpoints deleted", "pod", cip, 80, REJECT),
                 Flow(f"{case}: external to LB after endpoints deleted", "ext", lb, 80, REJECT)]
    sync(env, services + slices)
    run_flows(env, flows)
    sync(env, services)
    run_flows(env, gone)


def test_topology_hints(env):
    """Topology hints filter Cluster-policy endpoints: zone hints against the Node's
    topology.kubernetes.io/zone label (zone-a), node hints against this node's name
    (preferred when every ready endpoint has them); hints are ignored when some ready
    endpoint has none, when none matches, for Local policy, and for the terminating
    fallback."""
    def z(ip, *zones, **kw):
        return endpoint(ip, for_zones=list(zones), **kw)
    cases = {  # name: (endpoints, expected endpoints, Service spec)
        "zone hints": ([z(a(1), "zone-a"), z(b(1), "zone-b"), z(a(2), "zone-c", "zone-a")], {a(1), a(2)}, {}),
        "node hints win over zone hints": ([endpoint(a(1), for_nodes=["node-1"], for_zones=["zone-b"]),
                                            endpoint(b(1), for_nodes=["node-2"], for_zones=["zone-a"])], {a(1)}, {}),
        "node hints for other nodes only: zone hints": ([endpoint(a(1), for_nodes=["node-2"], for_zones=["zone-b"]),
                                                         endpoint(b(1), for_nodes=["node-3"], for_zones=["zone-a"])],
                                                        {b(1)}, {}),
        "incomplete hints": ([z(a(1), "zone-a"), endpoint(b(1))], {a(1), b(1)}, {}),
        "no hint for this zone": ([z(a(1), "zone-b"), z(b(1), "zone-c")], {a(1), b(1)}, {}),
        "not-ready endpoints do not count": ([z(a(1), "zone-a"), z(b(1), "zone-b"), endpoint(a(2), ready=False)],
                                             {a(1)}, {}),
        "Local policy is not filtered": ([z(a(1), "zone-b"), z(b(1), "zone-a", node="node-2")], {a(1)},
                                         {"internalTrafficPolicy": "Local"}),
        "terminating fallback is not filtered": ([z(a(1), "zone-b", ready=False, serving=True, terminating=True),
                                                  z(b(1), "zone-a", ready=False, serving=True, terminating=True)],
                                                 {a(1), b(1)}, {}),
    }
    objs, flows = [], []
    for i, (case, (eps, want, spec)) in enumerate(cases.items(), start=1):
        objs += [service(f"topo{i}", f"172.30.2.{i}", [("http", "TCP", 80)], **spec),
                 endpoint_slice(f"topo{i}", eps, HTTP)]
        flows.append(Flow(case, "pod", f"172.30.2.{i}", 80, want, masq=False))
    sync(env, objs)
    run_flows(env, flows)


def test_topology_hints_empty_list_means_no_hints(env):
    """kube-proxy treats an endpoint whose forZones list is empty like one without hints
    (it only reads non-empty hint lists), so the hints are incomplete and every endpoint
    is used."""
    sync(env, [service("topo", "172.30.2.1", [("http", "TCP", 80)]),
               endpoint_slice("topo", [endpoint(a(1), for_zones=["zone-a"]), endpoint(b(1), for_zones=[])], HTTP)])
    run_flows(env, [Flow("incomplete hints (empty forZones)", "pod", "172.30.2.1", 80, {a(1), b(1)}, masq=False)])


AFFINITY_SERVICES = [
    service("sticky", "172.30.0.81", [("p80", "TCP", 80, 3001), ("dns", "UDP", 53)], ns="ns1",
            type="LoadBalancer", status=lb_status("1.2.3.81"), sessionAffinity="ClientIP"),
    service("short", "172.30.0.82", [("p80", "TCP", 80)], ns="ns1", sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 3}}),
    endpoint_slice("sticky", [a(1), b(1)], P80 + [("dns", "UDP", 5353)], ns="ns1"),
    endpoint_slice("short", [a(2), b(2)], P80, ns="ns1"),
]


def affinity_picks(env, dest, port, count=4, sources=None):
    """The endpoint each affinity source lands on over ``count`` connections to
    dest:port (asserting that each source stays on one endpoint)."""
    clients = [Client(f"aff-{ip}", env.aff, ip, bind=True) for ip in (sources or env.aff_sources)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda c: answered_at(c.probe(dest, port, count=count)), clients))
    not_sticky = {c.addr: dict(r) for c, r in zip(clients, results) if len(r) != 1 or sum(r.values()) != count
                  or not set(r) <= {a(1), b(1), a(2), b(2)}}
    assert not not_sticky, f"{dest}:{port}: clients not sticky to one endpoint: {not_sticky}"
    return {c.addr: next(iter(r)) for c, r in zip(clients, results)}


def test_session_affinity(env):
    """sessionAffinity ClientIP (timeoutSeconds default 10800, and 3): a client keeps its
    endpoint over many connections (TCP and UDP), different clients are spread over the
    endpoints, and after timeoutSeconds without a new connection the next one is a fresh
    random pick."""
    sync(env, AFFINITY_SERVICES)
    pod = env.client("pod")
    first = answered_at(pod.probe("172.30.0.81", 80, count=20))
    assert len(first) == 1 and set(first) <= {a(1), b(1)}, f"not sticky: {first}"
    udp = answered_at(pod.probe("172.30.0.81", 53, proto="udp", count=15))
    assert len(udp) == 1 and set(udp) <= {a(1), b(1)}, f"UDP not sticky: {udp}"

    sources = env.aff_sources[:16]
    long1 = affinity_picks(env, "172.30.0.81", 80, sources=sources)
    short1 = affinity_picks(env, "172.30.0.82", 80, sources=sources)
    # 16 clients all on one endpoint: probability 2**-15 with a uniform first pick
    assert set(long1.values()) == {a(1), b(1)} and set(short1.values()) == {a(2), b(2)}, (long1, short1)
    time.sleep(4.5)  # > timeoutSeconds of "short" since each client's last connection
    short2 = affinity_picks(env, "172.30.0.82", 80, sources=sources)
    long2 = affinity_picks(env, "172.30.0.81", 80, sources=sources[:8])
    assert long2 == {ip: long1[ip] for ip in sources[:8]}, "affinity (10800 s) lost after 4.5 s"
    changed = [ip for ip in short1 if short1[ip] != short2[ip]]
    # After expiry each client gets a new random pick: about half change endpoint. None
    # changing has probability 2**-16 (and means the 3 s timeout did not apply).
    assert changed, f"no client changed endpoint after its 3 s affinity expired: {short2}"


def test_session_affinity_covers_every_address_of_the_service_port(env):
    """kube-proxy keeps ClientIP affinity per (client, Service port): the affinity sets
    belong to the endpoint chains, and the ClusterIP, the LB IP and the NodePort all
    go through the same Service chain (eTP Cluster). A client that landed on an endpoint
    through the ClusterIP lands there again through the LB IP and the NodePort."""
    sync(env, AFFINITY_SERVICES)
    sources = env.aff_sources[:12]
    via_cip = affinity_picks(env, "172.30.0.81", 80, count=2, sources=sources)
    via_lb = affinity_picks(env, "1.2.3.81", 80, count=2, sources=sources)
    via_np = affinity_picks(env, NODE_IP, 3001, count=2, sources=sources)
    # independent picks per address would agree for all 12 clients with probability 4**-12
    differ = {ip: (via_cip[ip], via_lb[ip], via_np[ip]) for ip in sources if not via_cip[ip] == via_lb[ip] == via_np[ip]}
    assert not differ, f"clients got other endpoints through the LB IP / NodePort than through the ClusterIP: {differ}"


def test_session_affinity_only_moves_the_clients_of_a_removed_endpoint(env):
    """kube-proxy deletes a removed endpoint's affinity set with its chain: that
    endpoint's clients get a new pick, every other client keeps its endpoint (and a
    removed endpoint is never reached through a remembered affinity)."""
    svc = service("sticky", "172.30.0.81", [("p80", "TCP", 80)], ns="ns1", sessionAffinity="ClientIP")
    sync(env, [svc, endpoint_slice("sticky", [a(1), b(1)], P80, ns="ns1")])
    sources = env.aff_sources[:16]
    before = affinity_picks(env, "172.30.0.81", 80, count=2, sources=sources)
    assert set(before.values()) == {a(1), b(1)}, before  # all on one endpoint: p = 2**-15
    sync(env, [svc, endpoint_slice("sticky", [a(1), b(2)], P80, ns="ns1")])  # b(1) replaced by b(2)
    after = affinity_picks(env, "172.30.0.81", 80, count=2, sources=sources)
    kept = {ip: after[ip] for ip in sources if before[ip] == a(1)}
    assert kept == {ip: a(1) for ip in kept}, f"clients of the remaining endpoint lost their affinity: {kept}"
    moved = {ip: after[ip] for ip in sources if before[ip] == b(1)}
    assert set(moved.values()) <= {a(1), b(2)}, f"clients still sent to the removed endpoint: {moved}"


def test_session_affinity_with_external_policy_local_stays_local(env):
    """eTP Local with affinity: an external client that the ClusterIP keeps on a remote
    endpoint still reaches only local endpoints through the LB IP and the NodePort
    (kube-proxy's local Service chain checks only the local endpoints' affinity sets),
    and its ClusterIP affinity is not disturbed by that."""
    svc = service("sticky", "172.30.0.81", [("p80", "TCP", 80, 3001)], ns="ns1", type="LoadBalancer",
                  status=lb_status("1.2.3.81"), externalTrafficPolicy="Local", sessionAffinity="ClientIP")
    remote = endpoint(b(1), node="node-2")
    sync(env, [svc, endpoint_slice("sticky", [remote], P80, ns="ns1")])
    far = env.client("far")
    assert answered_at(far.probe("172.30.0.81", 80, count=3)) == {b(1): 3}
    sync(env, [svc, endpoint_slice("sticky", [remote, endpoint(a(1))], P80, ns="ns1")])  # a(1) is local
    assert answered_at(far.probe("172.30.0.81", 80, count=4)) == {b(1): 4}, "ClusterIP affinity lost"
    assert answered_at(far.probe("1.2.3.81", 80, count=4)) == {a(1): 4}, "LB IP left the node"
    assert answered_at(far.probe(NODE_IP, 3001, count=4)) == {a(1): 4}, "NodePort left the node"
    assert answered_at(far.probe("172.30.0.81", 80, count=2)) == {b(1): 2}


def test_session_affinity_ipv6(env):
    """ClientIP affinity on IPv6, one per Service port as on IPv4: the ClusterIP and the
    NodePort (on the Node's primary IPv6 address) agree."""
    sync(env, [service("sticky6", "fd00:172:30::81", [("p80", "TCP", 80, 3001)], type="NodePort",
                       ipFamilies=["IPv6"], sessionAffinity="ClientIP"),
               endpoint_slice("sticky6", [a6(1), b6(1)], P80, address_type="IPv6")])
    pc, far = env.client("pc"), env.client("far")
    via_cip = answered_at(pc.probe("fd00:172:30::81", 80, count=20))
    assert len(via_cip) == 1 and set(via_cip) <= {a6(1), b6(1)}, f"not sticky: {via_cip}"  # p = 2**-19
    via_np = answered_at(pc.probe(NODE_IP6, 3001, count=6))
    assert via_np == {next(iter(via_cip)): 6}, f"NodePort disagrees with the ClusterIP: {via_np} vs {via_cip}"
    external = answered_at(far.probe(NODE_IP6, 3001, count=20))
    assert len(external) == 1 and set(external) <= {a6(1), b6(1)}, f"not sticky: {external}"


# -- dual-stack --------------------------------------------------------------------------

def test_dual_stack(env):
    """One proxier per family: an IPv6-only Service, and a dual-stack LoadBalancer
    answering on both families, each family reaching only its own endpoints (the IPv4
    slice holds ep-a, the IPv6 slice ep-b), through ClusterIPs, externalIPs, LB IPs and
    NodePorts (on the Node's primary IPv6 address); IPv6 REJECT and DROP too."""
    sync(env, [
        service("v6only", "fd00:172:30::41", [("http", "TCP", 80)], ipFamilies=["IPv6"]),
        endpoint_slice("v6only", [a6(1), b6(1)], HTTP, address_type="IPv6"),
        service("dual", ["172.30.0.42", "fd00:172:30::42"], [("http", "TCP", 80, 3001)], type="LoadBalancer",
                ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack",
                externalIPs=["192.168.99.42", "2001:db8:99::43"], status=lb_status("1.2.3.42", "2001:db8:99::42")),
        endpoint_slice("dual", [a(1)], HTTP, name="dual-v4"),
        endpoint_slice("dual", [b6(1)], HTTP, name="dual-v6", address_type="IPv6"),
    ])
    run_flows(env, [
        Flow("pod to IPv6-only ClusterIP", "pc", "fd00:172:30::41", 80, {a6(1), b6(1)}, masq=False),

        Flow("pod to IPv4 ClusterIP of dual-stack", "pc", "172.30.0.42", 80, {a(1)}, masq=False),
        Flow("pod to IPv6 ClusterIP of dual-stack", "pc", "fd00:172:30::42", 80, {b6(1)}, masq=False),
        Flow("external to IPv4 LB IP", "far", "1.2.3.42", 80, {a(1)}, masq=True),
        Flow("external to IPv6 LB IP", "far", "2001:db8:99::42", 80, {b6(1)}, masq=True),
        Flow("external to IPv4 external IP", "far", "192.168.99.42", 80, {a(1)}, masq=True),
        Flow("external to IPv6 external IP", "far", "2001:db8:99::43", 80, {b6(1)}, masq=True),
        Flow("external to IPv4 NodePort", "far", NODE_IP, 3001, {a(1)}, masq=True),
        Flow("external to IPv6 NodePort", "far", NODE_IP6, 3001, {b6(1)}, masq=True),
        Flow("node to IPv6 ClusterIP", "node", "fd00:172:30::42", 80, {b6(1)}, masq=True),
        Flow("IPv6 unserved port", "pc", "fd00:172:30::42", 81, REJECT),
        Flow("IPv6 unallocated ClusterIP", "pc", "fd00:172:30::99", 80, DROP),
    ])
    # IPv6 hairpin: ep-a reaching itself through the Service sees the node's address,
    # reaching ep-b it is not masqueraded
    hairpin = Client("hairpin-a6", env.ep_a, a(1), a6(1), bind=True).probe("fd00:172:30::41", 80, count=20)
    seen = {(r.local, r.peer) for r in hairpin}
    assert seen == {(a6(1), env.ep_a.gw6), (b6(1), a6(1))}, seen


def test_single_stack_service_is_ignored_by_the_other_family(env):
    """kube-proxy runs one proxier per family, and a family's proxier only handles
    Services with a ClusterIP of its family; wrong-family externalIPs and LB IPs are
    ignored. So an IPv4-only Service's IPv6 externalIP, IPv6 LB IP and IPv6 NodePort get
    no rules at all (not even a REJECT), while its IPv4 ones work."""
    sync(env, [
        service("v4only", "172.30.0.51", [("http", "TCP", 80, 3002)], type="LoadBalancer", ipFamilies=["IPv4"],
                externalIPs=["192.168.99.51", "2001:db8:99::51"], status=lb_status("1.2.3.51", "2001:db8:99::52")),
        endpoint_slice("v4only", [a(1)], HTTP),
    ])
    run_flows(env, [
        Flow("IPv4 external IP", "far", "192.168.99.51", 80, {a(1)}, masq=True),
        Flow("IPv4 LB IP", "far", "1.2.3.51", 80, {a(1)}, masq=True),
        Flow("IPv4 NodePort", "far", NODE_IP, 3002, {a(1)}, masq=True),
        Flow("IPv6 external IP of an IPv4-only Service", "far", "2001:db8:99::51", 80, SINK),
        Flow("IPv6 LB IP of an IPv4-only Service", "far", "2001:db8:99::52", 80, SINK),
        Flow("IPv6 NodePort of an IPv4-only Service", "far", NODE_IP6, 3002, NODE),
    ])


def test_source_ranges_of_one_family_leave_the_other_open(env):
    """loadBalancerSourceRanges are split by family like everything else: a dual-stack
    LoadBalancer with only IPv4 ranges filters its IPv4 LB IP and leaves the IPv6 one
    open (kube-proxy makes a firewall chain only when the family has ranges)."""
    sync(env, [
        service("dual", ["172.30.0.42", "fd00:172:30::42"], [("http", "TCP", 80, 3001)], type="LoadBalancer",
                ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack",
                status=lb_status("1.2.3.42", "2001:db8:99::42"), loadBalancerSourceRanges=["203.0.113.0/25"]),
        endpoint_slice("dual", [a(1)], HTTP, name="dual-v4"),
        endpoint_slice("dual", [b6(1)], HTTP, name="dual-v6", address_type="IPv6"),
    ])
    run_flows(env, [
        Flow("allowed source to IPv4 LB IP", "far", "1.2.3.42", 80, {a(1)}, masq=True),
        Flow("blocked source to IPv4 LB IP", "blocked", "1.2.3.42", 80, DROP),
        Flow("IPv6 LB IP, no IPv6 ranges", "far", "2001:db8:99::42", 80, {b6(1)}, masq=True),
        Flow("pod to IPv6 LB IP, no IPv6 ranges", "pc", "2001:db8:99::42", 80, {b6(1)}, masq=True),
    ])


# -- local-traffic detection -------------------------------------------------------------

def detect_cases(world):
    client = world.cluster.client
    prefix = client.host_dev.split("-")[0] + "-"  # "v3-": only the client's veth
    return {
        # mode: (config, local clients), client pc (10.0.23.2) is in the clusterCIDR but
        # not in the node's podCIDR (10.0.3.0/24) nor behind the client's interface
        "ClusterCIDR": ({}, {"pod", "pc"}),
        "NodeCIDR": ({"detectLocalMode": "NodeCIDR"}, {"pod"}),
        "BridgeInterface": ({"detectLocalMode": "BridgeInterface", "detectLocal": {"bridgeInterface": client.host_dev}},
                            {"pod"}),
        "InterfaceNamePrefix": ({"detectLocalMode": "InterfaceNamePrefix",
                                 "detectLocal": {"interfaceNamePrefix": prefix}}, {"pod"}),
        # ClusterCIDR mode without a clusterCIDR: no detector; nothing is masqueraded for
        # being off-cluster, and there is no eTP:Local short-circuit for pods
        "no-detector": ({"clusterCIDR": ""}, None),
    }


@pytest.mark.parametrize("mode", ["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix", "no-detector"])
def test_detect_local_mode(env, mode):
    """detectLocalMode decides which ClusterIP traffic is masqueraded (traffic not from a
    local pod) and which eTP:Local traffic is short-circuited (traffic from local pods)."""
    config, local = detect_cases(env)[mode]
    sync(env, [
        service("svc1", "172.30.0.41", [("http", "TCP", 80)]),
        endpoint_slice("svc1", [a(1), endpoint(b(1), node="node-2")], HTTP),
        lb_service("svc2", "172.30.0.42", 3002, ("5.6.7.8",), ns="demo", port_name="http", externalTrafficPolicy="Local"),
        endpoint_slice("svc2", [a(2), endpoint(b(2), node="node-2")], HTTP),
    ], **config)
    flows = []
    for who in ("pod", "pc", "ext", "node"):
        is_local = local is not None and who in local
        # to the ClusterIP: masqueraded unless the detector calls it local (no detector:
        # never)
        flows.append(Flow(f"{who} to ClusterIP", who, "172.30.0.41", 80, {a(1), b(1)},
                          masq=False if local is None else not is_local))
        # to the eTP:Local LB IP: local pods are short-circuited to every endpoint,
        # unmasqueraded; the node too, masqueraded; others get the local endpoint only
        if who == "node":
            flows.append(Flow("node to eTP:Local LB", who, "5.6.7.8", 80, {a(2), b(2)}, masq=True))
        else:
            flows.append(Flow(f"{who} to eTP:Local LB", who, "5.6.7.8", 80, {a(2), b(2)} if is_local else {a(2)},
                              masq=False))
    run_flows(env, flows)


# -- what is not proxied -----------------------------------------------------------------

def test_ignored_services_get_no_rules(env):
    """Services labelled service.kubernetes.io/service-proxy-name, headless Services,
    ExternalName Services and Services without a clusterIP get no rules (their address
    is neither DNATed nor rejected); FQDN EndpointSlices are ignored."""
    objects = [
        service("other-proxy", "172.30.0.61", [("http", "TCP", 80)],
                labels={"service.kubernetes.io/service-proxy-name": "someone-else"}),
        endpoint_slice("other-proxy", [a(1)], HTTP),
        service("headless", "None", [("http", "TCP", 80)]),
        endpoint_slice("headless", [a(8)], HTTP, labels={"service.kubernetes.io/headless": ""}),
        # kube-proxy's TestBuildServiceMapServiceTypeExternalName sets a ClusterIP too
        service("external-name", "172.30.0.62", [("http", "TCP", 80)], type="ExternalName",
                externalName="foo2.bar.com"),
        endpoint_slice("external-name", [a(1)], HTTP),
        service("no-cluster-ip", "", [("http", "TCP", 80)]),
        endpoint_slice("no-cluster-ip", [a(8)], HTTP),
        # an FQDN slice next to an IPv4 one: only the IPv4 endpoints count
        service("fqdn", "172.30.0.63", [("http", "TCP", 80)]),
        endpoint_slice("fqdn", ["ep-a.example.com"], HTTP, name="fqdn-names", address_type="FQDN"),
        endpoint_slice("fqdn", [a(1)], HTTP, name="fqdn-ips"),
        # only an FQDN slice: the Service has no endpoints
        service("fqdn-only", "172.30.0.64", [("http", "TCP", 80)]),
        endpoint_slice("fqdn-only", ["ep-a.example.com"], HTTP, address_type="FQDN"),
    ]
    # Without a ServiceCIDR object, what kproxy does not handle goes on to the sink.
    sync(env, objects, service_cidrs=False)
    run_flows(env, [
        Flow("service-proxy-name labelled Service", "pod", "172.30.0.61", 80, SINK),
        Flow("ExternalName Service", "pod", "172.30.0.62", 80, SINK),
        Flow("FQDN slice ignored, IPv4 slice used", "pod", "172.30.0.63", 80, {a(1)}, masq=False),
        Flow("only an FQDN slice: no endpoints", "pod", "172.30.0.64", 80, REJECT),
    ])
    assert not in_ruleset(env, "172.30.0.61", "172.30.0.62", a(8), "headless", "no-cluster-ip", "example.com")
    # With the ServiceCIDR known, their addresses are unallocated as far as kube-proxy
    # knows: dropped like any address of the range that no proxied Service uses.
    sync(env, objects)
    run_flows(env, [
        Flow("service-proxy-name labelled Service (in the ServiceCIDR)", "pod", "172.30.0.61", 80, DROP),
        Flow("ExternalName Service (in the ServiceCIDR)", "pod", "172.30.0.62", 80, DROP),
    ])


# -- changes -----------------------------------------------------------------------------

def test_changing_state(env):
    """Each ``run --once`` programs the new state and nothing of the old one remains:
    endpoints added, removed, turned terminating; a Service switching type, traffic
    policies and session affinity, then deleted."""
    web = dict(name="web", cluster_ip="172.30.0.71", ns="demo")
    e1, e2, e3 = a(6), b(6), a(7)  # addresses used by no other object of this test

    def web_cip(**spec):
        return service(web["name"], web["cluster_ip"], [("http", "TCP", 80)], **spec)

    def web_lb(**spec):
        return service(web["name"], web["cluster_ip"], [("http", "TCP", 80, 3001)], type="LoadBalancer",
                       status=lb_status("1.2.3.71"), **spec)

    def step(objects, flows, gone=(), **kw):
        sync(env, objects, **kw)
        run_flows(env, flows)
        left = in_ruleset(env, *gone)
        assert not left, f"stale rules still mention {left}"

    cip = "172.30.0.71"
    step([web_cip(), endpoint_slice("web", [e1], HTTP)],
         [Flow("one endpoint", "pod", cip, 80, {e1}, masq=False)])
    step([web_cip(), endpoint_slice("web", [e1, endpoint(e2, node="node-2")], HTTP)],
         [Flow("endpoint added", "pod", cip, 80, {e1, e2}, masq=False)])
    step([web_cip(), endpoint_slice("web", [endpoint(e2, node="node-2")], HTTP)],
         [Flow("endpoint removed", "pod", cip, 80, {e2}, masq=False)], gone=[e1])
    step([web_cip(), endpoint_slice("web", [cond(e2, "serving-terminating", "node-2"), e3], HTTP)],
         [Flow("endpoint terminating, another ready", "pod", cip, 80, {e3}, masq=False)])
    step([web_cip(), endpoint_slice("web", [cond(e2, "serving-terminating", "node-2")], HTTP)],
         [Flow("only a terminating endpoint left", "pod", cip, 80, {e2}, masq=False)], gone=[e3])
    step([web_cip(), endpoint_slice("web", [cond(e2, "terminating", "node-2")], HTTP)],
         [Flow("terminating and not serving", "pod", cip, 80, REJECT)])
    eps = endpoint_slice("web", [e3, endpoint(e2, node="node-2")], HTTP)
    step([web_lb(externalTrafficPolicy="Local"), eps],
         [Flow("now a LoadBalancer, eTP Local", "ext", "1.2.3.71", 80, {e3}, masq=False),
          Flow("its NodePort, eTP Local", "ext", NODE_IP, 3001, {e3}, masq=False),
          Flow("its ClusterIP", "pod", cip, 80, {e2, e3}, masq=False)])
    # three changes at once: eTP to Cluster, iTP to Local, and the Node's primary IP
    # (NodePorts move with it: nodePortAddresses "primary")
    step([web_lb(externalTrafficPolicy="Cluster", internalTrafficPolicy="Local"), eps],
         [Flow("eTP switched to Cluster", "ext", "1.2.3.71", 80, {e2, e3}, masq=True),
          Flow("iTP switched to Local", "pod", cip, 80, {e3}, masq=False),
          Flow("NodePort on the new primary IP, eTP Cluster", "far", ALT_NODE_IP, 3001, {e2, e3}, masq=True),
          Flow("NodePort on the old primary IP", "far", NODE_IP, 3001, NODE)],
         node_obj=node(addresses=[ALT_NODE_IP, NODE_IP6], zone="zone-a", pod_cidrs=["10.0.3.0/24"]))
    step([web_cip(), eps],
         [Flow("back to ClusterIP: LB IP no longer handled", "ext", "1.2.3.71", 80, SINK),
          Flow("back to ClusterIP: NodePort no longer handled", "ext", NODE_IP, 3001, NODE),
          Flow("back to ClusterIP, iTP Cluster again", "pod", cip, 80, {e2, e3}, masq=False)],
         gone=["1.2.3.71", "3001"])
    step([web_cip(sessionAffinity="ClientIP"), eps], [])
    sticky = answered_at(env.client("pod").probe(cip, 80, count=10))
    assert len(sticky) == 1 and set(sticky) <= {e2, e3}, f"ClientIP affinity switched on, not sticky: {sticky}"
    step([web_cip(), eps],
         [Flow("ClientIP affinity switched off: both endpoints again", "pod", cip, 80, {e2, e3}, masq=False)],
         gone=["affinity-records", "-record-10800", "flags dynamic"])
    step([eps],
         [Flow("Service deleted: its address is unallocated", "pod", cip, 80, DROP)],
         gone=[cip, e2, e3])
    step([eps],
         [Flow("ServiceCIDR deleted: the address is not dropped any more", "pod", cip, 80, SINK)],
         gone=["172.30.0.0/16"], service_cidrs=False)


# -- SCTP --------------------------------------------------------------------------------

SCTP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.recv(100).decode())
"""
SCTP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.send(c.getsockname()[0].encode())
    c.close()
"""


def sctp_unsupported():
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as e:
        return f"this kernel has no SCTP sockets ({e})"
    return None


@pytest.mark.skipif(sctp_unsupported() is not None, reason=str(sctp_unsupported()))
def test_clusterip_sctp(env):
    """TestClusterIPGeneral's SCTP case: an SCTP Service port reaches the endpoints."""
    import subprocess
    import sys
    servers = []
    for pod in (env.ep_a, env.ep_b):
        proc = pod.popen([sys.executable, "-c", SCTP_SERVER, "5353"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        servers.append(proc)
    try:
        sync(env, [service("svc2", "172.30.0.42", [("dns-sctp", "SCTP", 53)], ns="ns2"),
                   endpoint_slice("svc2", [a(1), b(1)], [("dns-sctp", "SCTP", 5353)], ns="ns2")])
        seen = set()
        for _ in range(20):
            out = env.cluster.client.run([sys.executable, "-c", SCTP_CLIENT, "172.30.0.42", "53"], check=False)
            assert out.returncode == 0, out.stderr
            seen.add(out.stdout.strip())
        assert seen == {a(1), b(1)}
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
