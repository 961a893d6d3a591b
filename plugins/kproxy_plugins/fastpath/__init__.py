"""fastpath: offload long connections to ClusterIPs to an nftables flowtable.

Enabled with ``kproxy run --plugin fastpath`` (not in the default set). Once a
connection to a ClusterIP port has passed ``packet-threshold`` packets (both directions
counted), ``flow add`` puts it into the flowtable ``fastpath``; from then on its packets
are forwarded from the ingress hook of the interface they arrive on, skipping the
prerouting, forward and postrouting hooks (conntrack shows ``[OFFLOAD]``; counters and
later forward rules no longer see them). The layout of the table and the choice of the
set key are in ``ruleset``, the choice of interfaces in ``devices``, the programming in
``controller``.

- Own table ``inet kproxy-fastpath``, own transactions: it is programmed after each
  main sync (``kproxy_post_apply``), never inside the main transaction, and kept out of
  the engine's stale-table cleanup with ``ctx.keep_table``.
- Kernel probe at start: a flowtable and a ``flow add`` rule in a scratch table
  (``inet kproxy-fastpath-probe``, removed in the same transaction). Without support:
  one warning naming the missing kernel feature, ``kproxy_fastpath_active`` 0, the rest
  of kproxy unaffected.
- Options: ``packet-threshold`` (``--fastpath-packet-threshold``, KubeProxyConfiguration
  ``nftables.fastpathPacketThreshold``; default 20; 0 disables offload completely: no
  table, and one left from an earlier run is removed) and ``mode`` (``opt-out``: every
  Service except those annotated ``kproxy.io/fastpath: "false"``; ``opt-in``: only those
  annotated ``"true"``).
- Interfaces: every ``kproxy_interface_change`` (the ``interfaces`` plugin follows link
  events) marks the devices for reconciliation after the next sync; the devices
  programmed come from a fresh link listing taken right before the transaction. Full
  syncs reconcile too, so without the ``interfaces`` plugin new links join at the next
  full sync only.
- Metrics: ``kproxy_fastpath_active``, ``kproxy_fastpath_flowtable_devices``,
  ``kproxy_fastpath_device_updates_total``, ``kproxy_fastpath_device_update_failures_total``.
"""

from __future__ import annotations


from kproxy import hookimpl
from kproxy.nft import values as v

from . import ruleset as R
from .controller import Fastpath
from .devices import eligible_devices

PLUGIN = "fastpath"


def list_links():
    """A fresh listing of the node's links (the interfaces plugin's netlink listing)."""
    from kproxy_plugins.interfaces import list_links as netlink_list_links

    return netlink_list_links()


def controller(app) -> Fastpath | None:
    """The fastpath controller of ``app`` (None before ``kproxy_configure``)."""
    return app.plugin_data.get(__name__)


@hookimpl
def kproxy_add_options(options):
    """Declare ``packet-threshold`` and ``mode``."""
    options.add("packet-threshold", type="int", default=20, minimum=0, flag="--fastpath-packet-threshold",
                kube_proxy_field="fastpathPacketThreshold",
                help="Offload a connection to a ClusterIP after this many packets; 0 disables offload")
    options.add("mode", type="str", default="opt-out", choices=R.MODES,
                help='opt-out: every Service unless annotated kproxy.io/fastpath: "false"; '
                     'opt-in: only Services annotated kproxy.io/fastpath: "true"')


@hookimpl
def kproxy_configure(app):
    """Probe the kernel (or remove an old table when the threshold is 0)."""
    opts = app.options(PLUGIN)
    v.integer(opts["packet-threshold"], 0)  # fits nft's comparison, or kproxy stops here naming the plugin
    fp = Fastpath(app, opts["packet-threshold"], opts["mode"], lambda: list_links())
    app.plugin_data[__name__] = fp
    fp.start()


@hookimpl
def kproxy_unconfigure(app):
    """Forget the controller; the table stays in the kernel, like every kproxy rule."""
    app.plugin_data.pop(__name__, None)


@hookimpl
def kproxy_pre_render(ctx):
    """Tell the engine the fastpath table is programmed here, so it is never removed as
    stale (when offload is disabled it is not kept, so a leftover table is removed)."""
    fp = controller(ctx.app)
    if fp is not None and fp.active:
        ctx.keep_table(R.TABLE)


@hookimpl
def kproxy_interface_change(app, links):
    """Remember the links; the flowtable's devices are reconciled after the next sync."""
    fp = controller(app)
    if fp is not None:
        fp.interfaces_changed(links)


@hookimpl
def kproxy_post_apply(ctx, result):
    """Bring the fastpath table in step with the sync that just finished: create it,
    reconcile devices, apply the set's difference. Errors are logged, never raised."""
    fp = controller(ctx.app)
    if fp is not None:
        fp.after_sync(ctx, result)


@hookimpl
def kproxy_render_script(ctx):
    """The fastpath table as it would be created for this state (for ``kproxy render``);
    the devices are the eligible links of the current network namespace."""
    opts = ctx.app.options(PLUGIN)
    if opts["packet-threshold"] == 0:
        return None
    try:
        devices = eligible_devices(list_links())
    except Exception:
        devices = ()
    keys = set()
    for svc in ctx.state.services.values():
        keys |= R.service_keys(svc, opts["mode"])
    return R.build(opts["packet-threshold"], devices, keys, replace=False)
