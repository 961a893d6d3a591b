"""service-counters with the in-memory nft backend (FakeNft): layout, partial syncs, metrics."""

from __future__ import annotations

from prometheus_client import generate_latest

import kproxy_service_counters as S
from kproxy import config as configmod
from kproxy import model
from kproxy.app import App
from kproxy.nft import FakeNft
from kproxy.pluginmanager import make_manager

T4 = ("ip", S.TABLE_NAME)


def make_app(backend=None):
    cfg = configmod.from_dict({"hostnameOverride": "node-1", "clusterCIDR": "10.0.0.0/16"})
    pm = make_manager()
    pm.register(S, name=S.PLUGIN)
    app = App(cfg, backend or FakeNft(), pm, [S.PLUGIN])
    app.configure()
    return app


def svc(name, ips, ports=(("http", "TCP", 80),), **kw):
    return model.Service("demo", name, "ClusterIP", tuple(ips),
                         tuple(model.ServicePort(n, p, num) for n, p, num in ports), **kw)


def metrics(app) -> str:
    return generate_latest(app.metrics).decode()


def test_counters_maps_and_rules():
    app = make_app()
    app.state.put(svc("web", ["172.30.0.10", "fd00::10"], external_ips=("192.168.99.1",)))
    app.state.put(svc("dns", ["172.30.0.53"], ports=(("dns", "UDP", 53), ("", "TCP", 53))))
    assert app.sync(full=True).ok
    nft = app.backend
    assert set(nft.counters(*T4)) == {"pkts.demo.web.http.tcp.80", "new.demo.web.http.tcp.80", "pkts.demo.dns.dns.udp.53",
                                      "new.demo.dns.dns.udp.53", "pkts.demo.dns.tcp.53", "new.demo.dns.tcp.53"}
    assert nft.elements(*T4, S.PACKETS_MAP) == {"172.30.0.10 . tcp . 80": '"pkts.demo.web.http.tcp.80"',
                                                "192.168.99.1 . tcp . 80": '"pkts.demo.web.http.tcp.80"',
                                                "172.30.0.53 . udp . 53": '"pkts.demo.dns.dns.udp.53"',
                                                "172.30.0.53 . tcp . 53": '"pkts.demo.dns.tcp.53"'}
    assert nft.elements("ip6", S.TABLE_NAME, S.NEW_MAP) == {"fd00::10 . tcp . 80": '"new.demo.web.http.tcp.80"'}
    assert nft.rules(*T4, "prerouting")[-1] == "ct state new counter name ip daddr . meta l4proto . th dport map @service-new-connections"
    assert len(nft.rules(*T4, "output")) == 4


def test_metrics_are_read_at_scrape_time_and_summed_over_families():
    app = make_app()
    app.state.put(svc("web", ["172.30.0.10", "fd00::10"]))
    assert app.sync(full=True).ok
    app.backend.count(*T4, "pkts.demo.web.http.tcp.80", 10, 1000)
    app.backend.count("ip6", S.TABLE_NAME, "pkts.demo.web.http.tcp.80", 1, 100)
    app.backend.count(*T4, "new.demo.web.http.tcp.80", 2, 120)
    text = metrics(app)
    labels = 'namespace="demo",port="http",protocol="tcp",service="web"'
    assert f"kproxy_service_packets_total{{{labels}}} 11.0" in text
    assert f"kproxy_service_bytes_total{{{labels}}} 1100.0" in text
    assert f"kproxy_service_new_connections_total{{{labels}}} 2.0" in text


def test_partial_sync_touches_only_the_changed_service_and_keeps_values():
    app = make_app()
    app.state.put(svc("web", ["172.30.0.10"]))
    app.state.put(svc("dns", ["172.30.0.53"], ports=(("dns", "UDP", 53),)))
    assert app.sync(full=True).ok
    app.backend.count(*T4, "pkts.demo.web.http.tcp.80", 5, 500)
    n = len(app.backend.transactions)
    app.state.remove("Service", "demo", "dns")
    assert app.sync().ok
    ours = app.backend.transactions[-1].render()  # our own transaction, after the main one
    assert len(app.backend.transactions) == n + 2
    assert "web" not in ours and "delete counter ip kproxy-counters pkts.demo.dns.dns.udp.53" in ours
    assert set(app.backend.counters(*T4)) == {"pkts.demo.web.http.tcp.80", "new.demo.web.http.tcp.80"}
    assert 'service="dns"' not in metrics(app)
    assert app.backend.counters(*T4)["pkts.demo.web.http.tcp.80"] == (5, 500, "demo/web/http/tcp")


def test_restart_keeps_counter_values_and_removes_stale_counters():
    nft = FakeNft()
    app = make_app(nft)
    app.state.put(svc("web", ["172.30.0.10"]))
    app.state.put(svc("old", ["172.30.0.11"]))
    assert app.sync(full=True).ok
    nft.count(*T4, "pkts.demo.web.http.tcp.80", 7, 700)
    again = make_app(nft)  # a new kproxy process on the same kernel
    again.state.put(svc("web", ["172.30.0.10"]))
    assert again.sync(full=True).ok
    assert {n: c[:2] for n, c in nft.counters(*T4).items()} == {"pkts.demo.web.http.tcp.80": (7, 700), "new.demo.web.http.tcp.80": (0, 0)}


def test_render_script_is_complete():
    app = make_app()
    app.state.put(svc("web", ["172.30.0.10"]))
    ctx = app.engine.render_script(app.state.snapshot())[1]
    text = S.kproxy_render_script(ctx).render()
    assert "add counter ip kproxy-counters pkts.demo.web.http.tcp.80" in text
    assert 'add element ip kproxy-counters service-counters { 172.30.0.10 . tcp . 80 : "pkts.demo.web.http.tcp.80" }' in text
