"""conntrack-cleanup: which UDP conntrack entries are stale, and when the table is read
(with a fake conntrack table; the real one is exercised in tests/e2e/test_conntrack_e2e.py)."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from kproxy.app import App
from kproxy.config import Config
from kproxy.model import from_api
from kproxy.nft import FakeNft, NftError
from kproxy.pluginmanager import make_manager
from kproxy.state import ClusterState
from kproxy_plugins import conntrack_cleanup as cc
from kproxy_plugins.conntrack_cleanup import Cleaner, Flow
from objects import endpoint, endpoint_slice, lb_status, service

NODE = "node-1"
DNS = "172.30.0.53"
EXT = "192.168.99.1"
LB = "192.168.99.2"
NODE_IP = "192.168.50.1"
A, B, C = "10.0.1.2", "10.0.2.2", "10.0.3.2"
CLIENT = "10.0.3.9"


class FakeConntrack:
    """A conntrack table of UDP flows per IP version; records reads and deletions."""

    def __init__(self, flows=()):
        self.flows = {4: [], 6: []}
        self.reads = []
        self.deleted = []
        self.fail = None
        for f in flows:
            self.add(*f)

    def add(self, dst, dport, reply_src, sport=40000):
        version = 6 if ":" in dst else 4
        self.flows[version].append(Flow(dst, dport, reply_src, ref=(CLIENT, sport, dst, dport, reply_src)))

    def list_udp(self, version, dst=None, dport=None):
        self.reads.append((version, dst, dport))
        if self.fail:
            raise self.fail
        return [f for f in self.flows[version] if (dst is None or f.dst == dst) and (dport is None or f.dport == dport)]

    def delete(self, version, flows):
        for f in flows:
            self.flows[version].remove(f)
            self.deleted.append((f.dst, f.dport, f.reply_src))
        return len(flows)

    def left(self, version=4):
        return {(f.dst, f.dport, f.reply_src) for f in self.flows[version]}


def dns_objects(endpoints=(A, B), ns="demo", name="dns", ip=DNS, node_port=None, **spec):
    port = ("dns", "UDP", 53, node_port) if node_port else ("dns", "UDP", 53)
    objs = [service(name, ip, [port], ns=ns, **spec)]
    if endpoints is not None:
        objs.append(endpoint_slice(name, list(endpoints), [("dns", "UDP", 5353)], ns=ns))
    return objs


def state_of(*objects):
    st = ClusterState(node_name=NODE)
    for obj in objects:
        st.put(from_api(obj["kind"], obj))
    return st.snapshot()


def cleaner(flows=(), former=(), registry=None):
    fake = FakeConntrack(flows)
    return Cleaner(fake, registry or CollectorRegistry(), former), fake


def test_full_sync_deletes_entries_whose_reply_source_is_no_serving_endpoint():
    c, ct = cleaner([(DNS, 53, A), (DNS, 53, C), (DNS, 53, DNS), (DNS, 54, C, 1), ("8.8.8.8", 53, "8.8.8.8")])
    c.after_sync(state_of(*dns_objects()), None)
    # C is no endpoint; DNS itself as reply source = an entry made before the rules (never DNATed);
    # port 54 is no UDP port of the ClusterIP (kproxy rejects it): only an old DNAT made that entry
    assert ct.left() == {(DNS, 53, A), ("8.8.8.8", 53, "8.8.8.8")}


def test_serving_means_ready_or_serving_terminating_and_policies_are_ignored():
    eps = [endpoint(A, ready=False, serving=True, terminating=True), endpoint(B, ready=False, serving=False),
           endpoint(C, node="node-2")]
    c, ct = cleaner([(DNS, 53, A), (DNS, 53, B), (DNS, 53, C)])
    c.after_sync(state_of(*dns_objects(eps, internalTrafficPolicy="Local")), None)
    assert ct.left() == {(DNS, 53, A), (DNS, 53, C)}


def test_partial_sync_reads_the_table_only_when_serving_endpoints_changed():
    c, ct = cleaner([(DNS, 53, A), (DNS, 53, B)])
    c.after_sync(state_of(*dns_objects()), None)
    assert {r[0] for r in ct.reads} == {4}
    key = ("demo", "dns")
    # the Service changed but not its UDP frontends or serving endpoints: nothing to read
    ct.reads.clear()
    web = service("web", "172.30.0.10", [("http", "TCP", 80)])
    c.after_sync(state_of(*dns_objects(), web), {key, ("demo", "web")})
    assert ct.reads == []
    c.after_sync(state_of(*dns_objects(endpoints=[B])), {key})
    # the kernel is asked for the entries of that frontend (and of its ClusterIP) only
    assert sorted(ct.reads, key=str) == [(4, DNS, 53), (4, DNS, None)]
    assert ct.left() == {(DNS, 53, B)}
    # another Service changed: the unchanged dns entries are not looked at
    ct.add(DNS, 53, A, sport=1)
    dns2 = dns_objects([C], name="dns2", ip="172.30.0.54")
    c.after_sync(state_of(*dns_objects(endpoints=[B]), *dns2), {("demo", "dns2")})
    assert (DNS, 53, A) in ct.left()


def test_scaled_to_zero_deletes_every_entry_of_the_service():
    c, ct = cleaner([(DNS, 53, A), (DNS, 53, B), (EXT, 53, A), ("10.9.9.9", 30053, B)])
    objs = dns_objects(node_port=30053, type="NodePort", externalIPs=[EXT])
    c.after_sync(state_of(*objs), None)
    assert len(ct.left()) == 4
    empty = dns_objects(endpoints=(), node_port=30053, type="NodePort", externalIPs=[EXT])
    c.after_sync(state_of(*empty), {("demo", "dns")})
    assert ct.left() == set()


def test_deleted_service_loses_its_entries_on_a_partial_sync():
    objs = dns_objects(node_port=30053, type="LoadBalancer", externalIPs=[EXT], status=lb_status(LB))
    c, ct = cleaner([(DNS, 53, A), (EXT, 53, B), (LB, 53, A), (NODE_IP, 30053, B), ("172.30.0.10", 80, C)])
    c.after_sync(state_of(*objs, service("web", "172.30.0.10", [("http", "TCP", 80)])), None)
    assert len(ct.left()) == 5
    c.after_sync(state_of(service("web", "172.30.0.10", [("http", "TCP", 80)])), {("demo", "dns")})
    assert ct.left() == {("172.30.0.10", 80, C)}  # a TCP-only Service is not looked at


def test_deleted_service_loses_its_entries_on_a_full_sync_too():
    c, ct = cleaner([(DNS, 53, A)])
    c.after_sync(state_of(*dns_objects()), None)
    c.after_sync(state_of(), None)
    assert ct.left() == set()


def test_nodeport_rule_and_other_service_addresses_with_that_port():
    objs = dns_objects(node_port=30053, type="NodePort")
    other = dns_objects([C], name="other", ip="172.30.0.77")
    other[0]["spec"]["ports"][0]["port"] = 30053
    c, ct = cleaner([(NODE_IP, 30053, A), (NODE_IP, 30053, C), ("172.30.0.77", 30053, C),
                     ("10.5.5.5", 30053, "10.5.5.5")])
    c.after_sync(state_of(*objs, *other), None)
    # any destination on the NodePort counts, as in kube-proxy, except another Service's own address
    assert ct.left() == {(NODE_IP, 30053, A), ("172.30.0.77", 30053, C)}


def test_lb_ip_in_proxy_mode_is_no_frontend():
    c, ct = cleaner([(LB, 53, C)])
    c.after_sync(state_of(*dns_objects(type="LoadBalancer", status=lb_status(LB, ip_mode="Proxy"))), None)
    assert ct.left() == {(LB, 53, C)}


def test_clusterips_of_a_previous_kproxy_are_cleaned_at_start():
    c, ct = cleaner([("172.30.0.99", 53, A), ("172.30.0.99", 99, B), ("172.30.1.1", 53, A)], former={"172.30.0.99"})
    c.after_sync(state_of(*dns_objects()), None)
    assert ct.left() == {("172.30.1.1", 53, A)}
    ct.add("172.30.0.99", 53, A, sport=2)  # only at start: later it may be a new Service's
    c.after_sync(state_of(*dns_objects(endpoints=[A])), {("demo", "dns")})
    assert ("172.30.0.99", 53, A) in ct.left()


def test_address_moved_to_another_service_keeps_the_new_services_endpoints():
    c, ct = cleaner([(DNS, 53, A)])
    c.after_sync(state_of(*dns_objects()), None)
    ct.add(DNS, 53, C)
    moved = dns_objects([C], name="dns-new")
    c.after_sync(state_of(*moved), {("demo", "dns"), ("demo", "dns-new")})
    assert ct.left() == {(DNS, 53, C)}


def test_ipv6_entries_are_cleaned_in_their_own_family():
    v6 = "fd00:30::53"
    objs = [service("dns6", [v6], [("dns", "UDP", 53)], ipFamilies=["IPv6"]),
            endpoint_slice("dns6", ["fd00:1::2"], [("dns", "UDP", 5353)], address_type="IPv6")]
    c, ct = cleaner([(v6, 53, "fd00:1::2"), (v6, 53, "fd00:2::2"), (DNS, 53, C)])
    c.after_sync(state_of(*objs), None)
    assert {r[0] for r in ct.reads} == {6}
    assert ct.left(6) == {(v6, 53, "fd00:1::2")}
    assert ct.left(4) == {(DNS, 53, C)}


def test_many_frontends_are_checked_with_one_read_of_every_udp_entry():
    objs = [o for i in range(20) for o in dns_objects([A], name=f"dns{i}", ip=f"172.30.1.{i}")]
    c, ct = cleaner([("172.30.1.3", 53, B), ("172.30.1.4", 53, A)])
    c.after_sync(state_of(*objs), None)
    assert ct.reads == [(4, None, None)]
    assert ct.left() == {("172.30.1.4", 53, A)}


def test_nothing_to_examine_reads_nothing():
    c, ct = cleaner([(DNS, 53, C)])
    c.after_sync(state_of(service("web", "172.30.0.10", [("http", "TCP", 80)])), None)
    assert ct.reads == []


def test_metrics_have_kube_proxys_names():
    registry = CollectorRegistry()
    c, ct = cleaner([(DNS, 53, C), (DNS, 53, B)], registry=registry)
    c.after_sync(state_of(*dns_objects([A])), None)
    v4 = {"ip_family": "IPv4"}
    assert registry.get_sample_value("kubeproxy_conntrack_reconciler_deleted_entries_total", v4) == 2
    assert registry.get_sample_value("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", v4) == 1
    assert registry.get_sample_value("kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket",
                                     {**v4, "le": "0.001"}) is not None


def test_errors_are_logged_and_the_next_sync_examines_everything(caplog):
    c, ct = cleaner([(DNS, 53, C)])
    ct.fail = PermissionError("netlink: operation not permitted")
    assert c.after_sync(state_of(*dns_objects()), None) == 0
    assert "conntrack cleanup (IPv4) failed" in caplog.text
    ct.fail = None
    c.after_sync(state_of(*dns_objects()), {("demo", "other")})  # partial, but after a failure: everything
    assert ct.left() == set()


# -- the plugin's hooks in an App ---------------------------------------------------------

def make_app(monkeypatch, fake):
    monkeypatch.setattr(cc, "conntrack_for", lambda app: fake)
    monkeypatch.setattr(cc, "kernel_cluster_ips", lambda nft="nft": set())
    pm = make_manager()
    pm.register(cc, name="conntrack-cleanup")
    app = App(Config(node_name=NODE), FakeNft(), pm, ["conntrack-cleanup"])
    app.configure()
    return app


def test_plugin_cleans_after_successful_syncs_only(monkeypatch):
    fake = FakeConntrack([(DNS, 53, C)])
    app = make_app(monkeypatch, fake)
    for obj in dns_objects():
        app.state.put(from_api(obj["kind"], obj))
    app.sync(full=True)  # no table in the fake: nothing fails, the plugin runs
    assert fake.left() == set()
    fake.add(DNS, 53, C)

    class Boom:
        @staticmethod
        def apply(txn):
            raise NftError("nft said no")
    app.backend = Boom()
    app.state.remove("EndpointSlice", "demo", "dns-slice")
    result = app.sync()
    assert not result.ok
    assert fake.left() == {(DNS, 53, C)}  # a failed sync cleans nothing
    app.unconfigure()
    assert cc.__name__ not in app.plugin_data


def test_plugin_is_inert_without_the_nft_backend():
    pm = make_manager()
    pm.register(cc, name="conntrack-cleanup")
    app = App(Config(node_name=NODE), FakeNft(), pm, ["conntrack-cleanup"])
    app.configure()
    assert app.plugin_data[cc.__name__].conntrack is None
    assert app.sync(full=True).ok
    app.unconfigure()


def test_former_clusterips_are_read_from_the_kernels_cluster_ips_sets(tmp_path):
    nft = tmp_path / "nft"
    listing = {"nftables": [{"metainfo": {}}, {"set": {"family": "ip", "name": "cluster-ips", "table": "kproxy",
                                                        "elem": ["172.30.0.10", {"elem": {"val": "172.30.0.53"}}]}}]}
    nft.write_text("#!/bin/sh\n"
                   "[ \"$4\" = ip ] && [ \"$5\" = kproxy ] && [ \"$6\" = cluster-ips ] && "
                   f"echo '{json.dumps(listing)}' && exit 0\n"
                   "echo 'Error: No such file or directory' >&2; exit 1\n")
    nft.chmod(0o755)
    assert cc.kernel_cluster_ips(str(nft)) == {"172.30.0.10", "172.30.0.53"}
    assert cc.kernel_cluster_ips(str(tmp_path / "no-nft")) == set()
