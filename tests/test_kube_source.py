"""The Kubernetes API source against the fake API server, over real HTTP on loopback.

Every test runs kproxy's real code path: ``KubeSource.from_kubeconfig`` loads a
kubeconfig written by ``FakeAPIServer`` with the real ``kubernetes`` package, the
reflectors list and watch over HTTP, and the sync loop (``App.run_forever``, the
built-in plugins) programs an in-memory ``FakeNft``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from apiserver import FakeAPIServer
from kproxy import config as configmod
from kproxy.app import App
from kproxy.nft import FakeNft
from kproxy.sources import kube
from kproxy.sources.reflector import WatchOptions
from objects import endpoint_slice, service

NODE = "node-1"
FAST = WatchOptions(page_size=3, watch_timeout=(5, 5), read_slack=1.0, connect_timeout=2.0, list_timeout=2.0,
                    backoff_base=0.1, backoff_cap=0.4, disabled_retry=0.5)


def wait_for(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def node(labels=None, pod_cidrs=("10.0.1.0/24",), name=NODE, **extra):
    return {"kind": "Node", "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": {"podCIDRs": list(pod_cidrs)},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}], **extra}}


class Harness:
    """An App on FakeNft with the API source and, once started, its sync loop in a thread."""

    def __init__(self, api: FakeAPIServer, tmp_path: Path, options: WatchOptions = FAST, monkeypatch=None):
        from kproxy_plugins import interfaces

        if monkeypatch is not None:
            monkeypatch.setattr(interfaces, "list_links", lambda: ())
        config = configmod.from_dict({"hostnameOverride": NODE, "clusterCIDR": "10.0.0.0/16",
                                      "nftables": {"minSyncPeriod": "0s"}})
        self.fake = FakeNft()
        self.app = App.from_config(config, self.fake)
        self.source = kube.KubeSource.from_kubeconfig(self.app, api.kubeconfig(tmp_path / "kubeconfig"), options)
        self.loop = threading.Thread(target=self.app.run_forever, name="sync-loop", daemon=True)

    def start(self, wait=True):
        self.app.configure()
        self.source.start()
        self.loop.start()
        if wait:
            assert self.source.wait_synced(5), self.source.describe_pending()
            wait_for(lambda: all(st.synced for st in self.source.status().values()), what="every reflector listed")
            wait_for(lambda: self.fake.transactions, what="the first sync")
        return self

    def stop(self):
        self.app.stop()
        self.source.stop()
        if self.loop.is_alive():
            self.loop.join(5)
        self.app.unconfigure()

    def status(self, resource="services"):
        return self.source.status()[resource]

    def datapath(self) -> str:
        return self.fake.dump() if self.fake.tables else ""

    def wait_datapath(self, present=(), absent=(), timeout=5.0):
        wait_for(lambda: all(p in self.datapath() for p in present) and not any(a in self.datapath() for a in absent),
                 timeout, f"datapath with {list(present)} and without {list(absent)}")


@pytest.fixture
def api():
    with FakeAPIServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def harness(api, tmp_path, monkeypatch):
    h = Harness(api, tmp_path, monkeypatch=monkeypatch)
    yield h
    h.stop()


def web(name="web", ip="10.96.0.10", port=80, ns="demo", **spec):
    return service(name, ip, [("http", "TCP", port)], ns=ns, **spec)


def web_slice(svc="web", ips=("10.0.1.2",), ns="demo", name=None, **kw):
    return endpoint_slice(svc, list(ips), [("http", "TCP", 8080)], ns=ns, name=name, **kw)


# -- client configuration ------------------------------------------------------------------

def test_client_configuration_order(api, tmp_path, monkeypatch):
    kc = api.kubeconfig(tmp_path / "kc")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # would break loopback if honoured
    cfg, where = kube.client_configuration(kc, env={})
    assert cfg.host == api.url and where == f"kubeconfig {kc}" and cfg.proxy is None
    cfg, where = kube.client_configuration(None, env={"KUBECONFIG": kc})
    assert where == f"kubeconfig {kc}"
    with pytest.raises(kube.KubeConfigError, match="does not exist"):
        kube.client_configuration(str(tmp_path / "missing"), env={})
    with pytest.raises(kube.KubeConfigError, match="no Kubernetes API configuration found"):
        kube.client_configuration(None, env={"KUBECONFIG": str(tmp_path / "nope")})
    with pytest.raises(kube.KubeConfigError, match="in-cluster|invalid"):
        kube.client_configuration(None, env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"})  # no token file here


def test_requests_use_kube_proxy_selectors_pagination_and_bookmarks(api, harness):
    api.bulk_load([web(f"s{i}", f"10.96.0.{i + 1}") for i in range(8)] + [node()])
    harness.start()
    assert len(harness.app.state.services) == 8
    lists = api.requests_for("/api/v1/services", watch=False)
    assert len(lists) == 3 and lists[0].query["limit"] == "3" and lists[0].query["resourceVersion"] == "0"
    assert "continue" in lists[1].query and "continue" in lists[2].query
    assert {r.query["labelSelector"] for r in lists} == {kube.PROXY_SELECTOR}
    slices = api.requests_for("/apis/discovery.k8s.io/v1/endpointslices")
    assert {r.query["labelSelector"] for r in slices} == {kube.PROXY_SELECTOR}
    nodes = api.requests_for("/api/v1/nodes")
    assert {r.query["fieldSelector"] for r in nodes} == {f"metadata.name={NODE}"}
    wait_for(lambda: api.requests_for("/api/v1/services", watch=True))
    w = api.requests_for("/api/v1/services", watch=True)[0].query
    assert w["allowWatchBookmarks"] == "true" and w["timeoutSeconds"] == "5"
    assert w["resourceVersion"] == str(api.resource_version)
    assert harness.app.state.node is not None and harness.app.state.node.pod_cidrs == ("10.0.1.0/24",)


# -- gating ----------------------------------------------------------------------------------

def test_no_sync_before_services_and_endpointslices_are_listed(api, harness):
    api.bulk_load([web(), web_slice()])
    api.fail_next(4, 500, path="endpointslices")  # the EndpointSlice list keeps failing for a while
    harness.start(wait=False)
    wait_for(lambda: harness.status("services").synced and harness.status("endpointslices").errors >= 2,
             what="services listed while the slice list fails")
    assert not harness.app.sources_synced.is_set()
    time.sleep(0.1)
    assert harness.fake.transactions == [] and harness.fake.tables == {}
    assert harness.source.wait_synced(5)
    harness.wait_datapath(["10.96.0.10", "10.0.1.2"])
    assert harness.status("endpointslices").errors == 4


def test_no_sync_while_the_server_stalls_the_first_lists(api, harness):
    api.bulk_load([web(), web_slice()])
    api.stall(1.0)
    harness.start(wait=False)
    time.sleep(0.7)
    assert not harness.app.sources_synced.is_set() and harness.fake.transactions == []
    assert harness.source.wait_synced(5)
    harness.wait_datapath(["10.96.0.10", "10.0.1.2"])


# -- events ----------------------------------------------------------------------------------

def test_add_update_delete_reach_state_and_datapath(api, harness):
    harness.start()
    api.create(web())
    api.create(web_slice())
    harness.wait_datapath(["10.96.0.10", "10.0.1.2"])
    api.apply(web_slice(ips=("10.0.1.2", "10.0.2.2")))
    harness.wait_datapath(["10.0.2.2"])
    api.apply(web_slice(ips=("10.0.2.2",)))
    harness.wait_datapath(["10.0.2.2"], absent=["10.0.1.2"])
    api.apply(web(ip="10.96.0.10", port=81))
    wait_for(lambda: harness.app.state.services[("demo", "web")].ports[0].port == 81)
    harness.wait_datapath(["10.96.0.10 . tcp . 81"])
    api.delete("EndpointSlice", "demo", "web-slice")
    harness.wait_datapath(absent=["10.0.2.2"])
    api.delete("Service", "demo", "web")
    harness.wait_datapath(absent=["10.96.0.10"])
    assert harness.app.state.services == {} and harness.app.state.slices == {}
    assert harness.status().lists == 1 and harness.status().events >= 3


def test_objects_that_become_ignored_are_removed(api, harness):
    api.bulk_load([web("a", "10.96.0.11"), web("b", "10.96.0.12"), web("c", "10.96.0.13")])
    harness.start()
    harness.wait_datapath(["10.96.0.11", "10.96.0.12", "10.96.0.13"])
    other = web("a", "10.96.0.11")
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "someone-else"}
    api.apply(other)  # leaves the selector: the server sends DELETED
    external = web("b", "10.96.0.12")
    external["spec"] = {"type": "ExternalName", "externalName": "example.com"}
    api.apply(external)  # still selected, but kproxy ignores ExternalName Services
    harness.wait_datapath(["10.96.0.13"], absent=["10.96.0.11", "10.96.0.12"])
    assert set(harness.app.state.services) == {("demo", "c")}


def test_dropped_watch_resumes_and_later_events_arrive(api, harness):
    api.create(web())
    harness.start()
    assert api.wait_for_watches(4)
    rv = api.resource_version
    assert api.drop_watches() == 4
    api.create(web("late", "10.96.0.20"))
    harness.wait_datapath(["10.96.0.10", "10.96.0.20"])
    st = harness.status()
    assert st.lists == 1 and st.errors >= 1 and "ProtocolError" in st.last_error
    resumed = [r for r in api.requests_for("/api/v1/services", watch=True)][1:]
    assert resumed and int(resumed[0].query["resourceVersion"]) >= rv  # no relist: resumed where it was


def test_overload_answers_are_retried_after_retry_after_without_relisting(api, harness):
    harness.start()
    assert api.wait_for_watches(4)
    api.fail_next(2, 429, path="/api/v1/services")  # API Priority and Fairness: Retry-After: 1
    api.drop_watches("services")
    api.create(web("later", "10.96.0.21"))
    t0 = time.monotonic()
    harness.wait_datapath(["10.96.0.21"], timeout=8)
    assert time.monotonic() - t0 >= 1.0  # Retry-After was honoured (urllib3 did not retry by itself)
    st = harness.status()
    assert st.lists == 1 and st.errors == 3 and "429" in st.last_error  # the drop, then two 429s


def test_410_relist_removes_deletions_missed_while_away(api, harness):
    api.bulk_load([web("a", "10.96.0.11"), web("b", "10.96.0.12"), web_slice("a", name="a-slice")])
    harness.start()
    harness.wait_datapath(["10.96.0.11", "10.96.0.12", "10.0.1.2"])
    api.stall(30)  # the open watches go quiet ...
    api.delete("Service", "demo", "a")
    api.delete("EndpointSlice", "demo", "a-slice")
    api.create(web("c", "10.96.0.13"))
    api.compact()  # ... and the events they missed are compacted away
    api.drop_watches()
    api.stall(0)
    harness.wait_datapath(["10.96.0.12", "10.96.0.13"], absent=["10.96.0.11", "10.0.1.2"])
    assert set(harness.app.state.services) == {("demo", "b"), ("demo", "c")}
    wait_for(lambda: harness.app.state.slices == {}, what="the slice relist")
    assert harness.status().lists == 2 and harness.status("endpointslices").lists == 2
    relists = [r for r in api.requests_for("/api/v1/services", watch=False)][1:]
    assert relists and "resourceVersion" not in relists[0].query  # a consistent list after 410


def test_expired_continue_token_restarts_the_list(api, harness):
    api.bulk_load([web(f"s{i}", f"10.96.0.{i + 1}") for i in range(7)])
    serve_list = api._serve_list
    pages = []

    def compact_after_first_page(h, rtype, namespace, query):
        if rtype.kind == "Service":
            pages.append(query.get("continue"))
        serve_list(h, rtype, namespace, query)
        if rtype.kind == "Service" and len(pages) == 1:
            api.create(web("new", "10.96.0.99"))
            api.compact()

    api._serve_list = compact_after_first_page
    harness.start()
    assert len(harness.app.state.services) == 8
    # page 2 got 410 (its snapshot was compacted away), so the list started again
    assert pages[0] is None and pages[1] is not None and pages[2] is None and len(pages) == 5
    assert harness.status().lists == 1 and harness.status().errors == 0


def test_bookmarks_advance_the_resource_version(api, harness):
    harness.start()
    wait_for(lambda: harness.status().watching)
    api.create(node(name="other-node"))  # bumps the RV; not seen by the services watch
    api.create(node(name="another-node"))
    rv = str(api.resource_version)
    api.bookmark()
    wait_for(lambda: harness.status().resource_version == rv, what="a bookmark")
    assert harness.status().events == 0
    api.drop_watches("services")
    wait_for(lambda: len(api.requests_for("/api/v1/services", watch=True)) >= 2)
    assert api.requests_for("/api/v1/services", watch=True)[1].query["resourceVersion"] == rv


def test_stalled_server_does_not_stall_the_sync_loop(api, tmp_path, monkeypatch):
    opts = WatchOptions(page_size=100, watch_timeout=(1, 1), read_slack=1.0, connect_timeout=1.0,
                        list_timeout=1.0, backoff_base=0.1, backoff_cap=0.3)
    h = Harness(api, tmp_path, opts, monkeypatch)
    try:
        api.create(web())
        h.start()
        assert api.wait_for_watches(4)
        api.stall(3.5)
        t0 = time.monotonic()
        # other work goes on: a change from elsewhere is synced while every request hangs
        from kproxy.model import from_api
        h.app.state.put(from_api("Service", web("local", "10.96.0.50")))
        h.app.request_sync()
        h.wait_datapath(["10.96.0.50"], timeout=2)
        assert time.monotonic() - t0 < 2
        # the reflectors notice the silence (client read timeout) and recover after the stall
        wait_for(lambda: h.status().errors >= 1, timeout=4, what="the read timeout")
        assert "timed out" in h.status().last_error.lower()
        api.create(web("after", "10.96.0.30"))
        h.wait_datapath(["10.96.0.10", "10.96.0.30"], timeout=10)
    finally:
        api.stall(0)
        h.stop()


def test_malformed_objects_are_skipped_with_a_clear_message(api, harness, caplog):
    caplog.set_level(logging.WARNING, logger="kproxy.kube")
    bad_port = web("bad-port", "10.96.0.66")
    bad_port["spec"]["ports"][0]["port"] = "eighty"
    bad_ip = web("bad-ip", "10.96.0.1234")
    api.bulk_load([web("good", "10.96.0.10"), bad_port, bad_ip, web_slice("good")])
    harness.start()
    harness.wait_datapath(["10.96.0.10", "10.0.1.2"])
    assert set(harness.app.state.services) == {("demo", "good")}
    text = caplog.text
    assert "demo/bad-port: spec.ports[0].port" in text and "demo/bad-ip: spec.clusterIP" in text
    # through the watch: a new malformed object, and a good one turned bad
    bad_slice = web_slice("good", name="bad-slice")
    bad_slice["endpoints"][0]["addresses"] = ["10.0.1.999"]
    api.create(bad_slice)
    turned = web("good", "10.96.0.10")
    turned["spec"]["ports"][0]["protocol"] = "ICMP"
    api.create(web("later", "10.96.0.11"))
    api.apply(turned)
    harness.wait_datapath(["10.96.0.11"], absent=["10.96.0.10"])
    assert "demo/bad-slice: endpoints[0].addresses[0]" in caplog.text
    assert "demo/good: spec.ports[0].protocol" in caplog.text
    assert harness.status().skipped == 3 and harness.status("endpointslices").skipped == 1
    assert harness.status().errors == 0


def test_servicecidrs_are_reflected(api, harness):
    api.create({"kind": "ServiceCIDR", "apiVersion": "networking.k8s.io/v1", "metadata": {"name": "kubernetes"},
                "spec": {"cidrs": ["10.96.0.0/16"]}})
    harness.start()
    assert harness.app.state.cidrs(4) == ["10.96.0.0/16"]
    api.create({"kind": "ServiceCIDR", "metadata": {"name": "extra"}, "spec": {"cidrs": ["10.97.0.0/16"]}})
    wait_for(lambda: harness.app.state.cidrs(4) == ["10.96.0.0/16", "10.97.0.0/16"])


def test_cluster_without_servicecidrs_still_works(tmp_path, monkeypatch):
    with FakeAPIServer(servicecidrs=False, bookmark_interval=0.2) as api:
        h = Harness(api, tmp_path, monkeypatch=monkeypatch)
        try:
            api.bulk_load([web(), web_slice()])
            h.start()
            h.wait_datapath(["10.96.0.10", "10.0.1.2"])
            wait_for(lambda: h.status("servicecidrs").disabled, what="servicecidrs disabled")
            st = h.status("servicecidrs")
            assert st.disabled and st.synced and "404" in st.last_error
            api.create(web("more", "10.96.0.11"))
            h.wait_datapath(["10.96.0.11"])
            # the API appears later (an upgraded cluster): picked up on the next look
            api.set_resource_enabled("servicecidrs", True)
            api.create({"kind": "ServiceCIDR", "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/16"]}})
            wait_for(lambda: h.app.state.cidrs(4) == ["10.96.0.0/16"], timeout=5)
            assert not h.status("servicecidrs").disabled
        finally:
            h.stop()


def test_node_changes_force_a_full_sync(api, harness):
    calls = []
    real = harness.app.request_sync
    harness.app.request_sync = lambda full=False: (calls.append(full), real(full))[1]
    api.create(node({"topology.kubernetes.io/zone": "a"}))
    harness.start()
    assert harness.app.state.node.zone == "a"
    calls.clear()
    api.apply(node({"topology.kubernetes.io/zone": "b"}))
    wait_for(lambda: harness.app.state.node.zone == "b")
    wait_for(lambda: calls == [True], what="request_sync(full=True)")
    api.apply(node({"topology.kubernetes.io/zone": "b"}, pod_cidrs=("10.0.9.0/24",)))
    wait_for(lambda: calls == [True, True], what="request_sync(full=True) for podCIDRs")
    # a change of fields kproxy does not read (conditions, heartbeats) asks for nothing
    api.apply(node({"topology.kubernetes.io/zone": "b"}, pod_cidrs=("10.0.9.0/24",),
                   conditions=[{"type": "Ready", "status": "True"}]))
    api.create(web())
    wait_for(lambda: ("demo", "web") in harness.app.state.services)
    time.sleep(0.1)
    assert calls == [True, True, False]


def test_stop_is_prompt_and_leaves_state(api, harness):
    api.bulk_load([web(), web_slice()])
    harness.start()
    assert api.wait_for_watches(4)
    t0 = time.monotonic()
    harness.source.stop()
    assert time.monotonic() - t0 < 2
    assert not any(t.name.startswith("reflector-") and t.is_alive() for t in threading.enumerate())
    assert ("demo", "web") in harness.app.state.services


# -- the command line ----------------------------------------------------------------------------

def kproxy(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    return subprocess.run([sys.executable, "-m", "kproxy", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_run_once_dry_run_against_the_api(api, tmp_path):
    api.bulk_load([web(), web_slice()])
    proc = kproxy("run", "--once", "--dry-run", "--kubeconfig", api.kubeconfig(tmp_path / "kc"),
                  "--hostname-override", NODE, "--cluster-cidr", "10.0.0.0/16")
    assert proc.returncode == 0, proc.stderr
    assert "10.96.0.10" in proc.stdout and "10.0.1.2" in proc.stdout
    assert "initial lists complete" in proc.stderr


def test_run_once_fails_clearly_when_the_lists_do_not_complete(api, tmp_path):
    api.fail_next(1000, 403, path="endpointslices", message="endpointslices is forbidden: User cannot list")
    proc = kproxy("run", "--once", "--dry-run", "--kubeconfig", api.kubeconfig(tmp_path / "kc"),
                  "--hostname-override", NODE, "--initial-sync-timeout", "1.5")
    assert proc.returncode == 1
    assert "the initial lists did not complete within 1.5s: endpointslices (last error:" in proc.stderr
    assert "forbidden" in proc.stderr


def test_run_uses_clientconnection_kubeconfig(api, tmp_path):
    api.bulk_load([web()])
    conf = tmp_path / "config.yaml"
    conf.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    f"hostnameOverride: {NODE}\nclientConnection:\n  kubeconfig: {api.kubeconfig(tmp_path / 'kc')}\n")
    proc = kproxy("run", "--once", "--dry-run", "--config", str(conf))
    assert proc.returncode == 0, proc.stderr
    assert "10.96.0.10" in proc.stdout


def test_status_is_exported_as_metrics(api, harness):
    from prometheus_client import generate_latest

    api.bulk_load([web(), web_slice()])
    harness.start()
    api.create(web("more", "10.96.0.11"))
    wait_for(lambda: harness.status().events >= 1)
    text = generate_latest(harness.app.metrics).decode()
    assert 'kproxy_kube_reflector_synced{resource="services"} 1.0' in text
    assert 'kproxy_kube_reflector_lists_total{resource="endpointslices"} 1.0' in text
    assert 'kproxy_kube_reflector_events_total{resource="services"}' in text
    assert 'kproxy_kube_reflector_errors_total{resource="nodes"} 0.0' in text
