"""contrib plugin connlimit with real packets: new connections over the rate are dropped."""

from __future__ import annotations

import sys
import time

import pytest

from objects import endpoint_slice, service

pytest.importorskip("kproxy_connlimit", reason="pip install -e contrib/kproxy-connlimit")

LIMITED, FREE = "172.30.0.10", "172.30.0.11"
ANNOTATION = "kproxy.io/connection-rate-limit"


def objects(rate="5/second"):
    return [
        service("limited", LIMITED, [("http", "TCP", 80)]),
        endpoint_slice("limited", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)]),
        service("free", FREE, [("http", "TCP", 80)]),
        endpoint_slice("free", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)]),
    ]


def annotate(objs, rate):
    objs[0]["metadata"]["annotations"] = {ANNOTATION: rate}
    return objs


# Opens N connections at once (non-blocking connects) and prints how many were
# established 0.8 s later (before the first SYN retransmission).
BURST = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    socks.append(s)
time.sleep(0.8)
ok = 0
for s in socks:
    try:
        s.getpeername()
        ok += 1
    except OSError:
        pass
print(ok)
"""


def burst(pod, host, n=30) -> int:
    return int(pod.run([sys.executable, "-c", BURST, host, "80", str(n)]).stdout)


def test_rate_limit_drops_connections_over_the_rate(clean):
    proc = clean.sync(annotate(objects(), "5/second"), "--plugin", "connlimit")
    assert "kproxy-connlimit" in clean.ruleset(), proc.stderr
    ok = burst(clean.client, LIMITED)
    assert 5 <= ok <= 10, ok
    assert burst(clean.client, FREE) == 30  # an unannotated Service is unaffected
    time.sleep(1.2)  # the bucket refills at the rate
    assert 5 <= burst(clean.client, LIMITED) <= 10


def test_burst_option_on_the_command_line_and_in_the_config(clean):
    clean.sync(annotate(objects(), "1/minute"), "--plugin", "connlimit", "--connlimit-default-burst", "3")
    ok = sum(r.ok for r in clean.client.probe(LIMITED, 80, "tcp", count=10, timeout=0.5))
    assert 3 <= ok <= 4
    clean.kproxy("cleanup")
    clean.sync(annotate(objects(), "1/minute"), "--plugin", "connlimit", config={"kproxy": {"connlimit": {"default-burst": 7}}})
    ok = sum(r.ok for r in clean.client.probe(LIMITED, 80, "tcp", count=12, timeout=0.5))
    assert 7 <= ok <= 8


def test_bad_annotation_is_logged_and_ignored(clean):
    proc = clean.sync(annotate(objects(), "fast"), "--plugin", "connlimit")
    assert "Service demo/limited: annotation kproxy.io/connection-rate-limit" in proc.stderr
    assert all(r.ok for r in clean.client.probe(LIMITED, 80, "tcp", count=20, timeout=0.5))


def test_not_enabled_by_installing(clean):
    clean.sync(annotate(objects(), "1/minute"))
    assert "kproxy-connlimit" not in clean.ruleset()
    assert all(r.ok for r in clean.client.probe(LIMITED, 80, "tcp", count=10, timeout=0.5))
