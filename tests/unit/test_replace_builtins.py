"""Each built-in can be disabled and replaced by a plugin using the public API alone
(service-maps and masquerade are replaced with real packets in tests/e2e)."""

from __future__ import annotations

import sys
from pathlib import Path

from kproxy import hookimpl
from kproxy.app import App
from kproxy.links import Link
from kproxy.nft import Chain, Flowtable, Table
from kproxy.pluginmanager import make_manager
from kproxy_plugins import fastpath, service_maps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fastpath import KernelFake, Links, config, service  # noqa: E402


class StaticLinks:
    """Replaces `interfaces`: announces a fixed set of links."""

    def __init__(self, links):
        self.links = links

    @hookimpl
    def kproxy_pre_render(self, ctx):
        """Announce the links on full syncs, from the sync thread (as `interfaces` does)."""
        if ctx.full:
            ctx.app.announce_interfaces(self.links)


class TinyOffload:
    """Replaces `fastpath`: its own table with a flowtable over the announced links."""

    def __init__(self):
        self.devices = ()

    @hookimpl
    def kproxy_interface_change(self, app, links):
        """Remember the eligible links and ask for a sync."""
        self.devices = tuple(sorted(l.name for l in links if l.up and not l.loopback))
        app.request_sync(full=True)

    @hookimpl
    def kproxy_pre_render(self, ctx):
        """Declare the table, the flowtable and the forward chain."""
        ctx.declare(Table("inet", "kproxy-tiny"))
        ctx.declare(Flowtable("inet", "kproxy-tiny", "ft", devices=self.devices))
        ctx.declare(Chain("inet", "kproxy-tiny", "fwd-offload", "filter", "forward", 10))

    @hookimpl
    def kproxy_render_chain(self, ctx, chain):
        """Offload every established TCP connection."""
        return ["meta l4proto tcp ct state established flow add @ft"] if ctx.owns(chain) else None


def links(*names):
    return tuple(Link(n, i + 2, "veth", True, False) for i, n in enumerate(names))


def test_interfaces_replaced_feeds_fastpath(monkeypatch):
    kernel = KernelFake({"lo", "eth0", "veth-a", "veth-b"})
    monkeypatch.setattr(fastpath, "list_links", Links(links("eth0", "veth-a", "veth-b")))
    pm = make_manager()
    pm.register(fastpath, name="fastpath")
    pm.register(service_maps, name="service-maps")
    pm.register(StaticLinks(links("eth0", "veth-a")), name="static-links")
    app = App(config(), kernel, pm, ["service-maps", "fastpath", "static-links"])
    app.configure()
    app.state.put(service("web", "172.30.0.10"))
    assert app.sync(full=True).ok
    # only what the replacement announced, although veth-b exists too
    assert set(kernel.flowtable_devices()) == {"eth0", "veth-a"}


def test_fastpath_replaced_by_a_plugin_of_the_public_api():
    kernel = KernelFake({"eth0", "veth-a"})
    tiny = TinyOffload()
    pm = make_manager()
    pm.register(service_maps, name="service-maps")
    pm.register(tiny, name="tiny-offload")
    pm.register(StaticLinks(links("eth0", "veth-a")), name="static-links")
    app = App(config(), kernel, pm, ["service-maps", "tiny-offload", "static-links"])
    app.configure()
    assert app.sync(full=True).ok  # the links are announced during this sync ...
    assert app.sync(full=True).ok  # ... and the offload table follows in the next
    ft = kernel.list_objects("inet", "kproxy-tiny").flowtables["ft"]
    assert set(ft.devices) == {"eth0", "veth-a"}
    assert kernel.rules("inet", "kproxy-tiny", "fwd-offload") == ["meta l4proto tcp ct state established flow add @ft"]
    assert ("inet", "kproxy-fastpath") not in kernel.tables
