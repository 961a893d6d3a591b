"""Discovering, selecting and loading plugins.

Plugins are found through the entry-point group ``kproxy`` (one entry per plugin, ``name
= module``); the built-ins are registered that way too. Which plugins run is explicit:
the default set, plus ``--plugin NAME`` (or ``kproxy.plugins`` in the config file),
minus ``--disable-plugin NAME``. Installing a package never changes the datapath by
itself. The default set is not written in the core: a distribution declares it through
the entry-point group ``kproxy.defaults`` (kproxy's own distribution declares the
built-ins; a custom distribution's declaration takes precedence).

A ``--plugin`` value that is not an entry-point name but an importable module
(``pkg.module``) is imported directly, like pytest's ``-p``.
"""

from __future__ import annotations

import importlib
import importlib.util
import importlib.metadata as md
from dataclasses import dataclass

import pluggy

from . import hookspecs

GROUP = "kproxy"
DEFAULTS_GROUP = "kproxy.defaults"
# kproxy calls every hook one plugin at a time (call_order), so no hook may have a
# wrapper implementation: it would never run.


class PluginError(Exception):
    """A plugin could not be found, loaded or run; the message names it, ``plugin`` too."""

    def __init__(self, message: str, plugin: str | None = None):
        super().__init__(message)
        if plugin is None and message.startswith("plugin "):
            plugin = message.split()[1].rstrip(":")
        self.plugin = plugin


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str
    builtin: bool


def discover() -> dict[str, PluginInfo]:
    """Every plugin installed, by name (entry points of group ``kproxy``)."""
    found = {}
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist else "?"
        found[ep.name] = PluginInfo(ep.name, ep.value, dist, ep.dist.version if ep.dist else "?", dist == "kproxy")
    return found


def default_plugins() -> tuple[str, ...]:
    """The default plugin set declared by the installed distribution(s)."""
    eps = list(md.entry_points(group=DEFAULTS_GROUP))
    custom = [ep for ep in eps if ep.dist is None or ep.dist.name != "kproxy"]
    if len(custom) > 1:
        names = ", ".join(sorted(ep.dist.name if ep.dist else ep.value for ep in custom))
        raise PluginError(f"several distributions declare a default plugin set ({names}); "
                          f"choose with kproxy.plugins in the config file")
    chosen = custom or eps
    if not chosen:
        return ()
    value = chosen[0].load()
    return tuple(value() if callable(value) else value)


def _import(spec: str, name: str | None = None):
    try:
        return importlib.import_module(spec)
    except Exception as e:
        what = f"{name}: cannot import {spec}" if name and name != spec else f"{spec}: cannot import"
        raise PluginError(f"plugin {what}: {type(e).__name__}: {e}") from e


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select(defaults, enable, disable, installed: dict[str, PluginInfo]) -> list[str]:
    """The ordered list of plugins to run; unknown names are an error listing the known."""
    known = ", ".join(sorted(installed)) or "(none installed)"
    for name in enable:
        if name not in installed and not _importable(name):
            raise PluginError(f"unknown plugin {name!r}; known plugins: {known}")
    for name in disable:
        if name not in installed and name not in enable:
            raise PluginError(f"cannot disable unknown plugin {name!r}; known plugins: {known}")
    chosen = []
    for name in list(defaults) + list(enable):
        if name not in chosen and name not in disable:
            chosen.append(name)
    return chosen


def make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    return pm


def load(pm: pluggy.PluginManager, names: list[str], installed: dict[str, PluginInfo]) -> None:
    """Import and register plugins so that they are called in the order given."""
    modules = []
    for name in names:
        info = installed.get(name)
        module = _import(info.module if info else name, name)
        modules.append((name, module))
    for name, module in reversed(modules):  # pluggy calls the last registered first
        try:
            pm.register(module, name=name)
        except Exception as e:
            raise PluginError(f"plugin {name}: cannot register: {e}") from e
        for caller in pm.get_hookcallers(module) or ():  # every hook is called one plugin at a time
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name and (impl.hookwrapper or impl.wrapper):
                    raise PluginError(f"plugin {name}: {caller.name} cannot be a wrapper")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {pm.get_name(e.plugin)}: {e}") from e


def call_order(pm: pluggy.PluginManager, hook: str):
    """(plugin name, function) of a hook's implementations, in the order pluggy calls them."""
    impls = getattr(pm.hook, hook).get_hookimpls()
    return [(i.plugin_name, i.function) for i in reversed(impls) if not (i.hookwrapper or i.wrapper)]


def hooks_of(pm: pluggy.PluginManager, name: str) -> list[str]:
    plugin = pm.get_plugin(name)
    return sorted(h.name for h in pm.get_hookcallers(plugin) or ())
