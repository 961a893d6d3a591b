"""The plugin API: every hook a kproxy plugin can implement.

A plugin is a module (or object) with functions marked ``@kproxy.hookimpl`` whose names
are the hooks below; it is found through the entry-point group ``kproxy`` and runs only
when enabled (the default set, ``--plugin NAME``, or the config file's
``kproxy.plugins``). Hooks are called with keyword arguments, so an implementation takes
only the arguments it needs. Every hook runs on the sync thread, one call at a time, so
plugins need no locking against each other.

Hooks that take part in a sync (``kproxy_pre_render``, ``kproxy_render_chain``) are
called once per plugin by the engine, so that every object and rule is attributed to the
plugin that made it and an exception names its plugin; ``wrapper`` implementations are
not allowed for them. Order: the order the plugins were enabled in, adjusted by
``tryfirst`` / ``trylast``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kproxy")
hookimpl = pluggy.HookimplMarker("kproxy")


@hookspec
def kproxy_add_options(options):
    """Declare the plugin's options.

    Called once when kproxy starts (before the command line is parsed), for every
    discovered plugin, enabled or not, so ``kproxy run --help`` lists them all.
    ``options`` is a ``kproxy.options.OptionRegistry``: call ``options.add(name, type=...,
    default=..., help=..., flag=...)`` once per option. Values come from the flag, or
    from the config file under ``kproxy: {<plugin name>: {<option>: value}}``, or the
    default, and are validated by type; read them with ``app.options(plugin_name)``.
    Return value ignored.
    """


@hookspec
def kproxy_configure(app):
    """Set the plugin up for this kproxy process.

    Called once after the configuration is loaded and every enabled plugin is
    registered, before the first sync. ``app`` is the ``kproxy.app.App``: its
    ``config``, ``options(name)``, ``state``, ``metrics`` registry, ``request_sync()``
    and ``announce_interfaces()`` are the public API a plugin may use. Raising here
    stops kproxy with the plugin named. Return value ignored.
    """


@hookspec
def kproxy_unconfigure(app):
    """Release what ``kproxy_configure`` set up (threads, sockets, servers).

    Called once when kproxy stops (also after ``--once``). Must not touch nftables:
    stopping kproxy leaves its rules in place, as kube-proxy does. Return value ignored.
    """


@hookspec
def kproxy_pre_render(ctx):
    """Declare the nftables objects this plugin owns for this sync.

    Called once per sync, before any chain is rendered. ``ctx`` is a
    ``kproxy.engine.SyncContext``: read the cluster state from ``ctx.state`` and the
    config from ``ctx.config``; declare tables, chains, sets, maps and flowtables with
    ``ctx.declare(obj)`` and add set or map elements with ``ctx.add_element(...)`` (a
    run ``key . 0`` … ``key . N-1`` of an index-keyed map with ``ctx.add_indexed(...)``). The
    main tables are ``ctx.table(4)`` and ``ctx.table(6)``; a plugin may declare tables
    of its own, whose names must start with ``kproxy-``. Every declared object belongs
    to the plugin that declared it; declaring an object another plugin declared is an
    error naming both. Rules are not added here but in ``kproxy_render_chain``.
    Raising aborts the sync without touching the kernel. Return value ignored.
    """


@hookspec
def kproxy_render_chain(ctx, chain):
    """Return the rules this plugin puts into ``chain``.

    Called for each chain (a ``kproxy.nft.Chain``) written in this sync, once per
    plugin, in plugin order; a chain's rules are the concatenation of every plugin's
    answer, so ``tryfirst``/``trylast`` decide who comes first. Return ``None`` (nothing
    for this chain) or a list of rule bodies: strings in nft syntax, or ``(text,
    comment)`` pairs. Build every address, port and name in a rule with
    ``kproxy.nft.values`` so nothing unchecked reaches nft. Raising aborts the sync
    without touching the kernel.
    """


@hookspec
def kproxy_post_apply(ctx, result):
    """React to the outcome of a sync.

    Called once per sync after the transaction was applied or rejected (and also when a
    plugin aborted the sync). ``result`` is a ``kproxy.engine.SyncResult`` with ``ok``,
    ``error``, ``full``, ``duration`` and the applied ``transaction``. Typical uses:
    conntrack cleanup, health servers, metrics, programming a plugin's own separate
    table. An exception here is logged and counted but does not undo the sync. Return
    value ignored.
    """


@hookspec
def kproxy_render_script(ctx):
    """Return nft commands this plugin applies itself, outside the main transaction.

    Called by ``kproxy render`` only, after the main transaction was rendered, so that
    the printed script shows everything kproxy would program. A plugin that programs a
    table of its own in its own transactions (declared with ``ctx.keep_table``) returns
    that table's commands as a ``kproxy.nft.Transaction`` (or ``None``).
    """


@hookspec
def kproxy_interface_change(app, links):
    """The node's network interfaces changed.

    Called whenever an interfaces provider announces the complete current set of links
    (``app.announce_interfaces(links)``), and on each full sync. ``links`` is a tuple of
    ``kproxy.links.Link`` (name, index, kind, up, loopback). Runs on the sync thread.
    Return value ignored.
    """
