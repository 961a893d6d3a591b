"""conntrack-cleanup: deletes stale UDP conntrack entries after each successful sync.

UDP has no connection end, so a client that keeps sending from one source port keeps
its conntrack entry, and with it the endpoint the first packet was DNATed to, for as
long as it sends. After every successful sync this plugin deletes, per IP family and
over netlink (module ``netlink``: a small ctnetlink client, as pyroute2's decoder is far
too slow for big tables), kube-proxy's stale entries:

- the original destination is a ClusterIP, externalIP or LoadBalancer IP (not
  ``ipMode: Proxy``) and port of a UDP Service port, and the reply source is not a
  *serving* endpoint of that port (ready or serving; traffic policy, topology and
  terminating state are ignored, as in kube-proxy);
- the original destination port is a UDP NodePort (and the destination is not another
  Service address with that port), and the reply source is not a serving endpoint.

A Service port without serving endpoints keeps none of its entries (kubernetes#139628),
nor does a Service port that is gone (deleted Service, removed port or address;
kubernetes#141371). A step further than kube-proxy: a UDP entry to a ClusterIP on a
port that is no UDP Service port of it is stale as well (kproxy rejects such traffic, so
only an old DNAT can have made it), and the ClusterIPs programmed before kproxy started
are read from the kernel's ``cluster-ips`` sets, so a restarted kproxy also cleans up
after Services deleted while it was down.

Only what may have changed is examined: on a partial sync the Service ports of the
changed Services whose addresses or serving endpoints differ from the last sync; on a
full sync every UDP Service port. With nothing to examine the conntrack table is not
read; with a few frontends to examine the kernel filters the entries by destination,
with many every UDP entry is read once. Errors are logged, never raised into the sync;
after one, the next sync examines everything again. The kernel is only touched when
kproxy programs it (the ``nft`` backend); with ``--dry-run`` or a fake backend the
plugin does nothing.

Metrics: ``kubeproxy_conntrack_reconciler_sync_duration_seconds`` and
``kubeproxy_conntrack_reconciler_deleted_entries_total``, labelled ``ip_family``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from kproxy import hookimpl
from kproxy.context import MAIN_TABLE

from ..layout import CLUSTER_IPS
from . import netlink

log = logging.getLogger("kproxy.conntrack-cleanup")
MAX_FILTERED_DUMPS = 16  # more frontends to check than this: read all UDP entries once
BUCKETS = tuple(0.001 * 2**i for i in range(15))  # kube-proxy: ExponentialBuckets(0.001, 2, 15)
FAMILY_LABEL = {4: "IPv4", 6: "IPv6"}
NO_ENDPOINTS: frozenset = frozenset()



@dataclass(frozen=True)
class Flow:
    """One UDP conntrack entry: original destination address and port, reply source."""

    dst: str
    dport: int
    reply_src: str
    ref: object = field(default=None, compare=False)  # what the backend needs to delete it


class ConntrackError(Exception):
    """Some entries could not be deleted; ``deleted`` were."""

    def __init__(self, message: str, deleted: int):
        super().__init__(message)
        self.deleted = deleted


def _version(ip: str) -> int:
    return 6 if ":" in ip else 4


def _norm(ip: str, version: int) -> str:
    return str(ipaddress.IPv6Address(ip)) if version == 6 else ip


def _fe_version(fe: tuple) -> int:
    return fe[1] if fe[0] == "np" else _version(fe[1])


class NetlinkConntrack:
    """The kernel's conntrack table over netlink (see ``netlink``); a socket per call,
    so it works on whichever thread the sync runs on."""

    def list_udp(self, version: int, dst: str | None = None, dport: int | None = None) -> list[Flow]:
        return [Flow(_norm(d, version), dp, _norm(r, version), (s, sp, d, dp, z))
                for s, sp, d, dp, r, z in netlink.list_udp(version, dst, dport)]

    def delete(self, version: int, flows: list[Flow]) -> int:
        deleted, errors = netlink.delete(version, [f.ref for f in flows])
        if errors:
            raise ConntrackError(f"{len(errors)} entries not deleted, first: {errors[0]}", deleted)
        return deleted


def kernel_cluster_ips(nft: str = "nft") -> set[str]:
    """The ClusterIPs in the kernel's ``cluster-ips`` sets (as a previous kproxy left
    them); empty when there are none or they cannot be read."""
    out: set[str] = set()
    for family in ("ip", "ip6"):
        try:
            proc = subprocess.run([nft, "-j", "list", "set", family, MAIN_TABLE, CLUSTER_IPS],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return out
        if proc.returncode != 0:
            continue  # no such table or set
        for item in json.loads(proc.stdout or "{}").get("nftables", ()):
            for elem in item.get("set", {}).get("elem", ()):
                value = elem.get("elem", {}).get("val") if isinstance(elem, dict) else elem
                if isinstance(value, str):
                    out.add(str(ipaddress.ip_address(value)))
    return out


def frontends(svc, state) -> dict[tuple, frozenset]:
    """The UDP frontends of a Service with the IPs of their serving endpoints:
    ``("ip", address, port)`` for Service addresses, ``("np", version, nodePort)``."""
    out: dict[tuple, frozenset] = {}
    addresses = [*svc.cluster_ips, *svc.external_ips, *(i.ip for i in svc.lb_ingress if i.ip_mode != "Proxy")]
    for port in svc.ports:
        if port.protocol != "UDP":
            continue
        for version in (4, 6):
            ips = [a for a in addresses if _version(a) == version]
            if not any(_version(a) == version for a in svc.cluster_ips):
                continue  # the Service is not of this family
            serving = frozenset(e.ip for e in state.service_endpoints(svc, port, version) if e.ready or e.serving)
            for ip in ips:
                out[("ip", ip, port.port)] = serving
            if port.node_port:
                out[("np", version, port.node_port)] = serving
    return out


class Cleaner:
    """What the last syncs programmed, and the cleanup after each sync."""

    def __init__(self, conntrack, registry=None, former_cluster_ips=()):
        self.conntrack = conntrack
        self.known: dict[tuple, tuple[dict, tuple]] = {}  # Service key -> (frontends, ClusterIPs)
        self.index: dict[tuple, tuple] = {}  # frontend -> (Service key, serving IPs), of every Service
        self.former_cluster_ips = set(former_cluster_ips)
        self.everything = True  # examine every Service at the next sync (at start, after errors)
        self.duration = Histogram("kubeproxy_conntrack_reconciler_sync_duration_seconds",
                                  "ReconcileConntrackFlowsLatency latency in seconds", ["ip_family"],
                                  buckets=BUCKETS, registry=registry)
        self.deleted = Counter("kubeproxy_conntrack_reconciler_deleted_entries",
                               "Cumulative conntrack flows deleted by conntrack reconciler", ["ip_family"],
                               registry=registry)

    def _remember(self, key, new: dict, cluster_ips: tuple) -> None:
        old = self.known.pop(key, ({}, ()))[0]
        for fe in old:
            if self.index.get(fe, (None,))[0] == key:
                del self.index[fe]
        if new:
            self.known[key] = (new, cluster_ips)
            for fe, serving in new.items():
                self.index[fe] = (key, serving)

    def plan(self, state, changed: set | None):
        """Remember this sync's frontends; return (frontends to check with their serving
        IPs, ClusterIPs whose entries on no UDP Service port are stale)."""
        everything = changed is None or self.everything
        keys = set(state.services) | set(self.known) if everything else set(changed)
        targets: dict[tuple, frozenset] = {}
        gone: set[tuple] = set()
        cluster_ips = set(self.former_cluster_ips)
        for key in keys:
            svc = state.services.get(key)
            new = frontends(svc, state) if svc is not None else {}
            old, old_ips = self.known.get(key, ({}, ()))
            new_ips = tuple(svc.cluster_ips) if new else ()
            for fe, serving in new.items():
                if everything or old.get(fe) != serving:
                    targets[fe] = serving
            gone.update(old.keys() - new.keys())
            if everything or old != new:
                cluster_ips.update(old_ips, new_ips)
            self._remember(key, new, new_ips)
        for fe in gone:  # a frontend one Service lost may now belong to another
            targets[fe] = self.index.get(fe, (None, NO_ENDPOINTS))[1]
        return targets, cluster_ips

    def is_stale(self, flow: Flow, version: int, targets: dict, cluster_ips: set) -> bool:
        serving = targets.get(("ip", flow.dst, flow.dport))
        if serving is not None:
            return flow.reply_src not in serving
        if ("ip", flow.dst, flow.dport) in self.index:
            return False  # a Service address that did not change
        if flow.dst in cluster_ips:
            return True  # a ClusterIP, but no UDP Service port of it
        serving = targets.get(("np", version, flow.dport))
        return serving is not None and flow.reply_src not in serving

    def _flows(self, version: int, filters: set) -> list[Flow]:
        """The UDP entries the filters select: one kernel-filtered read per filter when
        there are few, else one read of every UDP entry."""
        if len(filters) > MAX_FILTERED_DUMPS:
            return self.conntrack.list_udp(version)
        found = {}
        for _, dst, dport in sorted(filters, key=str):
            for flow in self.conntrack.list_udp(version, dst, dport):
                found[flow.ref] = flow
        return list(found.values())

    def after_sync(self, state, changed: set | None) -> int:
        """Delete the stale entries this sync made; returns how many were deleted."""
        targets, cluster_ips = self.plan(state, changed)
        self.former_cluster_ips.clear()
        self.everything = False
        total = 0
        for version in (4, 6):
            filters = {("ip", fe[1], fe[2]) if fe[0] == "ip" else ("np", None, fe[2])
                       for fe in targets if _fe_version(fe) == version}
            filters |= {("cip", ip, None) for ip in cluster_ips if _version(ip) == version}
            if not filters:
                continue
            t0 = time.perf_counter()
            try:
                stale = [f for f in self._flows(version, filters) if self.is_stale(f, version, targets, cluster_ips)]
                n = self.conntrack.delete(version, stale) if stale else 0
            except Exception as e:
                n = getattr(e, "deleted", 0)
                self.everything = True
                log.error("conntrack cleanup (%s) failed: %s: %s", FAMILY_LABEL[version], type(e).__name__, e)
            self.duration.labels(FAMILY_LABEL[version]).observe(time.perf_counter() - t0)
            if n:
                self.deleted.labels(FAMILY_LABEL[version]).inc(n)
                log.info("deleted %d stale UDP conntrack entries (%s)", n, FAMILY_LABEL[version])
            total += n
        return total


def conntrack_for(app):
    """The conntrack table this app may clean: the kernel's when kproxy programs the
    kernel (``backend.programs_kernel``), else None (dry run, fake backends)."""
    return NetlinkConntrack() if getattr(app.backend, "programs_kernel", False) else None


@hookimpl
def kproxy_configure(app):
    """Register the metrics and note the ClusterIPs a previous kproxy programmed."""
    conntrack = conntrack_for(app)
    former = kernel_cluster_ips(getattr(app.backend, "nft", "nft")) if conntrack is not None else ()
    app.plugin_data[__name__] = Cleaner(conntrack, app.metrics, former)


@hookimpl
def kproxy_post_apply(ctx, result):
    """After a successful sync, delete the UDP conntrack entries it made stale."""
    cleaner = ctx.app.plugin_data.get(__name__)
    if cleaner is None or cleaner.conntrack is None or not result.ok:
        return
    try:
        cleaner.after_sync(ctx.state, ctx.changed)
    except Exception:  # never into the sync
        cleaner.everything = True
        log.exception("conntrack cleanup failed")


@hookimpl
def kproxy_unconfigure(app):
    """Forget this app's state."""
    app.plugin_data.pop(__name__, None)
