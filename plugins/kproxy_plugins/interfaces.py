"""interfaces: the node's network interfaces, listed and followed with netlink (pyroute2).

At start the links are listed and announced (``app.announce_interfaces``) before the
first sync. Then a dedicated thread follows link events (``linkwatch.LinkWatcher``:
RTMGRP_LINK subscription, debounced to at most one listing per ``min-interval`` seconds,
and a full re-list at least every ``resync-interval`` seconds). When the set of links
changed, the thread only stores it and asks for a sync (``app.request_sync()``); the
announcement itself is made from ``kproxy_pre_render``, on the sync thread, so every
hook keeps running on one thread. Announcements always carry the complete current set.
"""

from __future__ import annotations

import logging
import threading

from kproxy import hookimpl
from kproxy.links import Link

from .linkwatch import LinkWatcher

log = logging.getLogger("kproxy.interfaces")
PLUGIN = "interfaces"
IFF_UP = 0x1
IFF_LOOPBACK = 0x8


def list_links() -> tuple[Link, ...]:
    """Every link of this network namespace, sorted by name."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            if not name:
                continue
            flags = msg["flags"]
            out.append(Link(
                name=name,
                index=msg["index"],
                kind=msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or "",
                up=bool(flags & IFF_UP),
                loopback=bool(flags & IFF_LOOPBACK),
            ))
    return tuple(sorted(out))


class _State:
    """Per-app state: the watcher, the set waiting to be announced, the last announced."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending: tuple | None = None
        self.announced: tuple | None = None
        self.watcher: LinkWatcher | None = None




def _state(app) -> _State:
    st = app.plugin_data.get(__name__)
    if st is None:
        st = app.plugin_data[__name__] = _State()
    return st


def _announce(app, st: _State, links) -> None:
    if links != st.announced:
        st.announced = links
        app.announce_interfaces(links)


def _list_and_announce(app, st: _State):
    try:
        links = list_links()
    except Exception as e:  # netlink trouble must never break a sync
        log.warning("cannot list network interfaces: %s", e)
        return None
    _announce(app, st, links)
    return links


@hookimpl
def kproxy_add_options(options):
    """Declare the debounce intervals."""
    options.add("min-interval", type="float", default=5.0, minimum=0,
                help="Seconds between two listings of the links after link events (debounce)")
    options.add("resync-interval", type="float", default=60.0, minimum=1,
                help="Seconds between two full listings of the links even without events")


@hookimpl
def kproxy_configure(app):
    """List and announce the links, then start following link events."""
    st = _state(app)
    links = _list_and_announce(app, st)
    opts = app.options(PLUGIN)

    def changed(new_links):  # on the watcher's thread: hand over to the sync thread
        with st.lock:
            st.pending = new_links
        app.request_sync()

    st.watcher = LinkWatcher(lambda: list_links(), changed, opts["min-interval"], opts["resync-interval"]).start(links)


@hookimpl
def kproxy_pre_render(ctx):
    """Announce links the watcher found changed (on the sync thread). Without a watcher
    (kproxy not configured, e.g. ``render``), re-list on every full sync."""
    st = _state(ctx.app)
    with st.lock:
        pending, st.pending = st.pending, None
    if pending is not None:
        _announce(ctx.app, st, pending)
    elif st.watcher is None and ctx.full:
        _list_and_announce(ctx.app, st)


@hookimpl
def kproxy_unconfigure(app):
    """Stop following link events."""
    st = app.plugin_data.pop(__name__, None)
    if st is not None and st.watcher is not None:
        st.watcher.stop()
