"""Third-party plugins are discovered but not enabled; a distribution's default set wins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from click.testing import CliRunner

from kproxy import pluginmanager as plugins
from kproxy.cli import cli
from kproxy_plugins import DEFAULT_PLUGINS

ROOT = Path(__file__).resolve().parents[2]
CUSTOM = ROOT / "examples" / "custom-distribution"


def listing(*args):
    result = CliRunner().invoke(cli, ["plugins", "--format", "json", *args])
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.output)}


def test_contrib_plugins_are_discovered_but_not_enabled():
    rows = listing()
    for name, dist in (("service-counters", "kproxy-service-counters"), ("connlimit", "kproxy-connlimit")):
        assert rows[name]["distribution"] == dist and rows[name]["origin"] == "third-party"
        assert rows[name]["enabled"] is False
    assert rows["connlimit"]["options"] == ["--connlimit-default-burst"]
    assert all(rows[n]["enabled"] and rows[n]["origin"] == "built-in" for n in DEFAULT_PLUGINS)
    assert listing("--plugin", "connlimit")["connlimit"]["enabled"] is True


def test_a_distribution_declares_its_default_set(tmp_path, monkeypatch):
    # the example distribution, "installed" as a dist-info beside its source
    info = tmp_path / "my_kproxy-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-kproxy\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[kproxy.defaults]\nmy-kproxy = my_kproxy:DEFAULT_PLUGINS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(CUSTOM / "src"))
    sys.modules.pop("my_kproxy", None)
    assert plugins.default_plugins() == (*DEFAULT_PLUGINS, "service-counters", "connlimit")
    rows = listing()
    assert rows["service-counters"]["enabled"] and rows["connlimit"]["enabled"]
    # the user still decides: the config and flags can disable what the distribution enables
    assert listing("--disable-plugin", "connlimit")["connlimit"]["enabled"] is False
