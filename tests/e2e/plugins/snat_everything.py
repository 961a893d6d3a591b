"""A test plugin that replaces the built-in masquerade plugin: it source-NATs every
DNATed Service connection to 192.0.2.1, whatever its source, using only the public API."""

from kproxy import hookimpl
from kproxy.nft import Chain

SNAT_ADDRESS = "192.0.2.1"


@hookimpl
def kproxy_pre_render(ctx):
    """Own a postrouting chain in the main IPv4 table."""
    t = ctx.table(4)
    ctx.declare(Chain(t.family, t.name, "snat-everything", "nat", "postrouting", 100))


@hookimpl
def kproxy_render_chain(ctx, chain):
    """SNAT every connection that was DNATed."""
    if ctx.owns(chain):
        return [f"ct status dnat snat ip to {SNAT_ADDRESS}"]
    return None
