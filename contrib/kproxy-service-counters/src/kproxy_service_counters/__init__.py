"""service-counters: per-Service-port traffic counters, exposed as Prometheus metrics.

Enabled with ``kproxy run --plugin service-counters``. Chain-light: per family one table
``ip kproxy-counters`` / ``ip6 kproxy-counters`` with

- two named counters per Service port: ``pkts.<ns>.<service>[.<port name>].<proto>.<port>``
  (every packet of the port's connections, both directions) and ``new.<ns>...`` (packets
  that open a connection, i.e. new connections); each counter's comment holds its
  metric labels ``<ns>/<service>/<port name or number>/<proto>``;
- maps ``service-counters`` and ``service-new-connections`` of
  ``address . protocol . port : counter`` (ClusterIPs, externalIPs, LoadBalancer IPs);
- base chains ``prerouting`` and ``output`` (filter, priority -150: after conntrack,
  before DNAT, so the original destination is still the Service address) with one rule
  per protocol plus one for new connections::

      meta l4proto tcp counter name ct original ip daddr . meta l4proto . ct original proto-dst map @service-counters
      ct state new counter name ip daddr . meta l4proto . th dport map @service-new-connections

The table is programmed in transactions of its own after each main sync
(``kproxy_post_apply``), kept out of the engine's stale-table cleanup with
``ctx.keep_table``; a partial sync touches only the changed Services' elements and
counters. Counters survive kproxy restarts (``add counter`` keeps an existing one) and
are deleted with their Service port. Metrics, read from ``nft -j list counters`` when
scraped (so they need no state of this process, and count across restarts): ``kproxy_service_packets_total``, ``kproxy_service_bytes_total`` and
``kproxy_service_new_connections_total`` with labels namespace, service, port, protocol.
NodePort traffic is not counted.
"""

from __future__ import annotations

import json
import logging
import subprocess
import weakref

from prometheus_client.core import CounterMetricFamily

from kproxy import hookimpl
from kproxy.nft import Chain, Counter, Element, NftError, Rule, Set, Table, Transaction
from kproxy.nft import values as v

log = logging.getLogger("kproxy.service-counters")

PLUGIN = "service-counters"
TABLE_NAME = "kproxy-counters"
FAMILIES = {4: "ip", 6: "ip6"}
PACKETS_MAP = "service-counters"
NEW_MAP = "service-new-connections"
PRIORITY = -150
PROTOS = ("tcp", "udp", "sctp")

_controllers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # App -> Counters


# -- what a Service wants ------------------------------------------------------------------

def counter_names(svc, port) -> tuple[str, str]:
    """The packet and new-connection counter names of one Service port (readable in
    ``nft list counters``; unique because namespaces, Service and port names have no dots)."""
    named = f"{port.name}." if port.name else ""
    base = f"{svc.namespace}.{svc.name}.{named}{v.proto(port.protocol)}.{v.port(port.port)}"
    return v.name(f"pkts.{base}"), v.name(f"new.{base}")


def labels_comment(labels) -> str:
    return "/".join(labels)


def service_elements(svc) -> dict:
    """(version, element key) -> (packet counter, new counter, labels) for one Service.

    Labels are (namespace, service, port, protocol); ``port`` is the port's name, or its
    number when it has none. Addresses that do not parse are skipped."""
    out = {}
    addrs = [a for a in svc.cluster_ips if a and a != "None"] + list(svc.external_ips) + [i.ip for i in svc.lb_ingress if i.ip]
    for port in svc.ports:
        try:
            names = counter_names(svc, port)
            proto, pnum = v.proto(port.protocol), v.port(port.port)
        except ValueError:
            continue
        labels = (svc.namespace, svc.name, port.name or pnum, proto)
        for a in addrs:
            try:
                ip = v.ip(a)
            except ValueError:
                continue
            out[(6 if ":" in ip else 4, f"{ip} . {proto} . {pnum}")] = (*names, labels)
    return out


def table(version: int) -> Table:
    return Table(FAMILIES[version], TABLE_NAME, "kproxy service-counters: per-Service-port counters")


def structure(version: int) -> list:
    """The table's maps, chains and rules (without counters and elements)."""
    fam = FAMILIES[version]
    key = f"{v.addr_type(fam)} . inet_proto . inet_service"
    objs = [Set(fam, TABLE_NAME, PACKETS_MAP, key, "counter", comment="Service port -> packet counter"),
            Set(fam, TABLE_NAME, NEW_MAP, key, "counter", comment="Service port -> new-connection counter")]
    for hook in ("prerouting", "output"):
        objs.append(Chain(fam, TABLE_NAME, hook, "filter", hook, PRIORITY))
    return objs


def rules(version: int, chain: str) -> list[Rule]:
    fam = FAMILIES[version]
    a = v.addr_keyword(fam)
    out = [Rule(fam, TABLE_NAME, chain, f"meta l4proto {p} counter name ct original {a} daddr . meta l4proto "
                                        f". ct original proto-dst map @{PACKETS_MAP}") for p in PROTOS]
    out.append(Rule(fam, TABLE_NAME, chain, f"ct state new counter name {a} daddr . meta l4proto . th dport map @{NEW_MAP}"))
    return out


# -- reading counters ---------------------------------------------------------------------

def read_counters(backend, family: str) -> dict[str, tuple[int, int, str | None]]:
    """name -> (packets, bytes, comment) of the counters in our table of ``family``
    ({} if there is none)."""
    if hasattr(backend, "counters"):  # FakeNft
        try:
            return backend.counters(family, TABLE_NAME)
        except KeyError:
            return {}
    nft = getattr(backend, "nft", "nft")
    proc = subprocess.run([nft, "-j", "list", "counters", "table", family, TABLE_NAME],
                          capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        return {}
    out = {}
    for item in json.loads(proc.stdout or '{"nftables": []}')["nftables"]:
        c = item.get("counter")
        if c:
            out[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)), c.get("comment"))
    return out


class Collector:
    """Prometheus collector reading the counters from the kernel at scrape time; the
    labels come from the counters' comments, the values of both families are summed."""

    def __init__(self, backend):
        self.backend = backend

    def describe(self):
        return []

    def collect(self):
        names = ("namespace", "service", "port", "protocol")
        pkts = CounterMetricFamily("kproxy_service_packets", "Packets of connections to a Service port (both directions)", labels=names)
        nbytes = CounterMetricFamily("kproxy_service_bytes", "Bytes of connections to a Service port (both directions)", labels=names)
        new = CounterMetricFamily("kproxy_service_new_connections", "New connections to a Service port", labels=names)
        sums: dict = {}
        for fam in FAMILIES.values():
            try:
                values = read_counters(self.backend, fam)
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                log.warning("service-counters: cannot read counters of %s %s: %s", fam, TABLE_NAME, e)
                continue
            for name, (p, b, comment) in values.items():
                lab = tuple((comment or "").split("/"))
                if len(lab) != 4:
                    continue  # not one of ours
                s = sums.setdefault((name.split(".", 1)[0], lab), [0, 0])
                s[0] += p
                s[1] += b
        for (kind, lab), (p, b) in sorted(sums.items()):
            if kind == "pkts":
                pkts.add_metric(lab, p)
                nbytes.add_metric(lab, b)
            else:
                new.add_metric(lab, p)
        yield from (pkts, nbytes, new)


# -- programming the table ------------------------------------------------------------------

class Counters:
    """The counter tables of one ``App``, programmed after each main sync."""

    def __init__(self, app):
        self.app = app
        self.per_service: dict[tuple, dict] = {}  # Service key -> its service_elements()
        self.in_kernel: dict = {}  # (version, element key) -> (pkts name, new name, labels)
        self.built = False

    def wanted(self) -> dict:
        out = {}
        for elems in self.per_service.values():
            out.update(elems)
        return out

    def after_sync(self, ctx) -> None:
        services = ctx.state.services
        touched = set(self.per_service) | set(services) if (ctx.full or not self.built) else set(ctx.changed or ())
        for key in touched:
            svc = services.get(key)
            if svc is None:
                self.per_service.pop(key, None)
            else:
                self.per_service[key] = service_elements(svc)
        wanted = self.wanted() if (ctx.full or not self.built) else None
        try:
            if not self.built:
                self._build(wanted)
            else:
                self._update(touched, wanted)
        except NftError as e:
            log.warning("service-counters: programming %s failed (%s); rebuilding after the next sync", TABLE_NAME, e)
            self.built = False

    def _build(self, wanted) -> None:
        """Create (or take over) both tables: structure, counters, elements; delete counters
        nobody wants any more. Existing counters keep their values."""
        txn = Transaction()
        present = set(self.app.backend.list_tables())
        for ver, fam in FAMILIES.items():
            add_contents(txn, ver, wanted, flush=True)
            existing = read_counters(self.app.backend, fam) if (fam, TABLE_NAME) in present else {}
            for name in sorted(set(existing) - set(self._counters_of(ver, wanted))):
                txn.delete(Counter(fam, TABLE_NAME, name))
        self.app.backend.apply(txn)
        self._done(wanted)
        self.built = True
        log.info("service-counters: counting %d Service port destinations", len(wanted))

    def _update(self, touched, wanted) -> None:
        """Apply the difference for the touched Services only (partial sync)."""
        if wanted is None:
            wanted = dict(self.in_kernel)
            for k in [k for k, val in self.in_kernel.items() if val[2][:2] in touched]:
                del wanted[k]
            for key in touched:
                wanted.update(self.per_service.get(key, {}))
        old = self.in_kernel
        if wanted == old:
            return
        txn = Transaction()
        for ver, fam in FAMILIES.items():
            before, after = self._counters_of(ver, old), self._counters_of(ver, wanted)
            for name in sorted(set(after) - set(before)):
                txn.add(Counter(fam, TABLE_NAME, name, labels_comment(after[name])))
            for (ev, key), val in old.items():
                if ev == ver and wanted.get((ev, key), (None,))[:2] != val[:2]:
                    txn.delete(Element(fam, TABLE_NAME, PACKETS_MAP, key)).delete(Element(fam, TABLE_NAME, NEW_MAP, key))
            for (ev, key), (pk, nw, _) in wanted.items():
                if ev == ver and old.get((ev, key), (None,))[:2] != (pk, nw):
                    txn.add(Element(fam, TABLE_NAME, PACKETS_MAP, key, f'"{pk}"'))
                    txn.add(Element(fam, TABLE_NAME, NEW_MAP, key, f'"{nw}"'))
            for name in sorted(set(before) - set(after)):
                txn.delete(Counter(fam, TABLE_NAME, name))
        self.app.backend.apply(txn)
        self._done(wanted)

    @staticmethod
    def _counters_of(version, elements) -> dict[str, tuple]:
        """counter name -> labels, of one family."""
        return {n: val[2] for (ev, _), val in elements.items() if ev == version for n in val[:2]}

    def _done(self, wanted) -> None:
        self.in_kernel = dict(wanted)


def controller(app) -> Counters | None:
    """The counters of ``app`` (None before ``kproxy_configure``)."""
    return _controllers.get(app)


# -- hooks ----------------------------------------------------------------------------------

@hookimpl
def kproxy_configure(app):
    """Create the controller and register the metrics collector in ``app.metrics``."""
    _controllers[app] = Counters(app)
    app.metrics.register(Collector(app.backend))


@hookimpl
def kproxy_unconfigure(app):
    """Forget the controller; the counters stay in the kernel, like every kproxy rule."""
    _controllers.pop(app, None)


@hookimpl
def kproxy_pre_render(ctx):
    """Keep the counter tables out of the engine's stale-table cleanup (they are
    programmed here, in transactions of their own)."""
    for ver in FAMILIES:
        ctx.keep_table(table(ver))


@hookimpl
def kproxy_post_apply(ctx, result):
    """Bring the counter tables in step with the sync that just succeeded (only the
    changed Services on a partial sync). nft errors are logged, never raised."""
    c = controller(ctx.app)
    if c is not None and result.ok:
        c.after_sync(ctx)


def add_contents(txn: Transaction, ver: int, wanted: dict, flush: bool = False) -> None:
    """Add one family's table, structure (flushed when ``flush``), counters, map
    elements and rules to ``txn``."""
    fam = FAMILIES[ver]
    txn.add(table(ver))
    for obj in structure(ver):
        txn.add(obj)
        if flush:
            txn.flush(obj)
    for name, lab in sorted(Counters._counters_of(ver, wanted).items()):
        txn.add(Counter(fam, TABLE_NAME, name, labels_comment(lab)))
    for (ev, key), (pk, nw, _) in sorted(wanted.items()):
        if ev == ver:
            txn.add(Element(fam, TABLE_NAME, PACKETS_MAP, key, f'"{pk}"'))
            txn.add(Element(fam, TABLE_NAME, NEW_MAP, key, f'"{nw}"'))
    for hook in ("prerouting", "output"):
        for r in rules(ver, hook):
            txn.add(r)


@hookimpl
def kproxy_render_script(ctx):
    """The counter tables as they would be created for this state (``kproxy render``)."""
    wanted = {}
    for svc in ctx.state.services.values():
        wanted.update(service_elements(svc))
    txn = Transaction()
    for ver in FAMILIES:
        add_contents(txn, ver, wanted)
    return txn
