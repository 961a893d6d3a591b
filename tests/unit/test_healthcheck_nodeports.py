"""healthcheck-nodeports: the per-Service health check servers, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from kproxy.app import App
from kproxy.config import Config
from kproxy.model import from_api
from kproxy.nft import FakeNft
from kproxy.pluginmanager import make_manager
from kproxy.state import ClusterState
from kproxy_plugins import healthcheck_nodeports as hc
from objects import endpoint, endpoint_slice, lb_status, node, service

NODE = "node-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path="/"):
    """(status, headers, JSON body) of a GET to 127.0.0.1:port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def lb(hcnp, name="web", policy="Local", type_="LoadBalancer"):
    spec = {"type": type_, "externalTrafficPolicy": policy}
    if hcnp:
        spec["healthCheckNodePort"] = hcnp
    return service(name, "172.30.0.10", [("http", "TCP", 80, 30080)], status=lb_status("192.168.99.1"), **spec)


def web_slice(*eps, name="web"):
    return endpoint_slice(name, list(eps), [("http", "TCP", 8080)])


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setattr(hc, "bind_addresses", lambda ctx: ["127.0.0.1"])
    pm = make_manager()
    pm.register(hc, name="healthcheck-nodeports")
    a = App(Config(node_name=NODE), FakeNft(), pm, ["healthcheck-nodeports"])
    a.configure()
    yield a
    a.unconfigure()


def put(app, *objects):
    for obj in objects:
        app.state.put(from_api(obj["kind"], obj))


def test_local_ready_endpoints_answer_200_with_kube_proxys_body_and_headers(app):
    port = free_port()
    put(app, lb(port), web_slice("10.0.1.2", "10.0.2.2"))
    assert app.sync(full=True).ok
    status, headers, body = get(port, "/any/path")
    assert status == 200
    assert body == {"service": {"namespace": "demo", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": True}
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"


def test_no_local_ready_endpoint_answers_503(app):
    port = free_port()
    put(app, lb(port), web_slice(endpoint("10.0.1.2", node="node-2"), endpoint("10.0.2.2", ready=False),
                                 endpoint("10.0.3.2", ready=False, serving=True, terminating=True)))
    assert app.sync(full=True).ok
    status, headers, body = get(port)
    assert status == 503
    assert body["localEndpoints"] == 0 and body["serviceProxyHealthy"] is True
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"


def test_counts_follow_partial_syncs_and_servers_come_and_go(app):
    port, port2 = free_port(), free_port()
    put(app, lb(port), web_slice("10.0.1.2"))
    assert app.sync(full=True).ok
    assert get(port)[2]["localEndpoints"] == 1
    put(app, web_slice("10.0.1.2", "10.0.2.2", endpoint("10.0.3.2", node="node-2")))
    assert not app.sync().full
    assert get(port)[2]["localEndpoints"] == 2
    put(app, lb(port2))  # the healthCheckNodePort moved
    app.sync()
    assert refused(port) and get(port2)[0] == 200
    put(app, lb(port2, policy="Cluster"))  # no health check for externalTrafficPolicy Cluster
    app.sync()
    assert refused(port2)
    put(app, lb(port2))
    app.sync()
    assert get(port2)[0] == 200
    app.state.remove("Service", "demo", "web")
    app.sync()
    assert refused(port2)


def test_only_loadbalancer_services_with_local_policy_get_a_server(app):
    port = free_port()
    put(app, lb(port, type_="NodePort"), web_slice("10.0.1.2"))
    app.sync(full=True)
    assert refused(port)


def test_port_in_use_is_logged_and_retried_at_the_next_sync(app, caplog):
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    put(app, lb(port), web_slice("10.0.1.2"))
    assert app.sync(full=True).ok
    assert "FailedToStartServiceHealthcheck" in caplog.text and "demo/web" in caplog.text
    blocker.close()
    put(app, service("other", "172.30.0.11", [("http", "TCP", 80)]))  # a partial sync for another Service
    assert not app.sync().full
    assert get(port)[0] == 200


def test_unhealthy_proxy_answers_503(app):
    port = free_port()
    put(app, lb(port), web_slice("10.0.1.2"))
    app.sync(full=True)
    app.health = SimpleNamespace(healthy=lambda: False)
    status, _, body = get(port)
    assert status == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 1


def test_without_core_health_a_sync_failing_for_two_sync_periods_is_unhealthy(app):
    port = free_port()
    put(app, lb(port), web_slice("10.0.1.2"))
    app.sync(full=True)
    app.health = None
    checks = app.plugin_data[hc.__name__]
    checks.observe(SimpleNamespace(ok=False))
    assert get(port)[0] == 200  # failing, but not for long yet
    checks.failing_since = time.monotonic() - 2 * app.config.sync_period - 1
    assert get(port)[0] == 503
    checks.observe(SimpleNamespace(ok=True))
    assert get(port)[0] == 200


def test_unconfigure_stops_every_server(app):
    port = free_port()
    put(app, lb(port), web_slice("10.0.1.2"))
    app.sync(full=True)
    assert get(port)[0] == 200
    app.unconfigure()
    assert refused(port)
    assert hc.__name__ not in app.plugin_data


def test_bind_addresses_follow_node_port_addresses(monkeypatch):
    st = ClusterState(node_name=NODE)
    st.put(from_api("Node", node(NODE, addresses=["192.168.50.1", "fd00:50::1"])))
    ctx = SimpleNamespace(config=Config(node_name=NODE), state=st)
    assert hc.bind_addresses(ctx) == ["192.168.50.1", "fd00:50::1"]  # primary: the Node's primary IPs
    ctx.config = Config(node_name=NODE, node_port_addresses=("0.0.0.0/0", "::/0"))
    assert hc.bind_addresses(ctx) == ["0.0.0.0", "::"]
