"""connlimit with the in-memory nft backend (FakeNft): layout, partial syncs, options."""

from __future__ import annotations

import logging

import pytest

import kproxy_connlimit as C
from kproxy import config as configmod
from kproxy import model
from kproxy.app import App
from kproxy.config import ConfigError
from kproxy.nft import FakeNft
from kproxy.pluginmanager import make_manager

T4 = ("ip", C.TABLE_NAME)


def make_app(plugin_config=None):
    cfg = configmod.from_dict({"hostnameOverride": "node-1", "clusterCIDR": "10.0.0.0/16",
                               **({"kproxy": plugin_config} if plugin_config else {})})
    pm = make_manager()
    pm.register(C, name=C.PLUGIN)
    app = App(cfg, FakeNft(), pm, [C.PLUGIN])
    app.configure()
    return app


def svc(name, ip, rate=None, port=80, proto="TCP"):
    ann = {C.ANNOTATION: rate} if rate is not None else {}
    return model.Service("demo", name, "ClusterIP", (ip,), (model.ServicePort("http", proto, port),), annotations=ann)


@pytest.mark.parametrize("text,want", [("10/second", (10, "second")), (" 3 / minute ", (3, "minute")), ("1/day", (1, "day"))])
def test_parse_rate(text, want):
    assert C.parse_rate(text) == want


@pytest.mark.parametrize("bad", ["10", "0/second", "ten/second", "10/fortnight", "-1/second", "", None])
def test_parse_rate_rejects(bad):
    with pytest.raises(ValueError):
        C.parse_rate(bad)


def test_annotated_services_share_one_rule_per_rate():
    app = make_app()
    app.state.put(svc("a", "172.30.0.10", "10/second"))
    app.state.put(svc("b", "172.30.0.11", "10/second", proto="UDP", port=53))
    app.state.put(svc("c", "172.30.0.12", "2/minute"))
    app.state.put(svc("plain", "172.30.0.13"))
    assert app.sync(full=True).ok
    nft = app.backend
    assert set(nft.elements(*T4, "limit-10-second")) == {"172.30.0.10 . tcp . 80", "172.30.0.11 . udp . 53"}
    assert set(nft.elements(*T4, "limit-2-minute")) == {"172.30.0.12 . tcp . 80"}
    rules = nft.rules(*T4, "prerouting")
    assert rules == nft.rules(*T4, "output")
    assert len(rules) == 2
    assert rules[0].startswith("ct state new ip daddr . meta l4proto . th dport @limit-10-second update @meter-10-second "
                               "{ ip daddr . meta l4proto . th dport limit rate over 10/second burst 5 packets } counter drop")


def test_partial_sync_only_touches_the_changed_service():
    app = make_app()
    app.state.put(svc("a", "172.30.0.10", "10/second"))
    app.state.put(svc("b", "172.30.0.11", "10/second"))
    assert app.sync(full=True).ok
    app.state.put(svc("b", "172.30.0.11"))  # annotation removed
    result = app.sync()
    assert result.ok and not result.full
    assert set(app.backend.elements(*T4, "limit-10-second")) == {"172.30.0.10 . tcp . 80"}
    ops = result.transaction.render()
    assert "172.30.0.10" not in ops and "delete element ip kproxy-connlimit limit-10-second { 172.30.0.11 . tcp . 80 }" in ops
    app.state.put(svc("a", "172.30.0.10"))  # last user of the rate class gone: sets and rule go
    assert app.sync().ok
    assert app.backend.rules(*T4, "prerouting") == []
    assert "limit-10-second" not in app.backend.list_objects(*T4).sets


def test_bad_annotation_is_logged_and_the_service_skipped(caplog):
    app = make_app()
    app.state.put(svc("bad", "172.30.0.10", "lots"))
    app.state.put(svc("good", "172.30.0.11", "5/second"))
    with caplog.at_level(logging.WARNING, logger="kproxy.connlimit"):
        assert app.sync(full=True).ok
    assert "Service demo/bad: annotation kproxy.io/connection-rate-limit" in caplog.text
    assert set(app.backend.elements(*T4, "limit-5-second")) == {"172.30.0.11 . tcp . 80"}


def test_default_burst_from_the_config_file_and_validation():
    app = make_app({"connlimit": {"default-burst": 9}})
    app.state.put(svc("a", "172.30.0.10", "10/second"))
    assert app.sync(full=True).ok
    assert "burst 9 packets" in app.backend.rules(*T4, "prerouting")[0]
    with pytest.raises(ConfigError, match="plugin connlimit: option default-burst"):
        make_app({"connlimit": {"default-burst": "many"}})


def test_ipv6_service_goes_to_the_ip6_table():
    app = make_app()
    app.state.put(svc("v6", "fd00::10", "1/second"))
    assert app.sync(full=True).ok
    assert set(app.backend.elements("ip6", C.TABLE_NAME, "limit-1-second")) == {"fd00::10 . tcp . 80"}
    assert "ip6 daddr" in app.backend.rules("ip6", C.TABLE_NAME, "prerouting")[0]
