"""Partial syncs leave exactly the ruleset a full sync leaves (property test on the fake)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.app import App
from kproxy.config import Config
from kproxy.model import from_api
from kproxy.nft import FakeNft
from kproxy import pluginmanager as plugins

NODE = "node-1"
CONFIG = Config(node_name=NODE, cluster_cidrs=("10.0.0.0/16",))


def make_app(backend=None) -> App:
    installed = plugins.discover()
    names = ["service-maps", "masquerade"]
    pm = plugins.make_manager()
    plugins.load(pm, names, installed)
    return App(CONFIG, backend or FakeNft(), pm, names)


def service_obj(i, kind, affinity, etp_local, itp_local):
    spec = {"type": kind, "clusterIP": f"172.30.0.{i + 1}",
            "ports": [{"name": "p", "protocol": "TCP", "port": 80, **({"nodePort": 30000 + i} if kind != "ClusterIP" else {})}]}
    if kind != "ClusterIP":
        spec["externalTrafficPolicy"] = "Local" if etp_local else "Cluster"
        spec["externalIPs"] = [f"192.168.99.{i + 1}"]
    if itp_local:
        spec["internalTrafficPolicy"] = "Local"
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    return from_api("Service", {"metadata": {"name": f"s{i}", "namespace": "ns"}, "spec": spec})


def slice_obj(i, endpoints):
    return from_api("EndpointSlice", {
        "metadata": {"name": f"s{i}-x", "namespace": "ns", "labels": {"kubernetes.io/service-name": f"s{i}"}},
        "addressType": "IPv4", "ports": [{"name": "p", "protocol": "TCP", "port": 8080}],
        "endpoints": [{"addresses": [f"10.0.{i}.{e + 1}"], "conditions": {"ready": ready}, "nodeName": node}
                      for e, (ready, node) in enumerate(endpoints)]})


service_st = st.tuples(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), st.sampled_from([0, 0, 60, 10800]),
                       st.booleans(), st.booleans())
endpoints_st = st.lists(st.tuples(st.booleans(), st.sampled_from([NODE, "node-2"])), max_size=4)
step_st = st.tuples(st.integers(0, 5), st.one_of(st.none(), service_st), st.one_of(st.none(), endpoints_st))


def apply_step(app, step):
    i, svc, eps = step
    if svc is None:
        app.state.remove("Service", "ns", f"s{i}")
    else:
        app.state.put(service_obj(i, *svc))
    if eps is None:
        app.state.remove("EndpointSlice", "ns", f"s{i}-x")
    else:
        app.state.put(slice_obj(i, eps))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_st, min_size=1, max_size=12))
def test_partial_syncs_equal_a_full_sync(steps):
    partial = make_app()
    partial.configure()
    assert partial.sync(full=True).ok
    for step in steps:
        apply_step(partial, step)
        result = partial.sync()
        assert result.ok, result.error
        partial.engine.stale_chains.clear()  # as if the delayed deletion had run
        _delete_flushed_chains(partial)
        full = make_app()
        full.configure()
        full.state.replace_all(partial.state.snapshot())
        assert full.sync(full=True).ok
        assert partial.backend.dump() == full.backend.dump()
        assert no_local_endpoints(partial) == no_local_endpoints(full)  # the gauge is recounted the same way


def no_local_endpoints(app) -> dict:
    """The samples of kube-proxy's gauge of Service ports without local endpoints."""
    sample = app.metrics.get_sample_value
    return {(fam, policy): sample("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                                  {"ip_family": fam, "traffic_policy": policy})
            for fam in ("IPv4", "IPv6") for policy in ("internal", "external")}


def _delete_flushed_chains(app):
    """Remove empty chains no declared object needs (what the delayed deletion does)."""
    for (fam, table), t in app.backend.tables.items():
        wanted = {k[3] for k in app.engine.committed.objects.data if k[0] == "chain" and k[2] == table and k[1] == fam}
        for name in [n for n in t.chains if n not in wanted and not t.rules[n]]:
            del t.chains[name]
            del t.rules[name]


def test_one_endpoint_change_writes_only_its_elements():
    app = make_app()
    for i in range(5):
        app.state.put(service_obj(i, "ClusterIP", 0, False, False))
        app.state.put(slice_obj(i, [(True, NODE), (True, NODE)] if i != 4 else [(True, NODE)]))
    assert app.sync(full=True).ok
    app.state.put(slice_obj(3, [(True, NODE), (False, NODE)]))
    result = app.sync()
    assert result.ok and not result.full
    text = result.transaction.render()
    assert "delete element ip kproxy cluster-backends { 172.30.0.4 . tcp . 80 . 1 }" in text
    assert all(f"172.30.0.{i} " not in text for i in (1, 2, 3, 5))  # other Services untouched
    assert "flush" not in text and "chain" not in text  # only elements changed


def test_a_new_endpoint_count_makes_the_sync_full():
    app = make_app()
    app.state.put(service_obj(0, "ClusterIP", 0, False, False))
    app.state.put(slice_obj(0, [(True, NODE)]))
    assert app.sync(full=True).ok
    app.state.put(slice_obj(0, [(True, NODE), (True, NODE), (True, NODE)]))
    result = app.sync()
    assert result.ok and result.full  # a new chain (cluster-3): structure changes go through full syncs
    assert "add chain ip kproxy cluster-3" in result.transaction.render()


def test_full_sync_after_restart_keeps_foreign_tables_and_replaces_ours():
    backend = FakeNft()
    first = make_app(backend)
    first.state.put(service_obj(0, "ClusterIP", 0, False, False))
    first.state.put(slice_obj(0, [(True, NODE)]))
    assert first.sync(full=True).ok
    before = backend.dump()
    second = make_app(backend)  # a restarted kproxy finds its tables in place
    second.state.replace_all(first.state.snapshot())
    result = second.sync()
    assert result.ok and result.full
    assert backend.dump() == before


def test_no_local_endpoints_gauge_counts_local_policies_without_local_endpoints():
    app = make_app()
    app.configure()
    cases = {  # Service: (type, eTP Local, iTP Local), its endpoints (ready, node)
        0: (("ClusterIP", 0, False, True), [(True, "node-2")]),  # internal: no local endpoint
        1: (("LoadBalancer", 0, True, False), [(True, "node-2")]),  # external: no local endpoint
        2: (("NodePort", 0, True, True), [(True, NODE), (True, "node-2")]),  # both served here
        3: (("ClusterIP", 0, False, True), []),  # no endpoint anywhere: rejected, not counted
        4: (("NodePort", 0, True, True), [(False, NODE), (True, "node-2")]),  # the local one is not ready
    }
    for i, (svc, eps) in cases.items():
        app.state.put(service_obj(i, *svc))
        app.state.put(slice_obj(i, eps))
    assert app.sync(full=True).ok
    assert no_local_endpoints(app) == {("IPv4", "internal"): 2, ("IPv4", "external"): 2,
                                       ("IPv6", "internal"): 0, ("IPv6", "external"): 0}
    app.state.put(slice_obj(4, [(True, NODE)]))  # partial syncs recount only what changed
    assert not app.sync().full
    assert no_local_endpoints(app)[("IPv4", "internal")] == 1
    assert no_local_endpoints(app)[("IPv4", "external")] == 1
    app.state.remove("Service", "ns", "s1")
    app.state.remove("Service", "ns", "s0")
    assert app.sync().ok
    assert no_local_endpoints(app)[("IPv4", "internal")] == 0
    assert no_local_endpoints(app)[("IPv4", "external")] == 0
