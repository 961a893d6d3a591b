"""The hooks outside a sync: kproxy_configure, kproxy_unconfigure, kproxy_interface_change,
and kproxy_render_script (through ``kproxy render``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kproxy import config as configmod
from kproxy import hookimpl
from kproxy.app import App
from kproxy.links import Link
from kproxy.nft import FakeNft
from kproxy.pluginmanager import PluginError, make_manager

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    @hookimpl
    def kproxy_configure(self, app):
        """Record the call."""
        self.calls.append((self.name, "configure", app.options(self.name)))

    @hookimpl
    def kproxy_unconfigure(self, app):
        """Record the call."""
        self.calls.append((self.name, "unconfigure"))

    @hookimpl
    def kproxy_interface_change(self, app, links):
        """Record the link names."""
        self.calls.append((self.name, "links", tuple(link.name for link in links)))


def make_app(*plugins):
    pm = make_manager()
    for name, plugin in reversed(plugins):
        pm.register(plugin, name=name)
    return App(configmod.from_dict({"hostnameOverride": "node-1"}), FakeNft(), pm, [n for n, _ in plugins])


def test_configure_and_unconfigure_run_once_in_plugin_order():
    calls = []
    app = make_app(("a", Recorder(calls, "a")), ("b", Recorder(calls, "b")))
    app.configure()
    app.unconfigure()
    app.unconfigure()  # a second stop does nothing
    assert calls == [("a", "configure", {}), ("b", "configure", {}), ("a", "unconfigure"), ("b", "unconfigure")]


def test_configure_failure_names_the_plugin():
    class Broken:
        @hookimpl
        def kproxy_configure(self, app):
            """Fail on purpose."""
            raise RuntimeError("no kernel support")

    app = make_app(("broken", Broken()))
    with pytest.raises(PluginError, match="plugin broken failed to configure: RuntimeError: no kernel support"):
        app.configure()


def test_interface_change_gets_every_link_and_a_failure_does_not_stop_the_others():
    calls = []

    class Broken:
        @hookimpl
        def kproxy_interface_change(self, app, links):
            """Fail on purpose."""
            raise RuntimeError("boom")

    app = make_app(("broken", Broken()), ("a", Recorder(calls, "a")))
    app.announce_interfaces([Link("lo", 1, "loopback", True, True), Link("eth0", 2, "veth", True, False)])
    assert calls == [("a", "links", ("lo", "eth0"))]


def test_render_script_output_is_appended_by_kproxy_render(tmp_path):
    (tmp_path / "scripted.py").write_text(textwrap.dedent('''
        from kproxy import hookimpl
        from kproxy.nft import Table, Transaction

        @hookimpl
        def kproxy_render_script(ctx):
            """The table this plugin would program itself."""
            return Transaction().add(Table("ip", "kproxy-scripted", f"{len(ctx.state.services)} services"))
    '''))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kproxy", "render", "--config", str(ROOT / "examples/demo/kproxy-config.yaml"),
                           "--manifests", str(ROOT / "examples/demo/manifests"), "--plugin", "scripted"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith('add table ip kproxy-scripted { comment "') and lines[-1].endswith(' services" ; }')
    assert "add table ip kproxy" in proc.stdout  # after the main transaction
