"""The fastpath plugin's metrics, registered in the app's registry (served on /metrics)."""

from __future__ import annotations

import weakref

from prometheus_client import Counter, Gauge

_by_registry: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Metrics:
    def __init__(self, registry):
        self.active = Gauge("kproxy_fastpath_active",
                            "1 while flowtable offload is programmed; 0 when disabled, unsupported by the kernel, or failing",
                            registry=registry)
        self.devices = Gauge("kproxy_fastpath_flowtable_devices", "Devices in the fastpath flowtable", registry=registry)
        self.updates = Counter("kproxy_fastpath_device_updates",
                               "Changes of the flowtable's device list that the kernel accepted", registry=registry)
        self.failures = Counter("kproxy_fastpath_device_update_failures",
                                "Rounds in which the flowtable's devices could not be updated, even after a retry "
                                "with a fresh link listing (retried at the next interface change or sync)",
                                registry=registry)


def metrics_for(registry) -> Metrics:
    """One set of metrics per registry (a plugin configured twice reuses them)."""
    m = _by_registry.get(registry)
    if m is None:
        m = _by_registry[registry] = Metrics(registry)
    return m
