"""ClientIP affinity of service-maps with the in-memory nft backend: one affinity per
Service port, and releasing the clients of endpoints that are no longer used.
(Packets: tests/e2e/test_semantics.py, test_session_affinity*.)"""

from __future__ import annotations

import pytest

from kproxy import config as configmod
from kproxy import model
from kproxy.app import App
from kproxy.nft import FakeNft
from kproxy_plugins.service_maps.affinity import port_id

FAM, TBL = "ip", "kproxy"
CIP, LB = "172.30.0.81", "1.2.3.81"


def sticky_service(**spec):
    return model.from_api("Service", {
        "kind": "Service", "metadata": {"name": "sticky", "namespace": "ns1"},
        "spec": {"type": "LoadBalancer", "clusterIP": CIP, "sessionAffinity": "ClientIP",
                 "ports": [{"name": "p80", "port": 80, "nodePort": 30080}], **spec},
        "status": {"loadBalancer": {"ingress": [{"ip": LB}]}}})


def endpoints(*ips, generation=1):
    return model.from_api("EndpointSlice", {
        "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "sticky-1", "namespace": "ns1", "generation": generation,
                     "labels": {"kubernetes.io/service-name": "sticky"}},
        "ports": [{"name": "p80", "port": 8080}],
        "endpoints": [{"addresses": [ip], "nodeName": node} for ip, node in ips]})


@pytest.fixture
def app(monkeypatch):
    from kproxy_plugins import interfaces

    monkeypatch.setattr(interfaces, "list_links", lambda: ())
    cfg = configmod.from_dict({"hostnameOverride": "node-1", "clusterCIDR": "10.0.0.0/16"})
    app = App.from_config(cfg, FakeNft())
    app.state.put(model.from_api("Node", {"kind": "Node", "metadata": {"name": "node-1"},
                                         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}}))
    return app


def test_every_address_of_the_service_port_shares_one_affinity(app):
    app.state.put(sticky_service())
    app.state.put(endpoints(("10.0.1.1", "node-1"), ("10.0.2.1", "node-2")))
    assert app.sync().ok
    fake, h = app.backend, port_id(app.state.services[("ns1", "sticky")], app.state.services[("ns1", "sticky")].ports[0])
    service_ips = fake.elements(FAM, TBL, "service-ips")
    assert service_ips[f"{CIP} . tcp . 80"] == service_ips[f"{LB} . tcp . 80"] == f"goto affinity-{h}"
    assert fake.elements(FAM, TBL, "nodeport-cluster-dispatch") == {} and \
        fake.elements(FAM, TBL, "service-nodeports")["tcp . 30080"] == f"goto affinity-{h}"
    # the affinity chain balances through the usual chain when it remembers nothing
    assert fake.elements(FAM, TBL, "affinity-cluster-balance") == {
        f"{CIP} . tcp . 80": "goto cluster-2", f"{LB} . tcp . 80": "goto cluster-2"}
    assert fake.elements(FAM, TBL, "affinity-nodeport-cluster-balance") == {"tcp . 30080": "goto nodeport-cluster-2"}
    record = f"goto affinity-{h}-record-10800"
    assert fake.elements(FAM, TBL, "affinity-records") == {f"{CIP} . tcp . 80": record, f"{LB} . tcp . 80": record}
    assert fake.elements(FAM, TBL, "affinity-nodeport-records") == {
        "tcp . 30080 . 10.0.1.1 . 8080": record, "tcp . 30080 . 10.0.2.1 . 8080": record}
    rules = fake.rules(FAM, TBL, f"affinity-{h}-record-10800")
    assert rules == [f"update @affinity-{h}-addr {{ ip saddr timeout 10800s : ip daddr }} "
                     f"update @affinity-{h}-port {{ ip saddr timeout 10800s : th dport }}"]
    assert f"affinity-{h}-local" not in fake.list_objects(FAM, TBL).chains  # both policies Cluster


def test_local_policy_has_its_own_affinity_of_local_endpoints(app):
    app.state.put(sticky_service(externalTrafficPolicy="Local"))
    app.state.put(endpoints(("10.0.1.1", "node-1"), ("10.0.2.1", "node-2")))
    assert app.sync().ok
    fake = app.backend
    h = port_id(app.state.services[("ns1", "sticky")], app.state.services[("ns1", "sticky")].ports[0])
    assert fake.elements(FAM, TBL, "local-dispatch") == {f"{LB} . tcp . 80": f"goto affinity-{h}-local"}
    assert fake.elements(FAM, TBL, "affinity-local-balance") == {f"{LB} . tcp . 80": "goto local-1"}
    assert fake.elements(FAM, TBL, "affinity-local-endpoints") == {"10.0.1.1 . 8080": None}
    assert fake.rules(FAM, TBL, f"affinity-{h}-local")[0].endswith(
        f"dnat ip to ip saddr map @affinity-{h}-local-addr : ip saddr map @affinity-{h}-local-port")


def remember(fake, h, entries, local=""):
    """Entries the kernel's packet path would have written: client -> (address, port)."""
    t = fake.tables[(FAM, TBL)]
    for client, (ip, port) in entries.items():
        t.elements[f"affinity-{h}{local}-addr"][client] = (ip, None)
        t.elements[f"affinity-{h}{local}-port"][client] = (str(port), None)


def test_partial_sync_releases_only_the_clients_of_a_removed_endpoint(app):
    app.state.put(sticky_service(externalTrafficPolicy="Local"))
    app.state.put(endpoints(("10.0.1.1", "node-1"), ("10.0.1.2", "node-1"), ("10.0.2.1", "node-2")))
    assert app.sync(full=True).ok
    fake = app.backend
    h = port_id(app.state.services[("ns1", "sticky")], app.state.services[("ns1", "sticky")].ports[0])
    remember(fake, h, {"1.1.1.1": ("10.0.1.1", 8080), "1.1.1.2": ("10.0.1.2", 8080), "1.1.1.3": ("10.0.2.1", 8080)})
    remember(fake, h, {"1.1.1.1": ("10.0.1.1", 8080), "1.1.1.2": ("10.0.1.2", 8080)}, "-local")
    fake.tables[(FAM, TBL)].elements[f"affinity-{h}-addr"]["1.1.1.4"] = ("10.0.1.1", None)  # port entry expired

    # 10.0.1.2 replaced by 10.0.1.3 (the same endpoint counts: no new chain, a partial sync)
    app.state.put(endpoints(("10.0.1.1", "node-1"), ("10.0.1.3", "node-1"), ("10.0.2.1", "node-2"), generation=2))
    result = app.sync()
    assert result.ok and not result.full, (result.error, result.full)
    assert fake.elements(FAM, TBL, f"affinity-{h}-addr") == {"1.1.1.1": "10.0.1.1", "1.1.1.3": "10.0.2.1"}
    assert fake.elements(FAM, TBL, f"affinity-{h}-port") == {"1.1.1.1": "8080", "1.1.1.3": "8080"}
    assert fake.elements(FAM, TBL, f"affinity-{h}-local-addr") == {"1.1.1.1": "10.0.1.1"}

    # the remote endpoint moves to this node: the local affinity may remember it now,
    # the cluster-wide one keeps every client
    app.state.put(endpoints(("10.0.1.1", "node-1"), ("10.0.1.3", "node-1"), ("10.0.2.1", "node-1"), generation=3))
    assert app.sync().ok
    assert fake.elements(FAM, TBL, f"affinity-{h}-addr") == {"1.1.1.1": "10.0.1.1", "1.1.1.3": "10.0.2.1"}


def test_full_sync_after_a_restart_checks_every_affinity(app):
    """A new kproxy process knows nothing of what the kernel remembers: its first sync
    releases clients of endpoints that went away while it was down."""
    app.state.put(sticky_service())
    app.state.put(endpoints(("10.0.1.1", "node-1"), ("10.0.2.1", "node-2")))
    assert app.sync(full=True).ok
    fake = app.backend
    h = port_id(app.state.services[("ns1", "sticky")], app.state.services[("ns1", "sticky")].ports[0])
    remember(fake, h, {"1.1.1.1": ("10.0.1.1", 8080), "1.1.1.3": ("10.0.9.9", 8080)})
    app.plugin_data.pop("service-maps/affinity")  # what a restart forgets
    assert app.sync(full=True).ok
    assert fake.elements(FAM, TBL, f"affinity-{h}-addr") == {"1.1.1.1": "10.0.1.1"}
