"""healthCheckNodePort servers over real HTTP (plugin healthcheck-nodeports).

``kproxy run`` runs long in the node namespace on manifests it watches; the Node object
makes 192.168.50.1 (the ext pod's gateway) the node's primary IP, so with the default
``nodePortAddresses: [primary]`` the health check server listens there, and the ext pod
asks it over HTTP.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from objects import endpoint_slice, lb_status, node, service, write_manifests

NODE_IP = "192.168.50.1"
HCNP = 32100

GET = r"""
import json, sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
except urllib.error.HTTPError as e:
    r = e
except OSError as e:
    print(json.dumps({"error": str(e)})); sys.exit()
print(json.dumps({"status": r.status if hasattr(r, "status") else r.code, "headers": dict(r.headers),
                  "body": json.loads(r.read())}))
"""


def objects(endpoint_node):
    return [
        node(addresses=[NODE_IP]),
        service("lb", "172.30.0.20", [("http", "TCP", 80, 30080)], type="LoadBalancer",
                externalTrafficPolicy="Local", healthCheckNodePort=HCNP, status=lb_status("192.168.99.20")),
        endpoint_slice("lb", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)], node=endpoint_node),
    ]


def ask(cluster) -> dict:
    """GET http://NODE_IP:HCNP/ from the ext pod."""
    return json.loads(cluster.ext.run([sys.executable, "-c", GET, f"http://{NODE_IP}:{HCNP}/"], timeout=20).stdout)


def wait_for(fn, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if cond(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture
def running(clean):
    """``kproxy run`` on a manifest directory the test rewrites."""
    manifests = write_manifests(clean.tmp / "hcnp", objects("node-1"))
    config = clean.write_config("hcnp.yaml", nftables={"minSyncPeriod": "100ms"},
                                metricsBindAddress="127.0.0.1:0", healthzBindAddress="0.0.0.0:0")
    with clean.run_kproxy("--config", config, "--manifests", manifests, log_name="kproxy-hcnp.log") as (proc, log_path):
        yield clean, manifests, proc, log_path


def test_health_check_node_port_answers_with_local_endpoint_count(running):
    cluster, manifests, proc, log_path = running
    first = wait_for(lambda: ask(cluster), lambda r: "status" in r)
    assert "status" in first, (first, log_path.read_text())
    assert first["status"] == 200, first
    assert first["body"] == {"service": {"namespace": "demo", "name": "lb"}, "localEndpoints": 2,
                             "serviceProxyHealthy": True}
    headers = {k.lower(): v for k, v in first["headers"].items()}
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-load-balancing-endpoint-weight"] == "2"

    write_manifests(manifests, objects("node-2"))  # both endpoints move to another node
    moved = wait_for(lambda: ask(cluster), lambda r: r.get("status") == 503)
    assert moved.get("status") == 503, (moved, log_path.read_text())
    assert moved["body"]["localEndpoints"] == 0 and moved["body"]["serviceProxyHealthy"] is True
    assert {k.lower(): v for k, v in moved["headers"].items()}["x-load-balancing-endpoint-weight"] == "0"

    write_manifests(manifests, objects("node-1")[:1])  # the Service is gone: so is its server
    gone = wait_for(lambda: ask(cluster), lambda r: "error" in r)
    assert "error" in gone, gone
    assert proc.poll() is None, log_path.read_text()
