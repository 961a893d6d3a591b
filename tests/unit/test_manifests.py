"""Manifest files -> validated objects -> cluster state -> the endpoints a Service port uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kproxy import model
from kproxy.endpoints import categorize
from kproxy.model import Ignored, InvalidObject
from kproxy.sources import manifests
from kproxy.state import ClusterState, ServiceEndpoint

ROOT = Path(__file__).resolve().parents[2]
NODE = "node-1"


def svc(name, cluster_ip="10.96.0.10", ports=(("http", "TCP", 80),), ns="demo", labels=None, **spec):
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"clusterIP": cluster_ip,
                    "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports], **spec}}
    if cluster_ip is None:
        del obj["spec"]["clusterIP"]
    if labels:
        obj["metadata"]["labels"] = labels
    return obj


def eps(service, endpoints, ports=(("http", "TCP", 8080),), name=None, ns="demo", address_type="IPv4"):
    """An EndpointSlice; ``endpoints`` are addresses or full endpoint dicts."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{service}-x", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": address_type,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
            "endpoints": [e if isinstance(e, dict) else {"addresses": [e]} for e in endpoints]}


def write(path: Path, *docs) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def load(path):
    """(state, problems) of a manifest path; the problems are also what was warned."""
    warned = []
    state, problems = manifests.load(str(path), NODE, warn=warned.append)
    assert warned == problems
    return state, problems


# -- files ------------------------------------------------------------------------------

def test_multi_document_yaml(tmp_path):
    f = write(tmp_path / "all.yaml", svc("web"), eps("web", ["10.0.1.2"]),
              {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}},
              {"kind": "ServiceCIDR", "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}})
    state, problems = load(f)
    assert problems == []
    assert list(state.services) == [("demo", "web")]
    assert list(state.slices) == [("demo", "web-x")]
    assert state.node.name == NODE
    assert state.cidrs(4) == ["10.96.0.0/16"]


def test_kind_list(tmp_path):
    f = write(tmp_path / "list.yaml", {"apiVersion": "v1", "kind": "List",
                                       "items": [svc("a", "10.96.0.1"), svc("b", "10.96.0.2")]})
    state, problems = load(f)
    assert problems == [] and sorted(state.services) == [("demo", "a"), ("demo", "b")]


def test_directory_and_json(tmp_path):
    write(tmp_path / "a.yaml", svc("a", "10.96.0.1"))
    write(tmp_path / "b.yml", svc("b", "10.96.0.2"))
    (tmp_path / "c.json").write_text(json.dumps({"kind": "List", "items": [svc("c", "10.96.0.3")]}, indent="\t"))
    (tmp_path / "d.json").write_text(json.dumps(svc("d", "10.96.0.4")))
    (tmp_path / "README.md").write_text("not a manifest: - [")
    state, problems = load(tmp_path)
    assert problems == []
    assert sorted(state.services) == [("demo", n) for n in "abcd"]
    assert manifests.manifest_files(str(tmp_path)) == [str(tmp_path / f) for f in ("a.yaml", "b.yml", "c.json", "d.json")]


def test_missing_path(tmp_path):
    with pytest.raises(manifests.ManifestError, match="does not exist"):
        manifests.load(str(tmp_path / "nope"), NODE)


def test_demo_manifests():
    state, problems = load(ROOT / "examples" / "demo" / "manifests")
    assert problems == []
    assert sorted(state.services) == [("demo", "dns"), ("demo", "empty"), ("demo", "web")]
    assert state.node is not None and state.node.zone == "zone-a"


@pytest.mark.parametrize("obj, ref, field", [
    (svc("bad-ip", "10.0.0.300"), "demo/bad-ip", "spec.clusterIP"),
    (svc("bad-ips", None, clusterIPs=["10.96.0.5", "fd00::zz"]), "demo/bad-ips", "spec.clusterIPs[1]"),
    (svc("dns-name", "web.example.com"), "demo/dns-name", "spec.clusterIP"),
    (svc("port-0", ports=[("a", "TCP", 0)]), "demo/port-0", "spec.ports[0].port"),
    (svc("port-big", ports=[("a", "TCP", 80), ("b", "TCP", 70000)]), "demo/port-big", "spec.ports[1].port"),
    (svc("node-port", ports=[("a", "TCP", 80)]) | {"spec": {"clusterIP": "10.96.0.9", "type": "NodePort",
                                                           "ports": [{"port": 80, "nodePort": 99999}]}},
     "demo/node-port", "spec.ports[0].nodePort"),
    (svc("proto", ports=[("a", "ICMP", 80)]), "demo/proto", "spec.ports[0].protocol"),
    (svc("ports-str", ports=[]) | {"spec": {"clusterIP": "10.96.0.9", "ports": "x"}}, "demo/ports-str", "spec.ports"),
    (svc("port-str", ports=[("a", "TCP", "eighty")]), "demo/port-str", "spec.ports[0].port"),
    (svc("dup-ports", ports=[("a", "TCP", 80), ("a", "TCP", 81)]), "demo/dup-ports", "spec.ports"),
    (svc("policy", externalTrafficPolicy="Nearby"), "demo/policy", "spec.externalTrafficPolicy"),
    (svc("affinity", sessionAffinity="Cookie"), "demo/affinity", "spec.sessionAffinity"),
    (svc("type", type="Magic"), "demo/type", "spec.type"),
    (eps("web", ["fd00::1"], name="v6-in-v4"), "demo/v6-in-v4", "endpoints[0].addresses[0]"),
    (eps("web", ["10.0.1.2"], name="v4-in-v6", address_type="IPv6"), "demo/v4-in-v6", "endpoints[0].addresses[0]"),
    (eps("web", ["10.0.1.999"], name="bad-ep"), "demo/bad-ep", "endpoints[0].addresses[0]"),
    (eps("web", ["10.0.1.2"], ports=[("http", "TCP", 0)], name="ep-port"), "demo/ep-port", "ports[0].port"),
    (eps("web", [{"addresses": ["10.0.1.2"], "conditions": {"ready": "yes"}}], name="cond"),
     "demo/cond", "endpoints[0].conditions.ready"),
])
def test_malformed_object_skipped_with_message(tmp_path, obj, ref, field):
    f = write(tmp_path / "objs.yaml", svc("before", "10.96.0.1"), obj, svc("after", "10.96.0.2"))
    state, problems = load(f)
    assert len(problems) == 1, problems
    message = problems[0]
    assert message.startswith(f"{f}: ") and f" {ref}: " in message and f": {field}: " in message, message
    assert message.endswith("skipped")
    assert ("demo", "before") in state.services and ("demo", "after") in state.services
    assert ref.split("/")[1] not in {k[1] for k in list(state.services) + list(state.slices)}


def test_non_mapping_document_and_other_kinds(tmp_path):
    f = tmp_path / "mixed.yaml"
    f.write_text(yaml.safe_dump(svc("a", "10.96.0.1")) + "---\n- just\n- a list\n---\n"
                 + yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}})
                 + "---\n" + yaml.safe_dump(svc("b", "10.96.0.2")))
    state, problems = load(f)
    assert problems == [f"{f}: document 2 is not a Kubernetes object",
                        f"{f}: document 3: kind 'Deployment' is not one kproxy reads "
                        "(Service, EndpointSlice, Node, ServiceCIDR); skipped"]
    assert sorted(state.services) == [("demo", "a"), ("demo", "b")]


def test_unparsable_file_does_not_stop_the_others(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: Service\nspec: [unclosed\n")
    write(tmp_path / "b.yaml", svc("b"))
    state, problems = load(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'a.yaml'}: cannot read")
    assert list(state.services) == [("demo", "b")]


def test_namespace_defaults_like_kubectl(tmp_path):
    s = svc("web")
    del s["metadata"]["namespace"]
    sl = eps("web", ["10.0.1.2"])
    del sl["metadata"]["namespace"]
    state, problems = load(write(tmp_path / "a.yaml", s, sl))
    assert problems == []
    assert list(state.services) == [("default", "web")] and list(state.slices) == [("default", "web-x")]


def test_ignored_objects_are_not_in_the_state(tmp_path):
    f = write(tmp_path / "ignored.yaml",
              svc("headless", "None"),
              svc("external", None, type="ExternalName", externalName="example.com"),
              svc("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "foo"}),
              eps("web", [], name="fqdn", address_type="FQDN") | {"endpoints": [{"addresses": ["www.example.com"]}]},
              eps("", ["10.0.1.2"], name="no-service") | {"metadata": {"name": "no-service", "namespace": "demo"}},
              svc("web"))
    state, problems = load(f)
    assert problems == []  # ignoring is not a problem
    assert list(state.services) == [("demo", "web")]
    assert list(state.slices) == []


# -- the model --------------------------------------------------------------------------

def test_service_model():
    s = model.from_api("Service", svc("web", "10.96.0.10", ports=[("http", "TCP", 80), ("dns", "UDP", 53)],
                                      type="LoadBalancer", externalIPs=["192.0.2.1"],
                                      loadBalancerSourceRanges=[" 10.0.0.0/8 ", "junk"],
                                      externalTrafficPolicy="Local", sessionAffinity="ClientIP")
                       | {"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}, {"hostname": "lb.example"}]}}})
    assert s.key == ("demo", "web") and s.type == "LoadBalancer"
    assert s.cluster_ips == ("10.96.0.10",)
    assert [(p.name, p.protocol, p.port) for p in s.ports] == [("http", "TCP", 80), ("dns", "UDP", 53)]
    assert s.external_ips == ("192.0.2.1",)
    assert [i.ip for i in s.lb_ingress] == ["203.0.113.5"]
    assert s.lb_source_ranges == ("10.0.0.0/8",)
    assert s.external_policy_local and not s.internal_policy_local
    assert s.affinity_timeout == 10800
    assert s.port_name(s.ports[0]) == "demo/web:http"
    # raw JSON bytes decode the same way
    assert model.from_api("Service", json.dumps(svc("web")).encode()).cluster_ips == ("10.96.0.10",)


def test_model_errors_and_ignores():
    with pytest.raises(InvalidObject) as exc:
        model.from_api("Service", svc("x", "1.2.3"))
    assert (exc.value.kind, exc.value.ref, exc.value.field) == ("Service", "demo/x", "spec.clusterIP")
    with pytest.raises(Ignored, match="headless"):
        model.from_api("Service", svc("x", "None"))
    with pytest.raises(Ignored, match="ExternalName"):
        model.from_api("Service", svc("x", type="ExternalName"))
    with pytest.raises(Ignored, match="service-proxy-name"):
        model.from_api("Service", svc("x", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    with pytest.raises(Ignored, match="FQDN"):
        model.from_api("EndpointSlice", eps("x", ["a.example"], address_type="FQDN"))
    with pytest.raises(InvalidObject, match="unsupported kind"):
        model.from_api("Pod", {})


def test_endpoint_conditions_and_hints():
    sl = model.from_api("EndpointSlice", eps("web", [
        {"addresses": ["10.0.1.2", "10.0.1.3"], "nodeName": "n1", "zone": "z1",
         "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]}},
        {"addresses": ["10.0.1.4"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.0.1.5"], "conditions": {"ready": False}},
    ]))
    e1, e2, e3 = sl.endpoints  # one endpoint per address list: the first address
    assert (e1.ip, e1.ready, e1.node_name, e1.zone, e1.zone_hints, e1.node_hints) == ("10.0.1.2", True, "n1", "z1", ("z1",), ("n1",))
    assert (e2.ready, e2.serving, e2.terminating, e2.zone_hints) == (False, True, True, None)
    assert (e3.ready, e3.serving, e3.terminating) == (False, True, False)  # unset serving means serving


def test_repeated_values_are_shared_and_still_equal():
    a = model.from_api("EndpointSlice", eps("a", ["10.0.1.2"], name="a-x"))
    b = model.from_api("EndpointSlice", json.dumps(eps("b", ["10.0.1.3"], name="b-x")).encode())
    assert a.ports is b.ports and a.ports == (model.EndpointPort("http", "TCP", 8080),)
    assert a.namespace is b.namespace and a.address_type is b.address_type
    s1, s2 = (model.from_api("Service", json.dumps(svc(n)).encode()) for n in ("s1", "s2"))
    assert s1.ports is s2.ports and s1.ports[0].protocol is s2.ports[0].protocol
    # a changed port is a new value; the shared one is untouched
    s3 = model.from_api("Service", svc("s3", ports=[("http", "TCP", 81)]))
    assert s3.ports[0].port == 81 and s1.ports[0].port == 80
    hinted = {"hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]}}
    sl = model.from_api("EndpointSlice", eps("c", [{"addresses": [ip], **hinted} for ip in ("10.0.1.4", "10.0.1.5")]
                                         + [{"addresses": ["10.0.1.6"], "hints": {"forZones": []}}]))
    e1, e2, e3 = sl.endpoints
    assert e1.zone_hints == ("z1",) and e1.node_hints == ("n1",)
    assert e1.zone_hints is e2.zone_hints and e1.node_hints is e2.node_hints
    assert e3.zone_hints == () and e3.node_hints is None


# -- cluster state joins ----------------------------------------------------------------

def state_of(*objs, node_name=NODE) -> ClusterState:
    st = ClusterState(node_name=node_name)
    for o in objs:
        st.put(model.from_api(o["kind"], o))
    return st


def joined(st, name="web", port=0, version=None):
    s = st.services[("demo", name)]
    return [(e.ip, e.port) for e in st.service_endpoints(s, s.ports[port], version)]


def test_join_by_port_name_and_protocol():
    st = state_of(
        svc("web", ports=[("http", "TCP", 80), ("dns", "UDP", 53), ("dnstcp", "TCP", 53)]),
        eps("web", ["10.0.1.2", "10.0.1.3"], ports=[("http", "TCP", 8080), ("dns", "UDP", 5353), ("dnstcp", "TCP", 5354)]),
        eps("web", ["10.0.2.2"], ports=[("http", "UDP", 9999)], name="wrong-proto"),
        eps("other", ["10.0.9.9"], ports=[("http", "TCP", 8080)], name="other-service"),
    )
    assert joined(st, port=0) == [("10.0.1.2", 8080), ("10.0.1.3", 8080)]
    assert joined(st, port=1) == [("10.0.1.2", 5353), ("10.0.1.3", 5353)]
    assert joined(st, port=2) == [("10.0.1.2", 5354), ("10.0.1.3", 5354)]


def test_unnamed_port_joins_unnamed_port():
    st = state_of(svc("web", ports=[("", "TCP", 80)]), eps("web", ["10.0.1.2"], ports=[("", "TCP", 8080)]))
    assert joined(st) == [("10.0.1.2", 8080)]


def test_dedup_across_slices():
    st = state_of(
        svc("web"),
        eps("web", [{"addresses": ["10.0.1.2"], "conditions": {"ready": False}}, "10.0.1.10"], name="a"),
        eps("web", ["10.0.1.2", "10.0.1.3"], name="b"),
    )
    got = st.service_endpoints(st.services[("demo", "web")], st.services[("demo", "web")].ports[0])
    # kube-proxy keeps the first copy unless it is terminating and another is not
    assert [(e.ip, e.port, e.ready) for e in got] == [("10.0.1.2", 8080, False), ("10.0.1.3", 8080, True),
                                                       ("10.0.1.10", 8080, True)]  # sorted by address


def test_same_address_with_other_port_is_another_endpoint():
    # as in kube-proxy, an endpoint is address:port (e.g. host-network pods while targetPort changes)
    st = state_of(svc("web"), eps("web", ["192.168.0.5"], name="a"),
                  eps("web", ["192.168.0.5"], ports=[("http", "TCP", 9090)], name="b"))
    assert joined(st) == [("192.168.0.5", 8080), ("192.168.0.5", 9090)]


def test_filter_by_ip_version():
    st = state_of(svc("web", None, clusterIPs=["10.96.0.10", "fd00::10"]),
                  eps("web", ["10.0.1.2"], name="v4"), eps("web", ["fd00:1::2"], name="v6", address_type="IPv6"))
    assert joined(st, version=4) == [("10.0.1.2", 8080)]
    assert joined(st, version=6) == [("fd00:1::2", 8080)]
    assert joined(st) == [("10.0.1.2", 8080), ("fd00:1::2", 8080)]


def test_slice_updates_and_removal():
    st = state_of(svc("web"), eps("web", ["10.0.1.2"], name="a"), eps("web", ["10.0.1.3"], name="b"))
    st.put(model.from_api("EndpointSlice", eps("web", ["10.0.1.4"], name="a")))  # replaces slice a
    assert joined(st) == [("10.0.1.3", 8080), ("10.0.1.4", 8080)]
    st.put(model.from_api("EndpointSlice", eps("other", ["10.0.1.3"], name="b")))  # b moves to another Service
    assert joined(st) == [("10.0.1.4", 8080)]
    snap = st.snapshot()
    st.remove("EndpointSlice", "demo", "a")
    assert joined(st) == [] and joined(snap) == [("10.0.1.4", 8080)]  # the snapshot is unaffected
    st.remove("Service", "demo", "web")
    assert st.services == {}


def test_only_this_node_is_kept():
    st = state_of({"kind": "Node", "metadata": {"name": "other"}}, node_name=NODE)
    assert st.node is None
    st.put(model.from_api("Node", {"kind": "Node", "metadata": {"name": NODE}}))
    assert st.node.name == NODE
    st.remove("Node", "", NODE)
    assert st.node is None


# -- categorize: which endpoints receive traffic ---------------------------------------

def ep(ip, ready=True, serving=True, terminating=False, node="", zone_hints=None, node_hints=None):
    return ServiceEndpoint(ip, 80, ready, serving, terminating, node, "", zone_hints, node_hints)


def ips(endpoints):
    return [e.ip for e in endpoints]


def test_ready_endpoints():
    c = categorize([ep("10.0.0.1"), ep("10.0.0.2", ready=False, serving=False), ep("10.0.0.3", ready=False, terminating=True)], NODE)
    assert ips(c.cluster) == ["10.0.0.1"] and c.has_any


def test_fallback_to_serving_terminating():
    c = categorize([ep("10.0.0.1", ready=False, serving=True, terminating=True),
                    ep("10.0.0.2", ready=False, serving=False, terminating=True),
                    ep("10.0.0.3", ready=False, serving=True, terminating=False)], NODE)
    assert ips(c.cluster) == ["10.0.0.1"] and c.has_any


def test_no_usable_endpoint():
    c = categorize([ep("10.0.0.2", ready=False, serving=False, terminating=True)], NODE)
    assert c.cluster == () and c.local == () and not c.has_any
    assert categorize([], NODE).has_any is False


def test_local_endpoints():
    endpoints = [ep("10.0.0.1", node=NODE), ep("10.0.0.2", node="other"),
                 ep("10.0.0.3", ready=False, terminating=True, node=NODE)]
    c = categorize(endpoints, NODE)
    assert ips(c.local) == ["10.0.0.1"] and ips(c.cluster) == ["10.0.0.1", "10.0.0.2"]
    # no ready local endpoint: serving+terminating local ones
    c = categorize(endpoints[1:], NODE)
    assert ips(c.local) == ["10.0.0.3"] and ips(c.cluster) == ["10.0.0.2"]
    # only remote endpoints: Local policy has none, but the Service has endpoints (drop, not reject)
    c = categorize([ep("10.0.0.2", node="other")], NODE)
    assert c.local == () and c.has_any
    # an endpoint without a node name is never local, even for a node without a name
    assert categorize([ep("10.0.0.4")], "").local == ()


def test_local_and_cluster_policies_pick_their_set():
    st = state_of(svc("web", internalTrafficPolicy="Local"))
    c = categorize([ep("10.0.0.1", node=NODE), ep("10.0.0.2", node="other")], NODE)
    s = st.services[("demo", "web")]
    assert ips(c.for_internal(s)) == ["10.0.0.1"] and ips(c.for_external(s)) == ["10.0.0.1", "10.0.0.2"]


def test_zone_hints():
    endpoints = [ep("10.0.0.1", zone_hints=("zone-a",)), ep("10.0.0.2", zone_hints=("zone-b",)),
                 ep("10.0.0.3", zone_hints=("zone-a", "zone-b"))]
    assert ips(categorize(endpoints, NODE, "zone-a").cluster) == ["10.0.0.1", "10.0.0.3"]
    assert ips(categorize(endpoints, NODE, "zone-b").cluster) == ["10.0.0.2", "10.0.0.3"]
    # no endpoint hinted for this zone, or the node has no zone: all ready endpoints
    assert ips(categorize(endpoints, NODE, "zone-c").cluster) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert ips(categorize(endpoints, NODE, "").cluster) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # hints of not-ready endpoints do not matter
    assert ips(categorize(endpoints + [ep("10.0.0.4", ready=False)], NODE, "zone-a").cluster) == ["10.0.0.1", "10.0.0.3"]


def test_incomplete_zone_hints_are_ignored():
    endpoints = [ep("10.0.0.1", zone_hints=("zone-a",)), ep("10.0.0.2")]
    assert ips(categorize(endpoints, NODE, "zone-a").cluster) == ["10.0.0.1", "10.0.0.2"]
    # an empty hint list is no hint (kube-proxy: "endpoint is missing a zone hint")
    endpoints = [ep("10.0.0.1", zone_hints=("zone-a",)), ep("10.0.0.2", zone_hints=())]
    assert ips(categorize(endpoints, NODE, "zone-a").cluster) == ["10.0.0.1", "10.0.0.2"]


def test_empty_hint_list_from_a_slice_is_no_hint():
    st = state_of(svc("web"), eps("web", [
        {"addresses": ["10.0.1.2"], "hints": {"forZones": [{"name": "zone-a"}]}},
        {"addresses": ["10.0.1.3"], "hints": {"forZones": []}},
    ]))
    s = st.services[("demo", "web")]
    assert ips(categorize(st.service_endpoints(s, s.ports[0]), NODE, "zone-a").cluster) == ["10.0.1.2", "10.0.1.3"]


def test_node_hints():
    endpoints = [ep("10.0.0.1", node_hints=(NODE,), zone_hints=("zone-a",)),
                 ep("10.0.0.2", node_hints=("node-2",), zone_hints=("zone-a",)),
                 ep("10.0.0.3", node_hints=("node-3",), zone_hints=("zone-b",))]
    assert ips(categorize(endpoints, NODE, "zone-a").cluster) == ["10.0.0.1"]
    # no endpoint for this node: fall back to zone hints
    assert ips(categorize(endpoints, "node-9", "zone-a").cluster) == ["10.0.0.1", "10.0.0.2"]
    # an endpoint without a node hint: node hints unusable, zone hints still are
    endpoints[2] = ep("10.0.0.3", zone_hints=("zone-b",))
    assert ips(categorize(endpoints, NODE, "zone-a").cluster) == ["10.0.0.1", "10.0.0.2"]


def test_topology_does_not_apply_to_local_or_terminating():
    endpoints = [ep("10.0.0.1", node=NODE, zone_hints=("zone-b",)), ep("10.0.0.2", node="x", zone_hints=("zone-a",))]
    c = categorize(endpoints, NODE, "zone-a")
    assert ips(c.cluster) == ["10.0.0.2"] and ips(c.local) == ["10.0.0.1"]
    terminating = [ep("10.0.0.1", ready=False, terminating=True, zone_hints=("zone-b",)),
                   ep("10.0.0.2", ready=False, terminating=True, zone_hints=("zone-a",))]
    assert ips(categorize(terminating, NODE, "zone-a").cluster) == ["10.0.0.1", "10.0.0.2"]
