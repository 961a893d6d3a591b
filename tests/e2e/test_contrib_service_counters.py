"""contrib plugin service-counters with real packets: counters move, metrics show them."""

from __future__ import annotations

import json
import sys

import pytest

from objects import endpoint_slice, service

pytest.importorskip("kproxy_service_counters", reason="pip install -e contrib/kproxy-service-counters")

WEB, DNS, IDLE = "172.30.0.10", "172.30.0.53", "172.30.0.77"
PLUGIN = ("--plugin", "service-counters")


def objects():
    return [
        service("web", WEB, [("http", "TCP", 80)]),
        endpoint_slice("web", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)]),
        service("dns", DNS, [("dns", "UDP", 53)]),
        endpoint_slice("dns", ["10.0.1.2"], [("dns", "UDP", 5353)]),
        service("idle", IDLE, [("http", "TCP", 80)]),
        endpoint_slice("idle", ["10.0.1.2"], [("http", "TCP", 8080)]),
    ]


def counters(cluster) -> dict:
    out = cluster.node.run(["nft", "-j", "list", "counters", "table", "ip", "kproxy-counters"]).stdout
    return {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
            for c in json.loads(out)["nftables"] if "counter" in c}


def test_not_enabled_by_installing(clean):
    clean.sync(objects())
    assert "kproxy-counters" not in clean.ruleset()


def test_counters_move_with_real_traffic(clean):
    clean.sync(objects(), *PLUGIN)
    before = counters(clean)
    assert before["pkts.demo.web.http.tcp.80"] == (0, 0)
    results = clean.client.probe(WEB, 80, "tcp", count=10)
    assert all(r.ok for r in results), [r.outcome for r in results]
    assert all(r.ok for r in clean.ext.probe(DNS, 53, "udp", count=4))
    after = counters(clean)
    assert after["new.demo.web.http.tcp.80"][0] == 10
    assert after["pkts.demo.web.http.tcp.80"][0] >= 10 * 6  # handshake, request, reply, teardown: both directions
    assert after["pkts.demo.web.http.tcp.80"][1] > after["pkts.demo.web.http.tcp.80"][0] * 40
    assert after["new.demo.dns.dns.udp.53"][0] == 4 and after["pkts.demo.dns.dns.udp.53"][0] == 8  # query + answer
    assert after["pkts.demo.idle.http.tcp.80"] == (0, 0)
    # a second run (a kproxy restart) keeps the values; a removed Service loses its counters
    clean.sync(objects()[:4], *PLUGIN)
    again = counters(clean)
    assert again["pkts.demo.web.http.tcp.80"] == after["pkts.demo.web.http.tcp.80"]
    assert "pkts.demo.idle.http.tcp.80" not in again
    # and the plugin's table survives runs of kproxy without the plugin only until cleanup
    clean.kproxy("cleanup")
    assert "kproxy-counters" not in clean.ruleset()


SCRAPE = r"""
# What /metrics serves for the plugin: its collector in a fresh App on the real nft
# (the counters' comments carry the labels, so no sync is needed to read them).
from prometheus_client import generate_latest
import kproxy_service_counters as S
from kproxy import config
from kproxy.app import App
from kproxy.nft import NftCLI
from kproxy.pluginmanager import make_manager
pm = make_manager()
pm.register(S, name=S.PLUGIN)
app = App(config.from_dict({"hostnameOverride": "node-1"}), NftCLI(), pm, [S.PLUGIN])
app.configure()
print(generate_latest(app.metrics).decode())
"""


def scrape(cluster) -> dict:
    text = cluster.node.run([sys.executable, "-c", SCRAPE]).stdout
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("kproxy_service_")}


def test_metrics_show_the_counters(clean):
    clean.sync(objects(), *PLUGIN)
    labels = 'namespace="demo",port="http",protocol="tcp",service="web"'
    before = scrape(clean)
    assert before[f"kproxy_service_new_connections_total{{{labels}}}"] == 0
    assert all(r.ok for r in clean.client.probe(WEB, 80, "tcp", count=5))
    after = scrape(clean)
    assert after[f"kproxy_service_new_connections_total{{{labels}}}"] == 5
    assert after[f"kproxy_service_packets_total{{{labels}}}"] >= 30
    assert after[f"kproxy_service_bytes_total{{{labels}}}"] > 1000
    assert after['kproxy_service_new_connections_total{namespace="demo",port="dns",protocol="udp",service="dns"}'] == 0
