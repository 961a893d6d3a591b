"""The ``kproxy`` command line: run, render, plugins, cleanup."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time

import click

from . import __version__
from . import config as configmod
from . import pluginmanager as plugins
from .app import App, collect_options
from .config import Config, ConfigError
from .engine import STALE_CHAIN_DELAY
from .engine import cleanup as cleanup_tables
from .health import Servers
from .nft import NftCLI, NftError, Table, Transaction
from .nft.lib import HybridNft
from .sources import kube as kube_source
from .sources import manifests as manifest_source

log = logging.getLogger("kproxy")

# kube-proxy's flag names where kube-proxy has the flag; each maps onto a Config field.
CONFIG_FLAGS = [
    ("--hostname-override", "node_name", str, "Name of this node (default: the host name)."),
    ("--cluster-cidr", "cluster_cidrs", str, "Pod CIDR(s) of the cluster, comma-separated (local-traffic detection)."),
    ("--detect-local-mode", "detect_local_mode", click.Choice(configmod.DETECT_LOCAL_MODES), "How to tell pod traffic from other traffic."),
    ("--pod-bridge-interface", "bridge_interface", str, "Bridge of the pods (detect-local-mode BridgeInterface)."),
    ("--pod-interface-name-prefix", "interface_name_prefix", str, "Name prefix of pod interfaces (detect-local-mode InterfaceNamePrefix)."),
    ("--nodeport-addresses", "node_port_addresses", str, "CIDRs of node addresses that accept NodePorts, comma-separated, or 'primary'."),
    ("--masquerade-all", "masquerade_all", bool, "Masquerade all traffic to ClusterIPs."),
    ("--metrics-bind-address", "metrics_bind_address", str, "IP:port of the metrics server."),
    ("--healthz-bind-address", "healthz_bind_address", str, "IP:port of the health server."),
]


def _setup_logging(verbose: int):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pyroute2", "asyncio", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 2):
    click.echo(f"kproxy: error: {message}", err=True)
    sys.exit(code)


def _warn(message: str):
    click.echo(f"kproxy: {message}", err=True)


def load_config(path: str | None, flags: dict) -> Config:
    """The config file (if any), then the flags given on the command line over it."""
    cfg = configmod.load(path, warn=_warn) if path else configmod.validate(Config())
    changes = {}
    for flag, field_name, _, _ in CONFIG_FLAGS:
        value = flags.get(field_name)
        if value is None or value is False and field_name == "masquerade_all":
            continue
        if field_name == "cluster_cidrs":
            value = configmod._cidr_list(value, flag)
        elif field_name == "node_port_addresses":
            value = ("primary",) if value.strip() == "primary" else configmod._cidr_list(value, flag)
        elif field_name == "node_name":
            value = value.strip().lower()
        changes[field_name] = value
    return cfg.replace(**changes) if changes else cfg


def _discovered_options():
    """Options of every installed plugin, so that they all appear in --help."""
    pm = plugins.make_manager()
    for name, info in plugins.discover().items():
        try:
            pm.register(plugins._import(info.module), name=name)
        except Exception as e:  # a broken plugin must not break the CLI for the others
            log.debug("cannot load plugin %s for its options: %s", name, e)
    return collect_options(pm)


def config_options(f):
    for flag, field_name, kind, help_text in reversed(CONFIG_FLAGS):
        if kind is bool:
            f = click.option(flag, field_name, is_flag=True, default=None, help=help_text)(f)
        else:
            f = click.option(flag, field_name, type=kind, default=None, help=help_text)(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1).")(f)
    f = click.option("--plugin", "enable", multiple=True, help="Enable a plugin (repeatable).")(f)
    f = click.option("--disable-plugin", "disable", multiple=True, help="Disable a plugin of the default set (repeatable).")(f)
    f = click.option("-v", "--verbose", count=True, help="More logging.")(f)
    return f


_PLUGIN_PARAMS: dict[str, tuple[str, str]] = {}  # click parameter name -> (plugin, option)


def plugin_options(f):
    for i, opt in enumerate(_discovered_options()):
        param = f"plugin_opt_{i}"
        _PLUGIN_PARAMS[param] = (opt.plugin, opt.name)
        f = click.option(opt.flag, param, default=None, type=str if opt.type != "bool" else click.BOOL,
                         help=f"[{opt.plugin}] {opt.help} (default: {opt.default})")(f)
    return f


def _split_flags(kw: dict):
    """Separate plugin options from the rest of the keyword arguments."""
    cli_opts = {}
    for key in [k for k in kw if k in _PLUGIN_PARAMS]:
        value = kw.pop(key)
        if value is not None:
            cli_opts[_PLUGIN_PARAMS[key]] = value
    return cli_opts


def build_app(kw: dict, backend) -> App:
    cli_opts = _split_flags(kw)
    try:
        cfg = load_config(kw.get("config_path"), kw)
        app = App.from_config(cfg, backend, kw.get("enable", ()), kw.get("disable", ()), cli_opts)
    except (ConfigError, plugins.PluginError) as e:
        _fail(str(e))
    for w in app.config_warnings:
        _warn(w)
    return app


def _load_manifests(app: App, path: str):
    try:
        state, _ = manifest_source.load(path, app.config.node_name, warn=_warn)
    except manifest_source.ManifestError as e:
        _fail(str(e))
    app.state.replace_all(state)


def _init_only(backend) -> None:
    """Create and remove a scratch table: nftables works and we may program it."""
    probe = Table("inet", "kproxy-init-probe")
    try:
        backend.apply(Transaction().add(probe).delete(probe))
    except NftError as e:
        _fail(f"nftables is not usable here: {e}", 1)
    click.echo("kproxy: init done (nftables usable); nothing else to prepare for the nftables datapath")


class PrintBackend:
    """A backend for --dry-run: prints each transaction instead of applying it."""

    def __init__(self, real: NftCLI):
        self.real = real

    def apply(self, txn):
        click.echo(txn.render(), nl=False)

    def list_tables(self):
        try:
            return self.real.list_tables()
        except NftError:
            return []

    def list_objects(self, family, table):
        return self.real.list_objects(family, table)  # reading only

    def list_elements(self, s):
        return self.real.list_elements(s)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kproxy")
def cli():
    """kproxy: Kubernetes Services on nftables, every datapath feature a plugin."""


@cli.command()
@config_options
@plugin_options
@click.option("--manifests", type=click.Path(), help="Read objects from YAML files (a file or a directory) instead of the API.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Watch the Kubernetes API with this kubeconfig.")
@click.option("--once", is_flag=True, help="Sync once and exit (0 on success).")
@click.option("--initial-sync-timeout", type=float, default=60.0, show_default=True,
              help="With --once and the API: seconds to wait for the initial lists of Services and EndpointSlices.")
@click.option("--dry-run", is_flag=True, help="Print each transaction instead of applying it.")
@click.option("--no-netlink-elements", is_flag=True,
              help="Let nft load every set element, also when a sync builds a new table "
                   "(by default those go to the kernel through netlink; config: kproxy.netlinkElements).")
@click.option("--init-only", is_flag=True,
              help="Only check that this host can run kproxy (nft present, nftables usable), then exit: "
                   "kube-proxy's privileged init step.")
def run(manifests, kubeconfig, once, initial_sync_timeout, dry_run, no_netlink_elements, init_only, **kw):
    """Program nftables for the Services of the cluster (or of --manifests) and keep them up to date."""
    _setup_logging(kw.pop("verbose"))
    real = HybridNft()
    if not dry_run and not real.available():
        _fail("the nft program is not installed (Debian/Ubuntu: apt-get install nftables)")
    if init_only:
        _init_only(real)
        return
    app = build_app(kw, PrintBackend(real) if dry_run else real)
    real.use_netlink = app.config.netlink_elements and not no_netlink_elements
    source = None
    if manifests:
        _load_manifests(app, manifests)
        app.sources_synced.set()
    else:
        try:
            source = kube_source.KubeSource.from_kubeconfig(app, kubeconfig or app.config.kubeconfig or None)
        except kube_source.KubeConfigError as e:
            _fail(f"{e}; to program Services from files use --manifests PATH")
    try:
        app.configure()
    except plugins.PluginError as e:
        _fail(str(e), 1)
    try:
        if once:
            if source is not None:
                source.start()
                if not source.wait_synced(initial_sync_timeout):
                    _fail(f"the initial lists did not complete within {initial_sync_timeout:g}s: "
                          f"{source.describe_pending()}", 1)
                if not source.wait_all_listed(5.0):  # the own Node and the ServiceCIDRs, best effort
                    _warn("the Node or ServiceCIDR list is not complete; syncing without it")
            result = app.sync(full=True)
            if not result.ok:
                _fail(result.error, 1)
            if app.engine.stale_chains:  # chains it flushed: delete them, as a later sync would
                time.sleep(STALE_CHAIN_DELAY)
                if not app.engine.delete_stale_chains():
                    _warn("could not delete the chains this sync emptied; the next sync will")
            return
        watcher = source.start() if source is not None else manifest_source.ManifestWatcher(manifests, app).start()
        servers = Servers(app)
        servers.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: app.stop())
        log.info("kproxy %s running with plugins %s", __version__, ", ".join(app.enabled))
        app.run_forever()
        watcher.stop()
        servers.stop()
        log.info("stopped; nftables rules left in place (use 'kproxy cleanup' to remove them)")
    finally:
        if source is not None:
            source.stop()
        app.unconfigure()


@cli.command()
@config_options
@plugin_options
@click.option("--manifests", type=click.Path(), required=True, help="YAML file or directory of objects.")
@click.option("--annotate", is_flag=True, help="Mark each line with the plugin that produced it.")
def render(manifests, annotate, **kw):
    """Print the complete nft script for the state in --manifests (touches nothing)."""
    _setup_logging(kw.pop("verbose"))
    app = build_app(kw, None)
    _load_manifests(app, manifests)
    try:
        txn, ctx = app.engine.render_script(app.state.snapshot())
        for name, fn in plugins.call_order(app.pm, "kproxy_render_script"):
            ctx.plugin = name
            extra = fn(ctx=ctx)
            if extra is not None:
                txn.extend(extra)
    except plugins.PluginError as e:
        _fail(str(e), 1)
    for op in txn.ops:
        line = op.render()
        owner = getattr(op.obj, "owner", None) or ctx.owners.get(getattr(op.obj, "key", None))
        if annotate and owner:
            line = f"{line}  # {owner}"
        click.echo(line)


@cli.command(name="plugins")
@config_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def plugins_cmd(fmt, **kw):
    """List every discovered plugin and whether it is enabled."""
    kw.pop("verbose")
    try:
        cfg = load_config(kw.get("config_path"), kw)
        installed = plugins.discover()
        enabled = plugins.select(plugins.default_plugins(), list(cfg.plugins) + list(kw["enable"]),
                                 list(cfg.disable_plugins) + list(kw["disable"]), installed)
    except (ConfigError, plugins.PluginError) as e:
        _fail(str(e))
    options = _discovered_options()
    rows = []
    for name, info in sorted(installed.items()):
        pm = plugins.make_manager()
        try:
            pm.register(plugins._import(info.module), name=name)
            hooks = plugins.hooks_of(pm, name)
        except Exception as e:
            hooks = [f"<cannot load: {e}>"]
        rows.append({
            "name": name, "distribution": info.distribution, "version": info.version,
            "origin": "built-in" if info.builtin else "third-party", "enabled": name in enabled,
            "hooks": hooks, "options": [o.flag for o in options if o.plugin == name],
        })
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "enabled " if r["enabled"] else "disabled"
        click.echo(f"{r['name']:<16} {mark} {r['distribution']} {r['version']} ({r['origin']})")
        click.echo(f"{'':<16} hooks: {', '.join(r['hooks'])}")
        if r["options"]:
            click.echo(f"{'':<16} options: {', '.join(r['options'])}")


@cli.command()
@click.option("-v", "--verbose", count=True)
def cleanup(verbose):
    """Remove every table kproxy installed in this network namespace, and nothing else."""
    _setup_logging(verbose)
    try:
        removed = cleanup_tables(NftCLI())
    except NftError as e:
        _fail(str(e), 1)
    for fam, name in removed:
        click.echo(f"removed table {fam} {name}")


def main():
    cli()
