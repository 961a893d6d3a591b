"""The fastpath plugin with the in-memory nft backend and fake link lists.

The fake backend below behaves like the kernel where it matters here: a flowtable
device must exist (else "No such file or directory"), a deleted link disappears from
the flowtable by itself, and (optionally) flowtables are not supported at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kproxy import config as configmod
from kproxy import model
from kproxy.app import App
from kproxy.links import Link
from kproxy.nft import FakeNft, Flowtable, NftError
from kproxy.pluginmanager import make_manager
from kproxy_plugins import fastpath, service_maps
from kproxy_plugins.fastpath import devices as D
from kproxy_plugins.fastpath import ruleset as R
from kproxy_plugins.linkwatch import Debouncer

FT = ("inet", "kproxy-fastpath")


# -- fakes ----------------------------------------------------------------------------

class KernelFake(FakeNft):
    """FakeNft plus the kernel's view of links: ``links`` is the set of existing names."""

    def __init__(self, links=(), flowtables=True):
        super().__init__()
        self.links = set(links)
        self.flowtables_supported = flowtables

    def _add_flowtable(self, o: Flowtable, op):
        if not self.flowtables_supported:
            raise NftError("Could not process rule: No such file or directory")
        missing = [d for d in o.devices if d not in self.links]
        if missing:
            raise NftError(f"Could not process rule: No such file or directory (device {missing[0]})")
        super()._add_flowtable(o, op)

    def list_objects(self, family, table):
        listing = super().list_objects(family, table)
        for name, ft in list(listing.flowtables.items()):  # deleted links leave the flowtable
            listing.flowtables[name] = Flowtable(ft.family, ft.table, ft.name, ft.hook, ft.priority,
                                                 tuple(d for d in ft.devices if d in self.links))
        return listing

    def flowtable_devices(self):
        return self.list_objects(*FT).flowtables[R.FLOWTABLE].devices


def link(name, kind="", index=0, up=True, loopback=False):
    return Link(name, index, kind, up, loopback)


NODE_LINKS = (
    link("lo", "", 1, loopback=True),
    link("eth0", "", 2),
    link("uplink0", "dummy", 3),
    link("veth-a", "veth", 4),
    link("veth-b", "veth", 5),
    link("veth-down", "veth", 6, up=False),
)


class Links:
    """A fake link lister: returns ``current`` (or the queued answers first)."""

    def __init__(self, links=NODE_LINKS):
        self.current = tuple(links)
        self.queued: list[tuple] = []
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.queued.pop(0) if self.queued else self.current


def config(**extra):
    return configmod.from_dict({"hostnameOverride": "node-1", "clusterCIDR": "10.0.0.0/16", **extra})


def service(name, ip, ports=(("TCP", 80),), annotations=None, ns="demo"):
    return model.from_api("Service", {
        "kind": "Service", "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": {"clusterIP": ip, "ports": [{"name": f"p{i}", "protocol": p, "port": port}
                                            for i, (p, port) in enumerate(ports)]}})


def make_app(monkeypatch, backend=None, links=None, options=None, conf=None):
    """service-maps + fastpath on a fake kernel, configured (the probe has run)."""
    links = links or Links()
    backend = backend if backend is not None else KernelFake({l.name for l in links.current})
    monkeypatch.setattr(fastpath, "list_links", links)
    pm = make_manager()
    pm.register(fastpath, name="fastpath")
    pm.register(service_maps, name="service-maps")
    cli = {("fastpath", k): str(v) for k, v in (options or {}).items()}
    app = App(conf or config(), backend, pm, ["service-maps", "fastpath"], cli)
    app.configure()
    return app, backend, links


def metric(app, name):
    return app.metrics.get_sample_value(name) or 0.0


def elements(backend):
    return {**backend.elements(*FT, R.SETS[4]), **backend.elements(*FT, R.SETS[6])}


# -- options, probe, threshold 0 ------------------------------------------------------

def test_threshold_zero_means_no_table_and_removes_an_old_one(monkeypatch):
    backend = KernelFake({l.name for l in NODE_LINKS})
    backend.apply(R.build(20, ["eth0"], {(4, "172.30.0.10 . tcp . 80")}))  # left from an earlier run
    app, backend, _ = make_app(monkeypatch, backend, options={"packet-threshold": 0})
    assert FT not in backend.list_tables()
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    assert FT not in backend.list_tables()
    assert not any(t[1].startswith("kproxy-fastpath") for t in backend.list_tables())
    assert metric(app, "kproxy_fastpath_active") == 0


def test_threshold_from_kube_proxy_configuration_field(monkeypatch):
    app, backend, _ = make_app(monkeypatch, conf=config(nftables={"fastpathPacketThreshold": 7}))
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    assert all("ct packets > 7 flow add @fastpath" in r for r in backend.rules(*FT, R.CHAIN))


def test_probe_failure_disables_fastpath_with_one_clear_warning(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    backend = KernelFake({l.name for l in NODE_LINKS}, flowtables=False)
    app, backend, _ = make_app(monkeypatch, backend)
    app.state.put(service("web", "172.30.0.10"))
    result = app.sync(full=True)
    assert result.ok, result.error
    assert app.sync(full=True).ok
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("kproxy.fastpath")]
    assert len(warnings) == 1, warnings
    assert "nf_flow_table" in warnings[0] and "CONFIG_NF_FLOW_TABLE" in warnings[0]
    assert FT not in backend.list_tables()
    assert ("inet", "kproxy-fastpath-probe") not in backend.list_tables()
    assert backend.elements("ip", "kproxy", "cluster-ips") == {"172.30.0.10": None}  # the rest works
    assert metric(app, "kproxy_fastpath_active") == 0


def test_probe_leaves_nothing_behind(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    assert backend.list_tables() == []
    assert "add flowtable inet kproxy-fastpath-probe probe" in backend.transactions[0].render()


# -- the table ------------------------------------------------------------------------

def test_table_is_programmed_after_the_sync_in_its_own_transaction(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10", [("TCP", 80), ("UDP", 53), ("SCTP", 9)]))
    app.state.put(service("v6", "fd00::10", [("TCP", 443)]))
    result = app.sync(full=True)
    assert result.ok, result.error
    assert "kproxy-fastpath" not in result.transaction.render()  # never in the main transaction
    assert backend.flowtable_devices() == ("eth0", "veth-a", "veth-b")
    assert elements(backend) == {"172.30.0.10 . tcp . 80": None, "172.30.0.10 . udp . 53": None,
                                 "fd00::10 . tcp . 443": None}  # no SCTP: flowtables cannot offload it
    rules = backend.rules(*FT, R.CHAIN)
    assert rules == [
        "meta nfproto ipv4 meta l4proto tcp ct original ip daddr . meta l4proto . ct original proto-dst @offload-v4 ct packets > 20 flow add @fastpath",
        "meta nfproto ipv4 meta l4proto udp ct original ip daddr . meta l4proto . ct original proto-dst @offload-v4 ct packets > 20 flow add @fastpath",
        "meta nfproto ipv6 meta l4proto tcp ct original ip6 daddr . meta l4proto . ct original proto-dst @offload-v6 ct packets > 20 flow add @fastpath",
        "meta nfproto ipv6 meta l4proto udp ct original ip6 daddr . meta l4proto . ct original proto-dst @offload-v6 ct packets > 20 flow add @fastpath",
    ]
    chain = backend.list_objects(*FT).chains[R.CHAIN]
    assert (chain.type, chain.hook, chain.priority) == ("filter", "forward", R.PRIORITY)
    assert metric(app, "kproxy_fastpath_active") == 1
    assert metric(app, "kproxy_fastpath_flowtable_devices") == 3


def test_full_sync_keeps_the_fastpath_table(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    n = len(backend.transactions)
    result = app.sync(full=True)
    assert result.ok
    assert "kproxy-fastpath" not in result.transaction.render()  # not removed as stale
    assert elements(backend) == {"172.30.0.10 . tcp . 80": None}
    assert all("kproxy-fastpath" not in t.render() for t in backend.transactions[n:])  # nothing to do


def test_partial_sync_applies_only_the_difference(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    n = len(backend.transactions)
    app.state.put(service("db", "172.30.0.20", [("TCP", 5432)]))
    app.state.remove("Service", "demo", "web")
    assert app.sync().ok
    assert elements(backend) == {"172.30.0.20 . tcp . 5432": None}
    mine = [t.render() for t in backend.transactions[n:] if "kproxy-fastpath" in t.render()]
    assert mine == ["delete element inet kproxy-fastpath offload-v4 { 172.30.0.10 . tcp . 80 }\n"
                    "add element inet kproxy-fastpath offload-v4 { 172.30.0.20 . tcp . 5432 }\n"]


def test_table_removed_behind_our_back_is_recreated(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    del backend.tables[FT]  # e.g. someone ran nft flush ruleset / kproxy cleanup
    app.state.put(service("db", "172.30.0.20"))
    assert app.sync().ok
    assert elements(backend) == {"172.30.0.10 . tcp . 80": None, "172.30.0.20 . tcp . 80": None}


def test_a_failing_fastpath_never_fails_the_main_sync(monkeypatch):
    class Broken(KernelFake):
        def apply(self, txn):
            if "kproxy-fastpath " in txn.render():
                raise NftError("Could not process rule: Operation not supported")
            super().apply(txn)

    app, backend, _ = make_app(monkeypatch, Broken({l.name for l in NODE_LINKS}))
    app.state.put(service("web", "172.30.0.10"))
    result = app.sync(full=True)
    assert result.ok, result.error
    assert backend.elements("ip", "kproxy", "cluster-ips") == {"172.30.0.10": None}
    assert metric(app, "kproxy_fastpath_active") == 0


# -- per-Service control ----------------------------------------------------------------

def test_opt_out_annotation(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    app.state.put(service("audited", "172.30.0.11", annotations={"kproxy.io/fastpath": "false"}))
    app.state.put(service("explicit", "172.30.0.12", annotations={"kproxy.io/fastpath": "True"}))
    assert app.sync(full=True).ok
    assert set(elements(backend)) == {"172.30.0.10 . tcp . 80", "172.30.0.12 . tcp . 80"}
    # opting out later removes the element
    app.state.put(service("web", "172.30.0.10", annotations={"kproxy.io/fastpath": "false"}))
    assert app.sync().ok
    assert set(elements(backend)) == {"172.30.0.12 . tcp . 80"}


def test_opt_in_mode(monkeypatch, caplog):
    app, backend, _ = make_app(monkeypatch, options={"mode": "opt-in"})
    app.state.put(service("web", "172.30.0.10"))
    app.state.put(service("bulk", "172.30.0.11", annotations={"kproxy.io/fastpath": "true"}))
    app.state.put(service("odd", "172.30.0.12", annotations={"kproxy.io/fastpath": "yes please"}))
    assert app.sync(full=True).ok
    assert set(elements(backend)) == {"172.30.0.11 . tcp . 80"}
    assert any("yes please" in r.getMessage() for r in caplog.records)


def test_bad_mode_is_a_config_error(monkeypatch):
    with pytest.raises(configmod.ConfigError, match="opt-out, opt-in"):
        make_app(monkeypatch, options={"mode": "sometimes"})


# -- devices ----------------------------------------------------------------------------

@pytest.mark.parametrize("links, must_have", [
    (NODE_LINKS, {"eth0", "veth-a"}),
    ((link("lo", loopback=True), link("ens3"), link("cali1234abcd", "veth")), {"ens3", "cali1234abcd"}),
    ((link("lo", loopback=True), link("eno1"), link("eno2"), link("bond0", "bond"), link("bond0.100", "vlan"),
      link("vethabc", "veth")), {"bond0", "bond0.100", "vethabc"}),
    ((link("lo", loopback=True), link("eth0"), link("flannel.1", "vxlan"), link("cni0", "bridge"),
      link("veth1", "veth")), {"eth0", "flannel.1", "veth1"}),
])
def test_device_list_is_never_empty_on_a_node_with_eligible_links(monkeypatch, links, must_have):
    """The seed's bug: the listing never added a name, the flowtable stayed empty."""
    assert must_have <= set(D.eligible_devices(links))
    app, backend, _ = make_app(monkeypatch, links=Links(links))
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    devices = backend.flowtable_devices()
    assert devices, "the flowtable has no devices although the node has eligible links"
    assert must_have <= set(devices)
    assert metric(app, "kproxy_fastpath_flowtable_devices") == len(devices) > 0


def test_eligibility_rules():
    k = (6, 1)
    assert D.eligible(link("eth0"), k)
    assert D.eligible(link("veth1", "veth"), k)
    assert not D.eligible(link("lo", loopback=True), k)
    assert not D.eligible(link("veth2", "veth", up=False), k)
    for kind in ("dummy", "ifb", "vrf", "openvswitch", "nlmon", "something-new"):
        assert not D.eligible(link("x0", kind), k), kind
    assert D.eligible(link("br0", "bridge"), (5, 13)) and not D.eligible(link("br0", "bridge"), (5, 12))
    assert not D.eligible(link("1weird"), k)  # nft 1.0.6 cannot parse it unquoted
    assert D.kernel_version("6.1.0-56-amd64") == (6, 1) and D.kernel_version("garbage") == (0, 0)


def test_many_devices_are_sent_in_chunks():
    names = [f"veth{i}" for i in range(300)]
    txn = R.add_devices(names)
    assert len(txn.ops) == 3
    assert all(len(op.obj.devices) <= D.CHUNK for op in txn.ops)
    assert sorted(d for op in txn.ops for d in op.obj.devices) == sorted(names)


def test_new_device_is_added_without_rebuilding(monkeypatch):
    app, backend, links = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    updates = metric(app, "kproxy_fastpath_device_updates_total")
    links.current += (link("veth-c", "veth", 7),)
    backend.links.add("veth-c")
    app.announce_interfaces(links.current)
    n = len(backend.transactions)
    assert app.sync().ok
    assert backend.flowtable_devices() == ("eth0", "veth-a", "veth-b", "veth-c")
    mine = [t.render() for t in backend.transactions[n:] if "kproxy-fastpath" in t.render()]
    assert mine == ["add flowtable inet kproxy-fastpath fastpath { hook ingress priority filter ; devices = { veth-c } ; }\n"]
    assert metric(app, "kproxy_fastpath_device_updates_total") == updates + 1


def test_removed_device_rebuilds_the_flowtable(monkeypatch):
    app, backend, links = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    links.current = tuple(l if l.name != "veth-b" else link("veth-b", "veth", 5, up=False) for l in links.current)
    app.announce_interfaces(links.current)
    assert app.sync().ok
    assert backend.flowtable_devices() == ("eth0", "veth-a")
    assert len(backend.rules(*FT, R.CHAIN)) == 4  # the rules came back
    assert elements(backend) == {"172.30.0.10 . tcp . 80": None}


def test_deleted_device_leaves_by_itself_and_the_next_sync_succeeds(monkeypatch):
    app, backend, links = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    backend.links.discard("veth-b")  # the kernel drops it from the flowtable
    links.current = tuple(l for l in links.current if l.name != "veth-b")
    app.announce_interfaces(links.current)
    app.state.put(service("db", "172.30.0.20"))
    result = app.sync()
    assert result.ok, result.error
    assert backend.flowtable_devices() == ("eth0", "veth-a")
    assert metric(app, "kproxy_fastpath_device_update_failures_total") == 0


def test_device_vanishing_between_listing_and_programming_is_pruned_and_retried(monkeypatch):
    links = Links()
    backend = KernelFake({"eth0", "veth-a"})  # veth-b is already gone in the kernel
    links.queued = [NODE_LINKS]  # ... but the first listing still saw it
    links.current = tuple(l for l in NODE_LINKS if l.name != "veth-b")
    app, backend, _ = make_app(monkeypatch, backend, links)
    app.state.put(service("web", "172.30.0.10"))
    result = app.sync(full=True)
    assert result.ok, result.error
    assert backend.flowtable_devices() == ("eth0", "veth-a")
    assert links.calls == 2  # listed again after the rejection
    assert metric(app, "kproxy_fastpath_device_updates_total") == 1
    assert metric(app, "kproxy_fastpath_device_update_failures_total") == 0
    assert metric(app, "kproxy_fastpath_active") == 1


def test_same_race_on_a_device_update(monkeypatch):
    app, backend, links = make_app(monkeypatch)
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    flapping = links.current + (link("veth-c", "veth", 7),)
    links.queued = [flapping]  # veth-c is listed but gone before the transaction
    app.announce_interfaces(flapping)
    assert app.sync().ok
    assert backend.flowtable_devices() == ("eth0", "veth-a", "veth-b")
    assert metric(app, "kproxy_fastpath_device_update_failures_total") == 0


def test_persistent_device_failure_gives_up_for_the_round_and_retries_later(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    backend = KernelFake({"eth0"})  # the kernel rejects veth-a and veth-b, every time
    app, backend, links = make_app(monkeypatch, backend)
    app.state.put(service("web", "172.30.0.10"))
    result = app.sync(full=True)
    assert result.ok, result.error
    assert backend.flowtable_devices() == ()  # created without devices, rules and set in place
    assert elements(backend) == {"172.30.0.10 . tcp . 80": None}
    assert metric(app, "kproxy_fastpath_device_update_failures_total") == 1
    assert any("retrying at the next interface change or sync" in r.getMessage() for r in caplog.records)
    # the devices work again: the next sync (of anything) brings them in
    backend.links |= {"veth-a", "veth-b"}
    app.state.put(service("db", "172.30.0.20"))
    assert app.sync().ok
    assert backend.flowtable_devices() == ("eth0", "veth-a", "veth-b")
    assert metric(app, "kproxy_fastpath_device_updates_total") == 1
    assert metric(app, "kproxy_fastpath_flowtable_devices") == 3


# -- render -------------------------------------------------------------------------------

def test_render_shows_the_fastpath_table(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from kproxy.cli import cli

    monkeypatch.setattr(fastpath, "list_links", Links())
    (tmp_path / "svc.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: demo}
        spec: {clusterIP: 172.30.0.10, ports: [{name: http, port: 80}]}
        """))
    out = CliRunner().invoke(cli, ["render", "--manifests", str(tmp_path), "--plugin", "fastpath",
                                   "--fastpath-packet-threshold", "5"])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert "add table inet kproxy-fastpath { comment \"kproxy fastpath: flowtable offload of long ClusterIP connections\" ; }" in lines
    assert ("add flowtable inet kproxy-fastpath fastpath { hook ingress priority filter ; "
            "devices = { eth0, veth-a, veth-b } ; }") in lines
    assert "add element inet kproxy-fastpath offload-v4 { 172.30.0.10 . tcp . 80 }" in lines
    assert sum(1 for l in lines if l.startswith("add rule inet kproxy-fastpath forward ") and "ct packets > 5" in l) == 4


# -- the interfaces plugin's debouncing -------------------------------------------------------

def test_debouncer_lists_at_most_once_per_min_interval_and_at_least_once_per_resync():
    d = Debouncer(min_interval=5, resync_interval=60)
    assert d.due(0)  # the first listing at once
    d.listed(0)
    assert not d.due(1)
    d.event()
    assert not d.due(4.9) and d.wait_time(1) == pytest.approx(4)
    assert d.due(5)
    d.listed(5)
    for t in (5.5, 6, 7):  # a burst
        d.event()
        assert not d.due(t)
    assert d.due(10)
    d.listed(10)
    assert not d.due(69.9) and d.wait_time(10) == pytest.approx(60)
    assert d.due(70)  # the periodic re-list without events


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip to make a network namespace")
def test_real_netlink_listing_finds_eligible_devices():
    """list_links() against a real kernel, in a fresh network namespace: a veth pair and a
    dummy; the eligible set must hold the veths (guards against the seed's empty list)."""
    code = textwrap.dedent("""\
        import subprocess
        from kproxy_plugins.interfaces import list_links
        from kproxy_plugins.fastpath.devices import eligible_devices
        subprocess.run(["ip", "link", "add", "vtest0", "type", "veth", "peer", "name", "vtest1"], check=True)
        subprocess.run(["ip", "link", "add", "dtest0", "type", "dummy"], check=False)
        for d in ("vtest0", "vtest1", "dtest0", "lo"):
            subprocess.run(["ip", "link", "set", d, "up"], check=False)
        links = list_links()
        print(sorted(l.name for l in links))
        print(list(eligible_devices(links)))
        """)
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names, eligible_list = (eval(line) for line in proc.stdout.splitlines())
    assert {"lo", "vtest0", "vtest1"} <= set(names)
    assert eligible_list == ["vtest0", "vtest1"]


def test_many_elements_are_batched(monkeypatch):
    app, backend, _ = make_app(monkeypatch)
    for i in range(1200):
        app.state.put(service(f"s{i}", f"172.30.{i // 250}.{i % 250 + 1}", [("TCP", 80), ("UDP", 53)]))
    assert app.sync(full=True).ok
    assert len(elements(backend)) == 2400
    build = next(t for t in backend.transactions if "add chain inet kproxy-fastpath forward" in t.render())
    element_lines = [l for l in build.render().splitlines() if l.startswith("add element")]
    assert len(element_lines) == 3  # 2400 elements, at most 1000 per command
