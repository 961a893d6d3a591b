"""hello: a minimal kproxy plugin (copy this folder to start your own).

It declares one table ``ip kproxy-hello`` with a filter chain at priority -150 (before
kproxy's DNAT) and one rule counting the packets sent to any ClusterIP.
"""

from kproxy import hookimpl
from kproxy.nft import Chain, Set, Table
from kproxy.nft import values as v

TABLE = "kproxy-hello"


@hookimpl
def kproxy_add_options(options):
    """One option: ``--hello-comment`` / config ``kproxy: {hello: {comment: ...}}``."""
    options.add("comment", type="str", default="hello from a plugin", help="Comment on the counting rule")


@hookimpl
def kproxy_pre_render(ctx):
    """Declare the table, the chain and the set of ClusterIPs (one element per Service,
    in the Service's scope, so a partial sync only touches the changed Services)."""
    ctx.declare(Table("ip", TABLE))
    ctx.declare(Chain("ip", TABLE, "prerouting", "filter", "prerouting", -150))
    ips = ctx.declare(Set("ip", TABLE, "cluster-ips", "ipv4_addr"))
    for svc in ctx.services():
        with ctx.scope_of(svc):
            for ip in svc.cluster_ips:
                if ip != "None" and ":" not in ip:
                    ctx.add_element(ips, v.ip(ip, 4))


@hookimpl
def kproxy_render_chain(ctx, chain):
    """The one rule, in our own chain only."""
    if ctx.owns(chain):
        return [("ip daddr @cluster-ips counter", ctx.app.options("hello")["comment"])]
    return None
