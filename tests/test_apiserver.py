"""Tests for tests/apiserver.py, driven through the real ``kubernetes`` client over HTTP.

Every test talks to :class:`FakeAPIServer` on 127.0.0.1 through
``kubernetes.client`` configured from a kubeconfig written by the server, so
what is proven here is what kproxy will see: paths, query parameters, list
and watch wire formats, pagination, bookmarks, 410s and broken streams.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import urllib3

import kubernetes
from kubernetes.client.exceptions import ApiException

from apiserver import ENDPOINTSLICES, ApiError, FakeAPIServer, LabelSelector  # tests/ is on sys.path (conftest)

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

KUBE_PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


def make_client(server: FakeAPIServer, tmp_path, token: str | None = None) -> kubernetes.client.ApiClient:
    """An ApiClient configured exactly as kproxy would be: from a kubeconfig file."""
    path = server.kubeconfig(tmp_path / "kubeconfig", token=token)
    cfg = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)
    # kubernetes 37 reads HTTP(S)_PROXY from the environment itself; keep loopback direct.
    cfg.proxy = None
    return kubernetes.client.ApiClient(cfg)


def service(name: str, namespace: str = "default", labels: dict | None = None, ip: str = "10.96.0.10") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }


def endpoint_slice(name: str, namespace: str = "default", service_name: str = "web", n: int = 2, base: int = 0) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"10.244.{(base + j) // 250}.{(base + j) % 250 + 1}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{j % 3}",
                "zone": "zone-a",
            }
            for j in range(n)
        ],
    }


def node(name: str, unschedulable: bool = False) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.0.0/24", "unschedulable": unschedulable},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]},
    }


_END = object()


class WatchStream:
    """Reads a urllib3 watch response line by line in a background thread.

    Events land in a queue so tests can wait for them with a timeout instead
    of blocking forever on a socket read.
    """

    def __init__(self, resp: urllib3.HTTPResponse):
        self.resp = resp
        self.error: BaseException | None = None
        self.raw_lines: list[bytes] = []
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buf = b""
        try:
            for chunk in self.resp.stream(amt=None, decode_content=False):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self.raw_lines.append(line)
                        self._queue.put(json.loads(line))
        except BaseException as e:  # noqa: BLE001 - recorded for the test to assert on
            self.error = e
        finally:
            self._done.set()
            self._queue.put(_END)

    def next(self, timeout: float = 5.0, skip_bookmarks: bool = True) -> dict:
        """The next event (BOOKMARKs skipped unless asked); fails on end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if item is _END:
                self._queue.put(_END)
                raise AssertionError(f"watch ended (error={self.error!r})")
            if skip_bookmarks and item["type"] == "BOOKMARK":
                continue
            return item

    def take(self, n: int, timeout: float = 5.0) -> list[dict]:
        return [self.next(timeout) for _ in range(n)]

    def rest(self, timeout: float = 5.0) -> list[dict]:
        """All remaining events until the stream ends (which must happen within timeout)."""
        assert self._done.wait(timeout), "watch did not end"
        events = []
        while (item := self._queue.get_nowait()) is not _END:
            events.append(item)
        self._queue.put(_END)
        return events

    def wait_end(self, timeout: float = 5.0) -> BaseException | None:
        """Wait for the stream to end; returns the read error, if any."""
        assert self._done.wait(timeout), "watch did not end"
        return self.error


def summary(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"].get("name", "")) for e in events]


def read_all_pages(list_fn, limit: int, **kwargs) -> list[dict]:
    """Follow continue tokens; returns the raw JSON pages."""
    pages, token = [], None
    while True:
        resp = list_fn(limit=limit, _continue=token, _preload_content=False, **kwargs)
        page = json.loads(resp.data)
        pages.append(page)
        token = page["metadata"].get("continue")
        if not token:
            return pages


@pytest.fixture
def server():
    with FakeAPIServer(bookmark_interval=0.2) as s:
        yield s


@pytest.fixture
def api(server, tmp_path):
    client = make_client(server, tmp_path)
    yield client
    client.close()


@pytest.fixture
def core(api):
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture
def discovery(api):
    return kubernetes.client.DiscoveryV1Api(api)


# --------------------------------------------------------------------------
# Discovery and basics
# --------------------------------------------------------------------------


def test_discovery_and_version(api, server):
    assert kubernetes.client.VersionApi(api).get_code().git_version == "v1.33.0"
    assert kubernetes.client.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name for g in kubernetes.client.ApisApi(api).get_api_versions().groups}
    assert {"discovery.k8s.io", "networking.k8s.io"} <= groups
    core_resources = {r.name for r in kubernetes.client.CoreV1Api(api).get_api_resources().resources}
    assert core_resources == {"services", "nodes"}
    # what the client actually requested: note the trailing slashes
    assert [r.path for r in server.requests][:3] == ["/version/", "/api/", "/apis/"]


def test_get_and_typed_list_deserialise(core, discovery, server):
    server.create(service("web", "shop"))
    server.create(endpoint_slice("web-abc", "shop", "web"))
    svc = core.read_namespaced_service("web", "shop")
    assert svc.spec.cluster_ip == "10.96.0.10" and svc.metadata.uid
    typed = discovery.list_namespaced_endpoint_slice("shop")
    assert typed.kind == "EndpointSliceList"
    assert typed.items[0].endpoints[0].conditions.ready is True
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_service("nope", "shop")
    assert exc.value.status == 404
    assert json.loads(exc.value.body)["reason"] == "NotFound"


# --------------------------------------------------------------------------
# LIST and pagination
# --------------------------------------------------------------------------


def test_pagination_returns_every_item_exactly_once_from_one_snapshot(core, server):
    server.bulk_load(service(f"svc-{i:04d}", f"ns-{i % 7}") for i in range(1234))
    created_rv = server.resource_version

    pages, token = [], None
    for n in range(100):
        resp = core.list_service_for_all_namespaces(limit=100, _continue=token, _preload_content=False)
        page = json.loads(resp.data)
        pages.append(page)
        if n == 0:
            # Writes between pages must not leak into later pages (consistent snapshot).
            server.create(service("svc-zzzz", "ns-6"))
            server.delete("Service", "ns-6", "svc-1231")
        token = page["metadata"].get("continue")
        if not token:
            break

    assert len(pages) == 13
    assert {p["metadata"]["resourceVersion"] for p in pages} == {str(created_rv)}
    assert all(p["kind"] == "ServiceList" and p["apiVersion"] == "v1" for p in pages)
    assert [p["metadata"].get("remainingItemCount") for p in pages] == [1134 - 100 * i for i in range(12)] + [None]
    items = [item for p in pages for item in p["items"]]
    keys = [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items]
    assert len(keys) == len(set(keys)) == 1234
    assert keys == sorted(keys)  # etcd key order
    assert all("kind" not in i and "apiVersion" not in i for i in items)

    fresh = read_all_pages(core.list_service_for_all_namespaces, limit=500)
    names = {i["metadata"]["name"] for p in fresh for i in p["items"]}
    assert "svc-zzzz" in names and "svc-1231" not in names and len(names) == 1234


def test_namespaced_list_paginates_within_namespace(core, server):
    server.bulk_load(service(f"s{i}", ns) for i in range(30) for ns in ("a", "b", "c"))
    pages = read_all_pages(lambda **kw: core.list_namespaced_service("b", **kw), limit=7)
    items = [i for p in pages for i in p["items"]]
    assert len(pages) == 5 and len(items) == 30
    assert {i["metadata"]["namespace"] for i in items} == {"b"}


def test_continue_token_of_compacted_version_is_410_expired(core, server):
    server.bulk_load(service(f"s{i}") for i in range(10))
    first = json.loads(core.list_service_for_all_namespaces(limit=3, _preload_content=False).data)
    server.create(service("later"))
    server.compact()
    with pytest.raises(ApiException) as exc:
        core.list_service_for_all_namespaces(limit=3, _continue=first["metadata"]["continue"])
    assert exc.value.status == 410
    status = json.loads(exc.value.body)
    assert status["kind"] == "Status" and status["reason"] == "Expired" and status["code"] == 410


def test_list_resource_version_semantics(core, server):
    server.create(service("a"))
    rv_a = server.resource_version
    server.create(service("b"))
    exact = json.loads(core.list_service_for_all_namespaces(
        resource_version=str(rv_a), resource_version_match="Exact", _preload_content=False).data)
    assert [i["metadata"]["name"] for i in exact["items"]] == ["a"]
    assert exact["metadata"]["resourceVersion"] == str(rv_a)
    newest = json.loads(core.list_service_for_all_namespaces(resource_version="0", _preload_content=False).data)
    assert len(newest["items"]) == 2
    with pytest.raises(ApiException) as exc:
        core.list_service_for_all_namespaces(resource_version=str(server.resource_version + 100))
    assert exc.value.status == 504
    assert "Too large resource version" in json.loads(exc.value.body)["message"]
    server.compact()
    with pytest.raises(ApiException) as exc:
        core.list_service_for_all_namespaces(resource_version=str(rv_a), resource_version_match="Exact")
    assert exc.value.status == 410


# --------------------------------------------------------------------------
# WATCH
# --------------------------------------------------------------------------


def test_watch_from_list_rv_sees_later_changes_in_order(discovery, server):
    server.create(endpoint_slice("web-1", "shop"))
    listed = json.loads(discovery.list_endpoint_slice_for_all_namespaces(_preload_content=False).data)
    list_rv = listed["metadata"]["resourceVersion"]

    server.create(endpoint_slice("web-2", "shop"))  # after the list, before the watch: must be replayed
    resp = discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=list_rv, allow_watch_bookmarks=True, timeout_seconds=10,
        _preload_content=False,
    )
    stream = WatchStream(resp)
    assert server.wait_for_watches(1, "endpointslices")

    updated = server.get("EndpointSlice", "shop", "web-1")
    updated["endpoints"][0]["conditions"]["ready"] = False
    server.update(updated)
    server.delete("EndpointSlice", "shop", "web-2")
    server.create(endpoint_slice("web-3", "other"))

    events = stream.take(4)
    assert summary(events) == [("ADDED", "web-2"), ("MODIFIED", "web-1"), ("DELETED", "web-2"), ("ADDED", "web-3")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(list_rv) and rvs[-1] == server.resource_version
    assert all(e["object"]["kind"] == "EndpointSlice" for e in events)
    assert all(e["object"]["apiVersion"] == "discovery.k8s.io/v1" for e in events)
    assert events[1]["object"]["endpoints"][0]["conditions"]["ready"] is False

    request = server.requests_for("/apis/discovery.k8s.io/v1/endpointslices", watch=True)[-1]
    assert request.query == {
        "allowWatchBookmarks": "true", "resourceVersion": list_rv, "timeoutSeconds": "10", "watch": "true",
    }


def test_watch_without_resource_version_starts_with_synthetic_added(discovery, server):
    server.bulk_load(endpoint_slice(f"s{i}", "ns") for i in range(5))
    for rv in ("0", None):
        kwargs = {"resource_version": rv} if rv else {}
        stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
            watch=True, timeout_seconds=1, _preload_content=False, **kwargs))
        assert summary(stream.rest()) == [("ADDED", f"s{i}") for i in range(5)]


def test_send_initial_events_ends_with_annotated_bookmark(discovery, server):
    server.bulk_load(endpoint_slice(f"s{i}", "ns") for i in range(3))
    stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, send_initial_events=True, resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True, timeout_seconds=1, _preload_content=False))
    events = stream.rest()
    assert summary(events[:4]) == [("ADDED", "s0"), ("ADDED", "s1"), ("ADDED", "s2"), ("BOOKMARK", "")]
    assert events[3]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    # sendInitialEvents=false without an RV: start at the most recent version, no initial state.
    fresh = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, send_initial_events=False, resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True, timeout_seconds=5, _preload_content=False))
    assert server.wait_for_watches(1)
    server.create(endpoint_slice("s3", "ns"))
    assert summary([fresh.next()]) == [("ADDED", "s3")]
    with pytest.raises(ApiException) as exc:  # the real server insists on NotOlderThan
        discovery.list_endpoint_slice_for_all_namespaces(watch=True, send_initial_events=True,
                                                         allow_watch_bookmarks=True, _preload_content=False)
    assert exc.value.status == 422


def test_watch_helper_of_the_client_deserialises_events(api, server):
    server.create(endpoint_slice("web-1", "shop"))
    w = kubernetes.watch.Watch()
    seen = []
    for event in w.stream(kubernetes.client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
                          timeout_seconds=1):
        seen.append((event["type"], event["object"]))
    assert [(t, o.metadata.name) for t, o in seen] == [("ADDED", "web-1")]
    assert isinstance(seen[0][1], kubernetes.client.V1EndpointSlice)
    assert w.resource_version == str(server.resource_version)


def test_bookmarks_periodic_and_on_demand(discovery, server):
    server.create(endpoint_slice("a", "ns"))
    server.create(service("unrelated"))  # bookmarks carry the global RV, not the kind's
    rv = server.resource_version
    stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(rv), allow_watch_bookmarks=True, timeout_seconds=5,
        _preload_content=False))
    start = time.monotonic()
    bookmark = stream.next(2, skip_bookmarks=False)
    assert 0.1 < time.monotonic() - start < 1.5
    assert bookmark == {"type": "BOOKMARK", "object": {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": str(rv)}}}

    server.bookmark_interval = None  # only applies to new watches
    quiet = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(rv), allow_watch_bookmarks=True, timeout_seconds=5,
        _preload_content=False))
    assert server.wait_for_watches(2)
    with pytest.raises(queue.Empty):
        quiet.next(0.5, skip_bookmarks=False)
    server.create(service("another"))
    server.bookmark()
    event = quiet.next(2, skip_bookmarks=False)
    assert event["type"] == "BOOKMARK"
    assert event["object"]["metadata"]["resourceVersion"] == str(server.resource_version)

    no_bookmarks = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(rv), timeout_seconds=1, _preload_content=False))
    server.bookmark()
    assert no_bookmarks.rest() == []


def test_watch_from_compacted_rv_gets_410_error_event(discovery, server, api, tmp_path):
    server.create(endpoint_slice("a", "ns"))
    old_rv = server.resource_version
    server.create(endpoint_slice("b", "ns"))
    server.compact()
    stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(old_rv), timeout_seconds=10, _preload_content=False))
    events = stream.rest(timeout=2)  # the server ends the stream itself
    assert stream.error is None
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith("too old resource version")

    # The client's Watch helper surfaces it as ApiException(410) when it may not retry.
    with pytest.raises(ApiException) as exc:
        for _ in kubernetes.watch.Watch().stream(discovery.list_endpoint_slice_for_all_namespaces,
                                                 resource_version=str(old_rv), timeout_seconds=2):
            pass
    assert exc.value.status == 410

    # Watching from the current RV after compaction is fine.
    ok = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(server.resource_version), timeout_seconds=1, _preload_content=False))
    assert ok.rest() == []

    server.watch_expired_as_http_error = True
    with pytest.raises(ApiException) as exc:
        discovery.list_endpoint_slice_for_all_namespaces(
            watch=True, resource_version=str(old_rv), _preload_content=False)
    assert exc.value.status == 410 and json.loads(exc.value.body)["reason"] == "Expired"


def test_timeout_seconds_ends_stream_cleanly(discovery, server):
    start = time.monotonic()
    stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(server.resource_version), timeout_seconds=1, _preload_content=False))
    assert stream.wait_end(3) is None
    assert 0.9 < time.monotonic() - start < 2.5
    assert server.wait_for_watches(0)


def test_drop_watches_breaks_the_stream(discovery, core, server):
    server.create(endpoint_slice("a", "ns"))
    slices = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, timeout_seconds=30, _preload_content=False))
    services = WatchStream(core.list_service_for_all_namespaces(
        watch=True, timeout_seconds=30, _preload_content=False))
    assert slices.next()["type"] == "ADDED"
    assert server.wait_for_watches(2)
    assert server.open_watches("EndpointSlice") == 1

    assert server.drop_watches("endpointslices") == 1
    error = slices.wait_end(3)
    assert isinstance(error, urllib3.exceptions.ProtocolError), error  # truncated chunked body
    assert server.open_watches() == 1 and server.open_watches("services") == 1

    server.drop_watches()
    assert isinstance(services.wait_end(3), urllib3.exceptions.ProtocolError)
    assert server.open_watches() == 0


def test_open_watch_count_follows_client_disconnects(discovery, server):
    resp = discovery.list_endpoint_slice_for_all_namespaces(watch=True, timeout_seconds=30, _preload_content=False)
    assert server.wait_for_watches(1)
    resp.close()  # like Watch.stop(): the client hangs up
    assert server.wait_for_watches(0, timeout=3)


# --------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------


def test_kube_proxy_label_selector_on_list_and_watch(core, server):
    server.bulk_load([
        service("plain"),
        service("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "foo"}),
        service("headless", labels={"service.kubernetes.io/headless": ""}),
        service("labelled", labels={"app": "x"}),
    ])
    listed = json.loads(core.list_service_for_all_namespaces(
        label_selector=KUBE_PROXY_SELECTOR, _preload_content=False).data)
    assert [i["metadata"]["name"] for i in listed["items"]] == ["labelled", "plain"]
    # the client percent-encodes the selector; the server sees it decoded
    assert server.requests[-1].query["labelSelector"] == KUBE_PROXY_SELECTOR

    stream = WatchStream(core.list_service_for_all_namespaces(
        watch=True, label_selector=KUBE_PROXY_SELECTOR, resource_version=listed["metadata"]["resourceVersion"],
        timeout_seconds=10, _preload_content=False))
    assert server.wait_for_watches(1)
    gone = server.get("Service", "default", "plain")
    gone["metadata"]["labels"] = {"service.kubernetes.io/headless": ""}
    server.update(gone)  # stops matching -> DELETED
    back = server.get("Service", "default", "other-proxy")
    back["metadata"]["labels"] = {}
    server.update(back)  # starts matching -> ADDED
    noise = server.get("Service", "default", "headless")
    noise["spec"]["clusterIP"] = "None"
    server.update(noise)  # never matches -> nothing
    server.delete("Service", "default", "headless")
    server.delete("Service", "default", "labelled")

    events = stream.take(3)
    assert summary(events) == [("DELETED", "plain"), ("ADDED", "other-proxy"), ("DELETED", "labelled")]
    deleted = events[0]["object"]
    # DELETED carries the previous (still matching) content with the event's RV, like the watch cache
    assert deleted["metadata"]["labels"] == {}
    assert int(deleted["metadata"]["resourceVersion"]) == int(events[1]["object"]["metadata"]["resourceVersion"]) - 1


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", {"none", "a1", "a2b", "b"}),
        ("a", {"a1", "a2b"}),
        ("!a", {"none", "b"}),
        ("a=1", {"a1"}),
        ("a==1", {"a1"}),
        ("a!=1", {"none", "a2b", "b"}),
        ("a in (1, 2)", {"a1", "a2b"}),
        ("a notin (1),b", {"a2b", "b"}),
        ("a>1", {"a2b"}),
        ("!a,!b", {"none"}),
        ("example.com/a-b_c.d=x", set()),
    ],
)
def test_label_selector_grammar(selector, expected):
    objects = {"none": {}, "a1": {"a": "1"}, "a2b": {"a": "2", "b": ""}, "b": {"b": "y"}}
    sel = LabelSelector(selector)
    assert {name for name, labels in objects.items() if sel.matches(labels)} == expected


def test_bad_selectors_are_400(core):
    for kwargs in ({"label_selector": "a=(b"}, {"field_selector": "spec.clusterIP=1.2.3.4"}):
        with pytest.raises(ApiException) as exc:
            core.list_service_for_all_namespaces(**kwargs)
        assert exc.value.status == 400 and json.loads(exc.value.body)["reason"] == "BadRequest"


def test_node_field_selector_on_list_get_and_watch(core, server):
    server.bulk_load([node("node-a"), node("node-b"), node("node-c", unschedulable=True)])
    listed = core.list_node(field_selector="metadata.name=node-b")
    assert [n.metadata.name for n in listed.items] == ["node-b"]
    assert [n.metadata.name for n in core.list_node(field_selector="spec.unschedulable=true").items] == ["node-c"]
    assert core.read_node("node-c").spec.unschedulable is True

    stream = WatchStream(core.list_node(
        watch=True, field_selector="metadata.name=node-b", timeout_seconds=10, _preload_content=False))
    assert stream.next()["object"]["metadata"]["name"] == "node-b"  # initial ADDED
    for name in ("node-a", "node-b"):
        n = server.get("Node", None, name)
        n["metadata"]["labels"]["touched"] = "yes"
        server.update(n)
    event = stream.next()
    assert (event["type"], event["object"]["metadata"]["name"]) == ("MODIFIED", "node-b")
    assert event["object"]["kind"] == "Node" and "namespace" not in event["object"]["metadata"]


# --------------------------------------------------------------------------
# ServiceCIDRs on/off
# --------------------------------------------------------------------------


def test_servicecidrs_served_when_enabled(api, server):
    server.create({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                   "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/12"]}})
    cidrs = kubernetes.client.NetworkingV1Api(api).list_service_cidr()
    assert [c.spec.cidrs for c in cidrs.items] == [["10.96.0.0/12"]]


def test_servicecidrs_disabled_gives_404(tmp_path):
    with FakeAPIServer(servicecidrs=False) as server:
        client = make_client(server, tmp_path)
        with pytest.raises(ApiException) as exc:
            kubernetes.client.NetworkingV1Api(client).list_service_cidr()
        assert exc.value.status == 404
        with pytest.raises(ApiException) as exc:
            kubernetes.client.NetworkingV1Api(client).list_service_cidr(watch=True, _preload_content=False)
        assert exc.value.status == 404
        groups = {g.name for g in kubernetes.client.ApisApi(client).get_api_versions().groups}
        assert groups == {"discovery.k8s.io"}
        # the rest still works
        assert kubernetes.client.DiscoveryV1Api(client).list_endpoint_slice_for_all_namespaces().items == []
        server.set_resource_enabled("servicecidrs", True)
        assert kubernetes.client.NetworkingV1Api(client).list_service_cidr().items == []


# --------------------------------------------------------------------------
# Fault injection, request log, auth
# --------------------------------------------------------------------------


def test_fail_next_and_request_log(core, server):
    server.fail_next(2, status=503, path="/services")
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            core.list_service_for_all_namespaces()
        assert exc.value.status == 503
        assert json.loads(exc.value.body)["reason"] == "ServiceUnavailable"
    assert core.list_service_for_all_namespaces().items == []
    assert [r.path for r in server.requests_for("/api/v1/services")] == ["/api/v1/services"] * 3
    server.clear_requests()
    assert server.requests == []

    # 429 carries Retry-After (like API Priority and Fairness), which urllib3 retries by itself.
    server.fail_next(1, status=429, retry_after=0)
    assert core.list_service_for_all_namespaces().items == []
    assert len(server.requests) == 2


def test_stall_makes_requests_hang(core, server):
    server.stall(30)
    start = time.monotonic()
    # urllib3's default Retry(3) re-sends a GET after each read timeout: 4 attempts in all.
    with pytest.raises(urllib3.exceptions.MaxRetryError) as exc:
        core.list_service_for_all_namespaces(_request_timeout=(1, 0.2))
    assert isinstance(exc.value.reason, urllib3.exceptions.ReadTimeoutError)
    assert time.monotonic() - start < 3
    assert len(server.requests_for("/api/v1/services")) == 4
    server.stall(0)
    assert core.list_service_for_all_namespaces(_request_timeout=2).items == []


def test_stall_holds_back_watch_events(discovery, server):
    stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version=str(server.resource_version), timeout_seconds=10, _preload_content=False))
    assert server.wait_for_watches(1)
    server.stall(5)
    server.create(endpoint_slice("late", "ns"))
    with pytest.raises(queue.Empty):
        stream.next(0.4)
    server.stall(0)
    assert summary([stream.next(2)]) == [("ADDED", "late")]


def test_static_token_auth(tmp_path):
    with FakeAPIServer(token="s3cret") as server:
        good = make_client(server, tmp_path)
        assert kubernetes.client.CoreV1Api(good).list_node().items == []
        assert server.requests[-1].headers["Authorization"] == "Bearer s3cret"
        bad = make_client(server, tmp_path, token="wrong")
        with pytest.raises(ApiException) as exc:
            kubernetes.client.CoreV1Api(bad).list_node()
        assert exc.value.status == 401


# --------------------------------------------------------------------------
# Python control API semantics
# --------------------------------------------------------------------------


def test_write_semantics():
    server = FakeAPIServer()  # the store works without HTTP
    created = server.create(service("web", "shop"))
    rv = int(created["metadata"]["resourceVersion"])
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    with pytest.raises(ApiError) as exc:
        server.create(service("web", "shop"))
    assert exc.value.code == 409 and exc.value.reason == "AlreadyExists"

    same = server.update(created)  # no change: no new RV, no event
    assert same["metadata"]["resourceVersion"] == str(rv) and server.resource_version == rv

    created["spec"]["clusterIP"] = "10.96.0.99"
    updated = server.update(created)
    assert int(updated["metadata"]["resourceVersion"]) == rv + 1
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]
    with pytest.raises(ApiError) as exc:
        server.update(created)  # stale resourceVersion
    assert exc.value.code == 409 and exc.value.reason == "Conflict"

    gone = server.delete("svc", "shop", "web")
    assert int(gone["metadata"]["resourceVersion"]) == rv + 2 and gone["spec"]["clusterIP"] == "10.96.0.99"
    assert server.get("Service", "shop", "web") is None
    with pytest.raises(ApiError):
        server.delete("Service", "shop", "web")
    with pytest.raises(ValueError):
        server.create({"kind": "Pod", "metadata": {"name": "p"}})


# --------------------------------------------------------------------------
# Scale
# --------------------------------------------------------------------------


def test_scale_10k_services_and_10k_endpointslices(core, discovery, server):
    start = time.monotonic()
    services = [service(f"svc-{i}", f"ns-{i % 100}", ip=f"10.96.{i // 250}.{i % 250 + 1}") for i in range(10_000)]
    slices = [endpoint_slice(f"svc-{i}-x1", f"ns-{i % 100}", f"svc-{i}", n=10, base=i * 10) for i in range(10_000)]
    server.bulk_load(services + slices)
    assert server.count(ENDPOINTSLICES) == 10_000
    load_time = time.monotonic() - start
    assert load_time < 10, load_time

    start = time.monotonic()
    svc_pages = read_all_pages(core.list_service_for_all_namespaces, limit=500, label_selector=KUBE_PROXY_SELECTOR)
    eps_pages = read_all_pages(discovery.list_endpoint_slice_for_all_namespaces, limit=500)
    list_time = time.monotonic() - start
    assert sum(len(p["items"]) for p in svc_pages) == 10_000
    assert sum(len(p["items"]) for p in eps_pages) == 10_000
    assert sum(len(i["endpoints"]) for p in eps_pages for i in p["items"]) == 100_000
    assert list_time < 10, list_time

    # A watch from RV 0 streams all 10k initial slices quickly too.
    start = time.monotonic()
    stream = WatchStream(discovery.list_endpoint_slice_for_all_namespaces(
        watch=True, resource_version="0", timeout_seconds=10, _preload_content=False))
    assert len(stream.take(10_000, timeout=10)) == 10_000
    assert time.monotonic() - start < 10
