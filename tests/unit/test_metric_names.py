"""The sync metrics the engine issue names are registered under kube-proxy's names and
labels. Checked elsewhere: the health server's ``kubeproxy_proxy_{healthz,livez}_total``
over HTTP (``tests/e2e/test_sync_engine_e2e.py``), the conntrack reconciler's in
``test_conntrack_cleanup.py``."""

from __future__ import annotations

from kproxy import pluginmanager as plugins
from kproxy.app import App
from kproxy.config import Config
from kproxy.engine import SyncResult
from kproxy.model import from_api
from kproxy.nft import FakeNft
from kproxy_plugins import DEFAULT_PLUGINS
from objects import service

# as exposed (a counter's samples end in _total) -> label names, from kube-proxy's metrics reference
KUBE_PROXY_METRICS = {
    "kubeproxy_sync_proxy_rules_duration_seconds": {"ip_family"},
    "kubeproxy_sync_full_proxy_rules_duration_seconds": {"ip_family"},
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": {"ip_family"},
    "kubeproxy_network_programming_duration_seconds": {"ip_family"},
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": {"ip_family"},
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": {"ip_family"},
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": set(),
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": set(),
    "kubeproxy_sync_proxy_rules_service_changes_pending": set(),
    "kubeproxy_sync_proxy_rules_service_changes_total": set(),
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": {"ip_family", "traffic_policy"},
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total": {"ip_family"},
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total": {"ip_family"},
}


def test_sync_metrics_have_kube_proxys_names_and_labels():
    pm = plugins.make_manager()
    plugins.load(pm, list(DEFAULT_PLUGINS), plugins.discover())
    app = App(Config(node_name="node-1"), FakeNft(), pm, list(DEFAULT_PLUGINS))
    app.configure()
    try:
        app.sync_metrics.queued()
        assert app.sync(full=True).ok  # observes the durations, timestamps and gauges
        app.state.put(from_api("Service", service("web", "172.30.0.10", [("http", "TCP", 80)])))
        assert not app.sync().full  # a partial sync, and a change's programming latency
        app.sync_metrics.synced(SyncResult(ok=False, full=True, cleanup_failed=True))  # and the failure counters
        labels: dict[str, set] = {}
        for family in app.metrics.collect():
            for sample in family.samples:
                labels.setdefault(family.name, set()).update(set(sample.labels) - {"le"})
        for name, wanted in KUBE_PROXY_METRICS.items():
            family = name.removesuffix("_total") if name.endswith("_total") and name not in labels else name
            assert family in labels, f"{name} is not exposed"
            assert labels[family] == wanted, f"{name} has labels {sorted(labels[family])}, kube-proxy's are {sorted(wanted)}"
    finally:
        app.unconfigure()
