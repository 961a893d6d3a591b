"""ClusterIP load balancing, masquerade and lifecycle with real nft and real packets."""

from __future__ import annotations

import pytest

from objects import answered_by, endpoint_slice, service

WEB = "172.30.0.10"
DNS = "172.30.0.53"
EMPTY = "172.30.0.99"


def demo_objects(web_endpoints=("10.0.1.2", "10.0.2.2")):
    return [
        service("web", WEB, [("http", "TCP", 80)]),
        endpoint_slice("web", list(web_endpoints), [("http", "TCP", 8080)]),
        service("dns", DNS, [("dns", "UDP", 53)]),
        endpoint_slice("dns", ["10.0.1.2", "10.0.2.2"], [("dns", "UDP", 5353)]),
        service("empty", EMPTY, [("http", "TCP", 80)]),
    ]


@pytest.fixture
def demo(clean):
    clean.sync(demo_objects())
    return clean


def test_tcp_from_pod_reaches_both_endpoints_without_masquerade(demo):
    results = demo.client.probe(WEB, 80, "tcp", count=60)
    counts = answered_by(results)
    assert set(counts) == {"pod-a", "pod-b"}, counts
    assert min(counts.values()) >= 10, counts  # uniform: P(<10 of 60) is about 1e-6
    assert {r.peer for r in results} == {demo.client.addr}


def test_udp_from_pod_reaches_both_endpoints(demo):
    results = demo.client.probe(DNS, 53, "udp", count=40)
    counts = answered_by(results)
    assert set(counts) == {"pod-a", "pod-b"}, counts
    assert {r.peer for r in results} == {demo.client.addr}


def test_off_cluster_client_is_masqueraded(demo):
    results = demo.ext.probe(WEB, 80, "tcp", count=30)
    assert all(r.ok for r in results), answered_by(results)
    gateways = {"pod-a": demo.pod_a.gw, "pod-b": demo.pod_b.gw}
    for r in results:
        assert r.peer == gateways[r.name], f"{r.name} saw {r.peer}, expected the node's address"
    udp = demo.ext.probe(DNS, 53, "udp", count=10)
    assert all(r.ok and r.peer == gateways[r.name] for r in udp), [(r.outcome, r.peer) for r in udp]


def test_service_without_endpoints_is_rejected_quickly(demo):
    results = demo.client.probe(EMPTY, 80, "tcp", count=5, timeout=3.0)
    assert [r.outcome for r in results] == ["refused"] * 5
    assert max(r.elapsed for r in results) < 1.0


def test_unserved_port_of_live_clusterip_is_rejected(demo):
    results = demo.client.probe(WEB, 81, "tcp", count=3, timeout=3.0)
    assert [r.outcome for r in results] == ["refused"] * 3


def test_hairpin_is_masqueraded(demo):
    results = demo.pod_a.probe(WEB, 80, "tcp", count=40)
    counts = answered_by(results)
    assert set(counts) == {"pod-a", "pod-b"}, counts
    for r in results:
        if r.name == "pod-a":  # pod-a reached itself: must look like it came from the node
            assert r.peer == demo.pod_a.gw
        else:
            assert r.peer == demo.pod_a.addr


def test_second_run_changes_the_datapath(clean):
    clean.sync(demo_objects())
    assert set(answered_by(clean.client.probe(WEB, 80, count=30))) == {"pod-a", "pod-b"}
    clean.sync(demo_objects(web_endpoints=["10.0.2.2"]))
    assert answered_by(clean.client.probe(WEB, 80, count=20)) == {"pod-b": 20}
    clean.sync(demo_objects()[2:4])  # web removed entirely
    outcomes = {r.outcome for r in clean.client.probe(WEB, 80, count=3, timeout=0.5)}
    assert "ok" not in outcomes
    assert "172.30.0.10" not in clean.ruleset()


def test_cleanup_leaves_the_namespace_as_it_was(clean):
    clean.node.run(["nft", "-f", "-"], input=(
        "add table inet foreign\n"
        "add chain inet foreign input { type filter hook input priority 10 ; }\n"
        "add rule inet foreign input tcp dport 9999 counter accept\n"
        "add table ip kproxyish\n"))
    before = clean.ruleset()
    clean.sync(demo_objects())
    during = clean.ruleset()
    assert "table ip kproxy {" in during and "table ip6 kproxy {" in during
    assert "table inet foreign" in during and "table ip kproxyish" in during
    out = clean.kproxy("cleanup").stdout
    assert "removed table ip kproxy" in out
    assert clean.ruleset() == before
    clean.node.run(["nft", "delete", "table", "inet", "foreign"])
    clean.node.run(["nft", "delete", "table", "ip", "kproxyish"])


def test_replacement_masquerade_plugin_is_what_runs(clean):
    clean.sync(demo_objects(), "--disable-plugin", "masquerade", "--plugin", "snat_everything")
    rules = clean.ruleset()
    assert "masquerade fully-random" not in rules and "snat to 192.0.2.1" in rules
    results = clean.client.probe(WEB, 80, count=20)
    assert all(r.ok for r in results), answered_by(results)
    assert {r.peer for r in results} == {"192.0.2.1"}  # the pod source was NATed too: the replacement ran


def test_failing_plugin_keeps_the_previous_rules(clean):
    clean.sync(demo_objects())
    before = clean.ruleset()
    proc = clean.kproxy("run", "--once", "--config", str(clean.config), "--manifests",
                        str(clean.tmp / "state"), "--plugin", "explode", check=False)
    assert proc.returncode == 1
    assert "plugin explode raised in kproxy_pre_render" in proc.stderr
    assert clean.ruleset() == before
    assert set(answered_by(clean.client.probe(WEB, 80, count=20))) == {"pod-a", "pod-b"}


def test_invalid_object_is_skipped_and_the_rest_programmed(clean):
    bad = service("bad", "172.30.0.300", [("http", "TCP", 80)])
    proc = clean.sync(demo_objects() + [bad])
    assert "Service demo/bad: spec.clusterIP: invalid IP address" in proc.stderr and "objects.yaml" in proc.stderr
    assert set(answered_by(clean.client.probe(WEB, 80, count=20))) == {"pod-a", "pod-b"}


def test_replacement_service_maps_plugin_is_what_runs(clean):
    clean.sync(demo_objects(), "--disable-plugin", "service-maps", "--plugin", "first_endpoint")
    rules = clean.ruleset()
    assert "cluster-backends" not in rules
    assert "dnat to 10.0.1.2:8080" in rules
    assert answered_by(clean.client.probe(WEB, 80, count=20)) == {"pod-a": 20}  # never pod-b: the replacement runs


def test_init_only_checks_the_host_and_changes_nothing(clean):
    before = clean.ruleset()
    proc = clean.kproxy("run", "--init-only")
    assert "init done" in proc.stdout
    assert clean.ruleset() == before
