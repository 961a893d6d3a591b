"""Plugin discovery, selection, loading, call order and plugin options."""

from __future__ import annotations

import sys
import types

import pytest

from kproxy import config as configmod
from kproxy import hookimpl
from kproxy import pluginmanager as plugins
from kproxy.app import App, collect_options
from kproxy.config import ConfigError
from kproxy.nft import FakeNft
from kproxy.options import OptionRegistry
from kproxy.pluginmanager import PluginError, PluginInfo

from kproxy_plugins import DEFAULT_PLUGINS as BUILTINS


@pytest.fixture
def make_module(monkeypatch):
    """Make an importable module (registered in sys.modules) holding the given functions."""
    def make(modname, *functions):
        mod = types.ModuleType(modname)
        for fn in functions:
            setattr(mod, fn.__name__, fn)
        monkeypatch.setitem(sys.modules, modname, mod)
        return mod
    return make


def info(name, module):
    return PluginInfo(name, module, "test-dist", "1.0", False)


def recorder(log, label, **marks):
    @hookimpl(**marks)
    def kproxy_post_apply(ctx, result):
        log.append(label)
    return kproxy_post_apply


def config(**kproxy_section):
    return configmod.from_dict({"hostnameOverride": "node-1", "kproxy": kproxy_section})


# -- discovery and selection ------------------------------------------------------------

def test_builtins_are_discovered_through_entry_points():
    found = plugins.discover()
    for name in BUILTINS:
        assert found[name].distribution == "kproxy" and found[name].builtin
    assert found["service-maps"].module == "kproxy_plugins.service_maps"


def test_default_set_comes_from_the_defaults_entry_point():
    assert plugins.default_plugins() == BUILTINS


INSTALLED = {n: info(n, f"mod_{n}") for n in ("a", "b", "c", "fastpath")}


def test_select_defaults_plus_enabled_minus_disabled():
    assert plugins.select(["a", "b"], [], [], INSTALLED) == ["a", "b"]
    assert plugins.select(["a", "b"], ["fastpath", "a"], [], INSTALLED) == ["a", "b", "fastpath"]
    assert plugins.select(["a", "b"], ["fastpath"], ["a"], INSTALLED) == ["b", "fastpath"]
    assert plugins.select(["a", "b"], ["c"], ["c"], INSTALLED) == ["a", "b"]  # disabling wins
    # a module path that is not an entry point (like pytest's -p)
    assert plugins.select(["a"], ["kproxy_plugins.masquerade"], [], INSTALLED) == ["a", "kproxy_plugins.masquerade"]


@pytest.mark.parametrize("enable, disable", [(["fastpth"], []), ([], ["fastpth"])])
def test_unknown_name_lists_known_plugins(enable, disable):
    with pytest.raises(PluginError) as exc:
        plugins.select(["a"], enable, disable, INSTALLED)
    assert "unknown plugin 'fastpth'; known plugins: a, b, c, fastpath" in str(exc.value)


def test_app_from_config_selects_defaults_flags_and_config(monkeypatch):
    monkeypatch.setattr(plugins, "load", lambda pm, names, installed: None)  # selection only
    app = App.from_config(config(), FakeNft())
    assert app.enabled == list(BUILTINS)
    app = App.from_config(config(disablePlugins=["interfaces"]), FakeNft(), disable=["masquerade"])
    assert app.enabled == [n for n in BUILTINS if n not in ("interfaces", "masquerade")]
    with pytest.raises(PluginError, match="unknown plugin 'nope'; known plugins: .*service-maps"):
        App.from_config(config(plugins=["nope"]), FakeNft())


# -- loading and call order -------------------------------------------------------------

def order_of(pm, hook="kproxy_post_apply"):
    return [name for name, _ in plugins.call_order(pm, hook)]


def test_call_order_follows_enable_order(make_module):
    log = []
    installed = {}
    for label in ("a", "b", "c"):
        make_module(f"kproxy_unit_pm_{label}", recorder(log, label))
        installed[label] = info(label, f"kproxy_unit_pm_{label}")
    for names in (["a", "b", "c"], ["c", "a", "b"]):
        pm = plugins.make_manager()
        plugins.load(pm, names, installed)
        assert order_of(pm) == names
        log.clear()
        App(config(), FakeNft(), pm, names).notify_post_apply(None, None)
        assert log == names


def test_tryfirst_and_trylast(make_module):
    log = []
    make_module("kproxy_unit_pm_first", recorder(log, "first", tryfirst=True))
    make_module("kproxy_unit_pm_last", recorder(log, "last", trylast=True))
    make_module("kproxy_unit_pm_x", recorder(log, "x"))
    make_module("kproxy_unit_pm_y", recorder(log, "y"))
    installed = {n: info(n, f"kproxy_unit_pm_{n}") for n in ("first", "last", "x", "y")}
    pm = plugins.make_manager()
    plugins.load(pm, ["last", "x", "first", "y"], installed)
    assert order_of(pm) == ["first", "x", "y", "last"]


def test_dotted_module_path_is_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "kproxy_unit_thirdparty"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plug.py").write_text(
        "from kproxy import hookimpl\n\nSEEN = []\n\n"
        "@hookimpl\ndef kproxy_post_apply(ctx, result):\n    SEEN.append(result)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = plugins.select(["a"], ["kproxy_unit_thirdparty.plug"], [], INSTALLED)
    pm = plugins.make_manager()
    plugins.load(pm, names[1:], INSTALLED)
    assert order_of(pm) == ["kproxy_unit_thirdparty.plug"]
    App(config(), FakeNft(), pm).notify_post_apply(None, "r")
    assert sys.modules["kproxy_unit_thirdparty.plug"].SEEN == ["r"]
    assert plugins.hooks_of(pm, "kproxy_unit_thirdparty.plug") == ["kproxy_post_apply"]


def test_unimportable_plugin():
    with pytest.raises(PluginError, match=r"plugin no_such_pkg\.mod: cannot import: ModuleNotFoundError"):
        plugins.load(plugins.make_manager(), ["no_such_pkg.mod"], {})
    with pytest.raises(PluginError, match=r"plugin broken: cannot import no_such_module_xyz: ModuleNotFoundError"):
        plugins.load(plugins.make_manager(), ["broken"], {"broken": info("broken", "no_such_module_xyz")})


@pytest.mark.parametrize("marks", [{"wrapper": True}, {"hookwrapper": True}])
@pytest.mark.parametrize("hook", ["kproxy_pre_render", "kproxy_render_chain"])
def test_wrapper_on_a_sync_hook_is_rejected(make_module, marks, hook):
    def impl(ctx):
        yield
    impl.__name__ = hook
    make_module("kproxy_unit_pm_wrap", hookimpl(**marks)(impl))
    with pytest.raises(PluginError, match=f"plugin wrap: {hook} cannot be a wrapper"):
        plugins.load(plugins.make_manager(), ["wrap"], {"wrap": info("wrap", "kproxy_unit_pm_wrap")})


def test_wrapper_on_another_hook_is_not_silently_ignored(make_module):
    # kproxy calls every hook one plugin at a time, so a wrapper would never run
    @hookimpl(wrapper=True)
    def kproxy_post_apply(ctx, result):
        return (yield)
    make_module("kproxy_unit_pm_wrap2", kproxy_post_apply)
    with pytest.raises(PluginError, match="plugin wrap2: kproxy_post_apply cannot be a wrapper"):
        plugins.load(plugins.make_manager(), ["wrap2"], {"wrap2": info("wrap2", "kproxy_unit_pm_wrap2")})


def test_misspelt_hook_or_argument_names_the_plugin(make_module):
    @hookimpl
    def kproxy_pre_rendr(ctx):
        pass
    make_module("kproxy_unit_pm_typo", kproxy_pre_rendr)
    with pytest.raises(PluginError, match="plugin typo: .*kproxy_pre_rendr"):
        plugins.load(plugins.make_manager(), ["typo"], {"typo": info("typo", "kproxy_unit_pm_typo")})

    @hookimpl
    def kproxy_pre_render(context):
        pass
    make_module("kproxy_unit_pm_argtypo", kproxy_pre_render)
    with pytest.raises(PluginError, match="(?s)plugin argtypo: cannot register: .*context"):
        plugins.load(plugins.make_manager(), ["argtypo"], {"argtypo": info("argtypo", "kproxy_unit_pm_argtypo")})


# -- plugin options ---------------------------------------------------------------------

def options_plugin(**extra):
    class Plug:
        @hookimpl
        def kproxy_add_options(self, options):
            options.add("threshold", type="int", default=20, minimum=1, help="packets",
                        kube_proxy_field="fastpathPacketThreshold")
            options.add("enabled", type="bool", default=True)
            options.add("mode", type="str", default="auto", choices=["auto", "off"])
            options.add("ratio", type="float", default=0.5)
    return Plug()


def app_with_options(cfg, cli=None):
    pm = plugins.make_manager()
    pm.register(options_plugin(), name="fastpath")
    return App(cfg, FakeNft(), pm, ["fastpath"], cli)


def test_option_defaults_and_flags():
    opts = collect_options(_pm_with_options())
    assert [(o.name, o.type, o.default, o.flag) for o in opts] == [
        ("threshold", "int", 20, "--fastpath-threshold"), ("enabled", "bool", True, "--fastpath-enabled"),
        ("mode", "str", "auto", "--fastpath-mode"), ("ratio", "float", 0.5, "--fastpath-ratio")]
    assert app_with_options(config()).options("fastpath") == {"threshold": 20, "enabled": True, "mode": "auto", "ratio": 0.5}
    assert app_with_options(config()).options("other") == {}


def _pm_with_options():
    pm = plugins.make_manager()
    pm.register(options_plugin(), name="fastpath")
    return pm


def test_option_from_config_file_section(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("kind: KubeProxyConfiguration\nhostnameOverride: n\n"
                    "kproxy:\n  fastpath:\n    threshold: 5\n    enabled: false\n    ratio: 2\n")
    app = app_with_options(configmod.load(str(path)))
    assert app.options("fastpath") == {"threshold": 5, "enabled": False, "mode": "auto", "ratio": 2}


def test_flag_beats_config_beats_kube_proxy_field_beats_default():
    both = configmod.from_dict({"hostnameOverride": "n", "nftables": {"fastpathPacketThreshold": 7},
                                "kproxy": {"fastpath": {"threshold": 5}}})
    assert app_with_options(both, {("fastpath", "threshold"): "9"}).options("fastpath")["threshold"] == 9
    assert app_with_options(both).options("fastpath")["threshold"] == 5
    kube_proxy_only = configmod.from_dict({"hostnameOverride": "n", "nftables": {"fastpathPacketThreshold": 7}})
    assert app_with_options(kube_proxy_only).options("fastpath")["threshold"] == 7
    assert app_with_options(config(), {("fastpath", "mode"): "off", ("fastpath", "enabled"): "no"}).options("fastpath") \
        == {"threshold": 20, "enabled": False, "mode": "off", "ratio": 0.5}


@pytest.mark.parametrize("section, message", [
    ({"threshold": "many"}, "plugin fastpath: option threshold: must be an integer, got 'many'"),
    ({"threshold": 1.5}, "plugin fastpath: option threshold: must be of type int, got 1.5"),
    ({"threshold": True}, "plugin fastpath: option threshold: must be of type int, got True"),
    ({"threshold": 0}, "plugin fastpath: option threshold: must be at least 1, got 0"),
    ({"enabled": "maybe"}, "plugin fastpath: option enabled: must be true or false, got 'maybe'"),
    ({"enabled": 1}, "plugin fastpath: option enabled: must be of type bool, got 1"),
    ({"mode": "fast"}, "plugin fastpath: option mode: must be one of auto, off, got 'fast'"),
    ({"mode": 3}, "plugin fastpath: option mode: must be of type str, got 3"),
    ({"ratio": "x"}, "plugin fastpath: option ratio: must be a number, got 'x'"),
    ({"treshold": 5}, "kproxy.fastpath.treshold: plugin fastpath has no option 'treshold' (options: enabled, mode, ratio, threshold)"),
])
def test_bad_option_values(section, message):
    with pytest.raises(ConfigError) as exc:
        app_with_options(config(fastpath=section))
    assert str(exc.value) == message


def test_bad_option_flag_value():
    with pytest.raises(ConfigError, match="option threshold: must be an integer, got 'x'"):
        app_with_options(config(), {("fastpath", "threshold"): "x"})


def test_options_of_a_disabled_plugin_are_not_checked():
    pm = plugins.make_manager()
    app = App(config(fastpath={"treshold": 5}), FakeNft(), pm, [])
    assert app.options("fastpath") == {}


def test_option_declaration_is_validated():
    reg = OptionRegistry("p", [])
    with pytest.raises(ValueError, match="plugin p: option x: type must be one of int, float, bool, str"):
        reg.add("x", type="list")
    with pytest.raises(ConfigError, match="plugin p: option y: must be an integer, got '20 packets'"):
        reg.add("y", type="int", default="20 packets")
    assert reg.add("z", type="int", default=3, flag="--zed").flag == "--zed"


def test_options_for_an_unknown_plugin_are_an_error(monkeypatch):
    monkeypatch.setattr(plugins, "load", lambda pm, names, installed: None)  # selection only
    with pytest.raises((ConfigError, PluginError), match="fastpth"):
        App.from_config(config(fastpth={"threshold": 5}), FakeNft())
