"""kproxy's own metrics, under kube-proxy's names so existing dashboards keep working.

Durations are observed per IP family (one sync programs both). Plugins register their
own metrics in the same registry (``app.metrics``).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))  # kube-proxy: ExponentialBuckets(0.001, 2, 15)
PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))
FAMILIES = ("IPv4", "IPv6")


class SyncMetrics:
    """The sync engine's metrics, updated after every sync."""

    def __init__(self, registry):
        def hist(name, doc, buckets=SYNC_BUCKETS, labels=("ip_family",)):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.duration = hist("kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds")
        self.full_duration = hist("kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs")
        self.partial_duration = hist("kubeproxy_sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs")
        self.programming = hist("kubeproxy_network_programming_duration_seconds",
                                "In Cluster Network Programming Latency in seconds", PROGRAMMING_BUCKETS)
        self.last_timestamp = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                                    "The last time proxy rules were successfully synced", ["ip_family"], registry=registry)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", ["ip_family"], registry=registry)
        self.endpoint_changes_pending = Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                              "Pending proxy rules Endpoint changes", registry=registry)
        self.endpoint_changes_total = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                              "Cumulative proxy rules Endpoint changes", registry=registry)
        self.service_changes_pending = Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                             "Pending proxy rules Service changes", registry=registry)
        self.service_changes_total = Counter("kubeproxy_sync_proxy_rules_service_changes",
                                             "Cumulative proxy rules Service changes", registry=registry)
        # one transaction programs both families: a failure counts for each, as it would
        # for each of kube-proxy's per-family proxiers
        self.sync_failures = Counter("kubeproxy_sync_proxy_rules_nftables_sync_failures",
                                     "Cumulative proxy nftables sync failures", ["ip_family"], registry=registry)
        self.cleanup_failures = Counter("kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                                        "Cumulative proxy nftables cleanup failures", ["ip_family"], registry=registry)
        self.plugin_seconds = Histogram("kproxy_plugin_hook_duration_seconds",
                                        "Time one plugin spent in the render hooks of one sync", ["plugin"],
                                        buckets=SYNC_BUCKETS, registry=registry)
        self.plugin_errors = Counter("kproxy_plugin_errors", "Syncs aborted by an exception in a plugin",
                                     ["plugin"], registry=registry)
        self.sync_render_seconds = Histogram("kproxy_sync_render_duration_seconds",
                                             "Time spent rendering a sync (Python)", buckets=SYNC_BUCKETS, registry=registry)

    def queued(self) -> None:
        for fam in FAMILIES:
            self.last_queued.labels(fam).set(time.time())

    def changes(self, services: int, endpoints: int, pending_services: int, pending_endpoints: int) -> None:
        self.service_changes_total.inc(services)
        self.endpoint_changes_total.inc(endpoints)
        self.service_changes_pending.set(pending_services)
        self.endpoint_changes_pending.set(pending_endpoints)

    def synced(self, result, change_times=()) -> None:
        """Record one sync's outcome; ``change_times`` are the wall-clock times at which
        the changes it programmed were first seen."""
        for name, seconds in result.plugin_seconds.items():
            self.plugin_seconds.labels(name).observe(seconds)
        if result.failed_plugin:
            self.plugin_errors.labels(result.failed_plugin).inc()
        if result.cleanup_failed:
            for fam in FAMILIES:
                self.cleanup_failures.labels(fam).inc()
        if not result.ok:
            if not result.failed_plugin:
                for fam in FAMILIES:
                    self.sync_failures.labels(fam).inc()
            return
        now = time.time()
        self.sync_render_seconds.observe(result.render_seconds)
        for fam in FAMILIES:
            self.duration.labels(fam).observe(result.duration)
            (self.full_duration if result.full else self.partial_duration).labels(fam).observe(result.duration)
            self.last_timestamp.labels(fam).set(now)
            for t in change_times:
                self.programming.labels(fam).observe(max(0.0, now - t))
