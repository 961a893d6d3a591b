"""interfaces: discovers the node's network interfaces with netlink (pyroute2).

Lists the links when kproxy starts and again at every full sync, and announces the
complete set through ``kproxy_interface_change`` whenever it differs from the last
announcement.
"""

from __future__ import annotations

import logging

from kproxy import hookimpl
from kproxy.links import Link

log = logging.getLogger("kproxy.interfaces")
IFF_UP = 0x1
IFF_LOOPBACK = 0x8

_last: dict[int, tuple[Link, ...]] = {}


def list_links() -> tuple[Link, ...]:
    """Every link of this network namespace, sorted by name."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            flags = msg["flags"]
            out.append(Link(
                name=msg.get("ifname") or msg.get_attr("IFLA_IFNAME"),
                index=msg["index"],
                kind=msg.get(("linkinfo", "kind")) or "",
                up=bool(flags & IFF_UP),
                loopback=bool(flags & IFF_LOOPBACK),
            ))
    return tuple(sorted(out))


def _announce(app) -> None:
    try:
        links = list_links()
    except Exception as e:  # netlink trouble must never break a sync
        log.warning("cannot list network interfaces: %s", e)
        return
    if _last.get(id(app)) != links:
        _last[id(app)] = links
        app.announce_interfaces(links)


@hookimpl
def kproxy_configure(app):
    """List the links once at start."""
    _announce(app)


@hookimpl
def kproxy_pre_render(ctx):
    """Re-list the links on every full sync."""
    if ctx.full:
        _announce(ctx.app)


@hookimpl
def kproxy_unconfigure(app):
    """Forget this app's last announcement."""
    _last.pop(id(app), None)
