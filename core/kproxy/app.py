"""The kproxy process: configuration, plugins, state, engine and the sync loop.

``App`` is also the public API plugins get in ``kproxy_configure``: ``config``,
``options(name)``, ``state``, ``request_sync()``, ``announce_interfaces()``.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry

from . import pluginmanager as plugins
from .config import Config, ConfigError
from .engine import Engine, SyncResult
from .health import ProxyHealth
from .metrics import SyncMetrics
from .options import Option, OptionRegistry
from .runner import Schedule
from .state import ClusterState

log = logging.getLogger("kproxy")


def collect_options(pm) -> list[Option]:
    """Every option of every plugin registered in ``pm``."""
    out: list[Option] = []
    for impl in pm.hook.kproxy_add_options.get_hookimpls():
        impl.function(options=OptionRegistry(impl.plugin_name, out))
    return out


class App:
    def __init__(self, config: Config, backend, pm=None, enabled: list[str] | None = None,
                 cli_options: dict | None = None):
        self.config = config
        self.backend = backend
        self.pm = pm or plugins.make_manager()
        self.enabled = list(enabled or [])
        self.state = ClusterState(node_name=config.node_name)
        self.engine = Engine(self)
        self.last_result: SyncResult | None = None
        self.config_warnings: list[str] = []
        self._options = self._resolve_options(cli_options or {})
        self._wake = threading.Condition()
        self._pending = False
        self._pending_full = False
        self._stop = threading.Event()
        self.configured = False
        # set by the source once its initial lists are complete: nothing is programmed
        # before, so a half-filled cache never reaches the datapath
        self.sources_synced = threading.Event()
        # what plugins keep for the life of this process, each under its own key
        # (by convention its module's __name__)
        self.plugin_data: dict = {}
        # every metric of this process, kproxy's and the plugins' (served on /metrics)
        self.metrics = CollectorRegistry(auto_describe=True)
        self.sync_metrics = SyncMetrics(self.metrics)
        self.health = ProxyHealth(timeout=2 * config.sync_period)

    @classmethod
    def from_config(cls, config: Config, backend, enable=(), disable=(), cli_options=None) -> "App":
        """Select and load the plugins the config and flags ask for."""
        installed = plugins.discover()
        names = plugins.select(plugins.default_plugins(), list(config.plugins) + list(enable),
                               list(config.disable_plugins) + list(disable), installed)
        pm = plugins.make_manager()
        plugins.load(pm, names, installed)
        return cls(config, backend, pm, names, cli_options)

    # -- options ------------------------------------------------------------------------
    def _resolve_options(self, cli: dict) -> dict[str, dict]:
        values: dict[str, dict] = {}
        registered = collect_options(self.pm)
        installed = plugins.discover()
        for plugin, conf in self.config.plugin_config.items():
            if self.pm.get_plugin(plugin) is None:
                if plugin not in installed:
                    raise ConfigError(f"kproxy.{plugin}: there is no plugin named {plugin!r}; "
                                      f"installed plugins: {', '.join(sorted(installed)) or '(none)'}")
                continue  # options of an installed plugin that is not enabled
            names = {o.name for o in registered if o.plugin == plugin}
            for key in conf:
                if key not in names:
                    raise ConfigError(f"kproxy.{plugin}.{key}: plugin {plugin} has no option {key!r}"
                                      + (f" (options: {', '.join(sorted(names))})" if names else ""))
        for opt in registered:
            val = opt.default
            if opt.kube_proxy_field and opt.kube_proxy_field in self.config.kube_proxy_extra:
                val = opt.parse(self.config.kube_proxy_extra[opt.kube_proxy_field])
            if opt.name in self.config.plugin_config.get(opt.plugin, {}):
                val = opt.parse(self.config.plugin_config[opt.plugin][opt.name])
            if (opt.plugin, opt.name) in cli:
                val = opt.parse(cli[(opt.plugin, opt.name)])
            values.setdefault(opt.plugin, {})[opt.name] = val
        claimed = {o.kube_proxy_field for o in registered if o.kube_proxy_field}
        for name in sorted(set(self.config.kube_proxy_extra) - claimed):
            self.config_warnings.append(f"warning: config field nftables.{name} is not supported by kproxy "
                                        f"or its enabled plugins and is ignored")
        return values

    def options(self, plugin: str) -> dict:
        """The resolved option values of one plugin (flag > config file > default)."""
        return dict(self._options.get(plugin, {}))

    # -- lifecycle ----------------------------------------------------------------------
    def configure(self) -> None:
        for name, fn in plugins.call_order(self.pm, "kproxy_configure"):
            try:
                fn(app=self)
            except Exception as e:
                raise plugins.PluginError(f"plugin {name} failed to configure: {type(e).__name__}: {e}") from e
        self.configured = True

    def unconfigure(self) -> None:
        if not self.configured:
            return
        self.configured = False
        for name, fn in plugins.call_order(self.pm, "kproxy_unconfigure"):
            try:
                fn(app=self)
            except Exception:
                log.exception("plugin %s failed to unconfigure", name)

    # -- API for plugins ----------------------------------------------------------------
    def request_sync(self, full: bool = False) -> None:
        """Ask for a sync soon (coalesced; at most one per minSyncPeriod)."""
        self.health.queued()
        self.sync_metrics.queued()
        with self._wake:
            self._pending = True
            self._pending_full = self._pending_full or full
            self._wake.notify()

    def announce_interfaces(self, links) -> None:
        """Tell every plugin the node's complete current set of links."""
        for name, fn in plugins.call_order(self.pm, "kproxy_interface_change"):
            try:
                fn(app=self, links=tuple(links))
            except Exception:
                log.exception("plugin %s failed in kproxy_interface_change", name)

    def notify_post_apply(self, ctx, result) -> None:
        for name, fn in plugins.call_order(self.pm, "kproxy_post_apply"):
            try:
                fn(ctx=ctx, result=result)
            except Exception:
                log.exception("plugin %s failed in kproxy_post_apply", name)

    # -- running ------------------------------------------------------------------------
    def sync(self, full: bool = False) -> SyncResult:
        """Sync what changed since the last sync (everything when ``full``)."""
        changes = self.state.take_changes()
        if self.last_result is not None:
            # the previous transaction may be as large as the ruleset: not kept beside the next one
            self.last_result.transaction = None
        result = self.engine.sync(full or changes.everything, changes.services)
        self.sync_metrics.changes(changes.service_events, changes.endpoint_events, *self.state.pending())
        self.sync_metrics.synced(result, changes.first_seen)
        if result.ok:
            self.health.updated()
        self.last_result = result
        return result

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()

    def run_forever(self, clock=time.monotonic) -> None:
        """Sync on request as the ``runner.Schedule`` says, until ``stop()``."""
        cfg = self.config
        schedule = Schedule(cfg.min_sync_period, cfg.sync_period)
        while not self.sources_synced.wait(0.2):
            if self._stop.is_set():
                return
        self.request_sync(full=True)
        while not self._stop.is_set():
            with self._wake:
                if self._pending:
                    schedule.request(self._pending_full)
                    self._pending = self._pending_full = False
                decision = schedule.decide(clock())
                if not decision.run:
                    self._wake.wait(decision.wait)
                    continue
            schedule.started()
            result = self.sync(decision.full)
            schedule.done(clock(), result.ok, result.full)
            if self.engine.stale_chains:
                schedule.request()  # a later sync deletes the chains this one flushed
