"""connlimit: per-Service new-connection rate limits from an annotation.

Enabled with ``kproxy run --plugin connlimit``. A Service annotated

    kproxy.io/connection-rate-limit: "10/second"     # N/second, N/minute, N/hour or N/day

accepts at most that many new connections per Service port and address (ClusterIP,
externalIP, LoadBalancer IP) in that time, plus a burst of ``default-burst`` (option,
``--connlimit-default-burst``, config ``kproxy: {connlimit: {default-burst: 5}}``);
new connections over the rate are dropped before DNAT. Existing connections are never
touched. A value that does not parse is logged (naming the Service and the annotation)
and the Service is not limited.

Chain-light layout, per family (table ``ip kproxy-connlimit`` / ``ip6 kproxy-connlimit``),
declared through the engine like the built-in plugins (so partial syncs only touch the
changed Services' elements):

- per distinct rate R (e.g. ``10-second``): a set ``limit-R`` of the limited
  ``address . protocol . port`` and a dynamic set ``meter-R`` holding one token bucket
  per destination (filled by the kernel);
- base chains ``prerouting`` and ``output`` (filter, priority -150: after conntrack,
  before DNAT) with one rule per distinct rate::

      ct state new ip daddr . meta l4proto . th dport @limit-10-second update @meter-10-second { ip daddr . meta l4proto . th dport limit rate over 10/second burst 5 packets } counter drop

The rules grow with the number of distinct rates in use, not with Services. A full
sync re-creates the meters (their buckets start full again).
"""

from __future__ import annotations

import logging
import re

from kproxy import hookimpl
from kproxy.nft import Chain, Set, Table
from kproxy.nft import values as v

log = logging.getLogger("kproxy.connlimit")

PLUGIN = "connlimit"
ANNOTATION = "kproxy.io/connection-rate-limit"
TABLE_NAME = "kproxy-connlimit"
FAMILIES = {4: "ip", 6: "ip6"}
HOOKS = ("prerouting", "output")
PRIORITY = -150
UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"\s*([0-9]+)\s*/\s*(second|minute|hour|day)\s*")


def parse_rate(text) -> tuple[int, str]:
    """``"10/second"`` -> ``(10, "second")``; raises ValueError saying what is wrong."""
    m = _RATE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not N/second, N/minute, N/hour or N/day")
    n = int(m.group(1))
    if not 1 <= n <= 2**32 - 1:
        raise ValueError(f"{text!r}: the rate must be at least 1")
    return n, m.group(2)


def destinations(svc) -> list[tuple[int, str]]:
    """(IP version, ``address . protocol . port``) of every limited destination of a Service."""
    addrs = [a for a in svc.cluster_ips if a and a != "None"] + list(svc.external_ips) + [i.ip for i in svc.lb_ingress if i.ip]
    out = []
    for a in addrs:
        try:
            ip = v.ip(a)
        except ValueError:
            continue
        for p in svc.ports:
            try:
                out.append((6 if ":" in ip else 4, f"{ip} . {v.proto(p.protocol)} . {v.port(p.port)}"))
            except ValueError:
                continue
    return out


def _key_type(fam: str) -> str:
    return f"{v.addr_type(fam)} . inet_proto . inet_service"


def class_sets(fam: str, n: int, unit: str) -> tuple[Set, Set]:
    """The set of limited destinations and the meter of one rate class."""
    cls = f"{n}-{unit}"
    limited = Set(fam, TABLE_NAME, f"limit-{cls}", _key_type(fam), comment=f"destinations limited to {n}/{unit}")
    meter = Set(fam, TABLE_NAME, f"meter-{cls}", _key_type(fam), flags=("dynamic",),
                timeout=max(60, 2 * UNITS[unit]), comment=f"token buckets of {n}/{unit}")
    return limited, meter


# -- hooks ----------------------------------------------------------------------------------

@hookimpl
def kproxy_add_options(options):
    """Declare ``default-burst``: new connections allowed above the rate in a burst."""
    options.add("default-burst", type="int", default=5, minimum=0,
                help="New connections a rate-limited Service port accepts in a burst above its rate")


@hookimpl
def kproxy_configure(app):
    """Check the burst fits nft (kproxy stops here, naming the plugin, if not)."""
    v.integer(app.options(PLUGIN)["default-burst"], 0)


@hookimpl
def kproxy_pre_render(ctx):
    """Declare the tables and chains, and per annotated Service (in its scope, so a
    partial sync only re-renders the changed ones) its rate class's sets and elements."""
    for ver, fam in FAMILIES.items():
        ctx.declare(Table(fam, TABLE_NAME, "kproxy connlimit: per-Service new-connection rate limits"))
        for hook in HOOKS:
            ctx.declare(Chain(fam, TABLE_NAME, hook, "filter", hook, PRIORITY))
    for svc in ctx.services():
        raw = (svc.annotations or {}).get(ANNOTATION)
        if raw is None:
            continue
        try:
            n, unit = parse_rate(raw)
        except ValueError as e:
            log.warning("Service %s/%s: annotation %s: %s; the Service is not rate-limited",
                        svc.namespace, svc.name, ANNOTATION, e)
            continue
        with ctx.scope_of(svc):
            for ver, key in destinations(svc):
                limited, meter = class_sets(FAMILIES[ver], n, unit)
                ctx.declare(limited)
                ctx.declare(meter)
                ctx.add_element(limited, key)


@hookimpl
def kproxy_render_chain(ctx, chain):
    """One rule per rate class in use in our two base chains."""
    if not ctx.owns(chain):
        return None
    burst = ctx.app.options(PLUGIN)["default-burst"]
    a = v.addr_keyword(chain.family)
    key = f"{a} daddr . meta l4proto . th dport"
    out = []
    for s in sorted(ctx.declared(Set), key=lambda s: s.name):
        if s.table_key != chain.table_key or ctx.owner(s) != PLUGIN or not s.name.startswith("limit-"):
            continue
        cls = s.name[len("limit-"):]
        n, unit = cls.split("-")
        out.append((f"ct state new {key} @{s.name} update @meter-{cls} "
                    f"{{ {key} limit rate over {v.integer(int(n), 1)}/{unit} burst {v.integer(burst)} packets }} counter drop",
                    f"connection rate limit {n}/{unit}"))
    return out
