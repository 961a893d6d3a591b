"""The Kubernetes API source: Services, EndpointSlices, the own Node and ServiceCIDRs.

``KubeSource(app, client)`` runs one ``Reflector`` thread per resource (see
``reflector.py``) writing into ``app.state``:

=================  ==========================================  ===========================
resource           path                                        server-side filter
=================  ==========================================  ===========================
Services           /api/v1/services                            kube-proxy's label selector
EndpointSlices     /apis/discovery.k8s.io/v1/endpointslices    kube-proxy's label selector
the own Node       /api/v1/nodes                               metadata.name=<node name>
ServiceCIDRs       /apis/networking.k8s.io/v1/servicecidrs     (optional: 404 = not served)
=================  ==========================================  ===========================

kube-proxy's selector, ``!service.kubernetes.io/service-proxy-name,
!service.kubernetes.io/headless``, is applied to both Services and EndpointSlices, as
kube-proxy does: Services another proxy owns and the slices of headless Services never
leave the API server (the slices of a Service carry its labels too).

Gating: ``app.sources_synced`` is set only once the initial lists of Services *and*
EndpointSlices are complete, so a half-filled cache never reaches the datapath. After
that every change asks for a sync (``app.request_sync()``); a change of the own Node
(labels, zone, podCIDRs, addresses) asks for a full one. A lost connection changes
nothing in the state, so the datapath keeps its rules until the watch is back.

``status()`` gives each reflector's ``ReflectorStatus`` (synced, watching,
resourceVersion, last event time, lists, events, errors, skipped objects); the same
figures are exported as ``kproxy_kube_reflector_*`` metrics in ``app.metrics``.

``client_configuration()`` finds the API: ``--kubeconfig``, then
``clientConnection.kubeconfig``, then the in-cluster service account, then
``$KUBECONFIG`` or ``~/.kube/config``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from urllib.parse import urlsplit

from .. import __version__
from ..model import HEADLESS_LABEL, PROXY_NAME_LABEL, EndpointSlice, Node, Service, ServiceCIDR
from .reflector import Reflector, ReflectorStatus, Resource, WatchOptions

log = logging.getLogger("kproxy.kube")

PROXY_SELECTOR = f"!{PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
REQUIRED = ("Service", "EndpointSlice")  # the kinds whose initial list gates the first sync


class KubeConfigError(Exception):
    """No usable API configuration (the message says what was tried)."""


def resources(node_name: str) -> list[Resource]:
    """The four collections kproxy reflects, with kube-proxy's server-side filters."""
    return [
        Resource("Service", "services", "/api/v1/services", label_selector=PROXY_SELECTOR),
        Resource("EndpointSlice", "endpointslices", "/apis/discovery.k8s.io/v1/endpointslices",
                 label_selector=PROXY_SELECTOR),
        Resource("Node", "nodes", "/api/v1/nodes", namespaced=False, field_selector=f"metadata.name={node_name}"),
        Resource("ServiceCIDR", "servicecidrs", "/apis/networking.k8s.io/v1/servicecidrs", namespaced=False,
                 optional=True),
    ]


# -- configuration ----------------------------------------------------------------------------
def client_configuration(kubeconfig: str | None = None, env=None):
    """A ``kubernetes.client.Configuration`` and a description of where it came from.

    ``kubeconfig`` (the flag, else the config file's clientConnection.kubeconfig) wins;
    then the in-cluster service account (``KUBERNETES_SERVICE_HOST``); then ``$KUBECONFIG``
    or ``~/.kube/config``. Raises KubeConfigError if none is usable.
    """
    from kubernetes.client import Configuration
    from kubernetes.config import ConfigException
    from kubernetes.config.incluster_config import load_incluster_config
    from kubernetes.config.kube_config import load_kube_config

    env = os.environ if env is None else env
    cfg = Configuration()
    try:
        if kubeconfig:
            if not os.path.isfile(kubeconfig):
                raise KubeConfigError(f"kubeconfig {kubeconfig} does not exist")
            load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
            where = f"kubeconfig {kubeconfig}"
        elif env.get("KUBERNETES_SERVICE_HOST"):
            load_incluster_config(client_configuration=cfg)
            where = "in-cluster service account"
        else:
            path = env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            if not any(os.path.isfile(p) for p in path.split(os.pathsep) if p):
                raise KubeConfigError(
                    "no Kubernetes API configuration found (no --kubeconfig, no clientConnection.kubeconfig, "
                    f"no in-cluster service account, no {path})")
            load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
            where = f"kubeconfig {path}"
    except ConfigException as e:
        raise KubeConfigError(f"invalid Kubernetes API configuration: {e}") from None
    host = urlsplit(cfg.host).hostname or ""
    if host in ("127.0.0.1", "::1", "localhost"):
        # the client takes HTTP(S)_PROXY from the environment; no proxy can reach our loopback
        cfg.proxy = None
    return cfg, where


def api_client(cfg):
    """An ApiClient for the reflectors: kproxy's user agent, and urllib3 retries limited
    to connection failures (the reflectors back off themselves, and a stalled server must
    not be waited for four times)."""
    from kubernetes.client import ApiClient
    from urllib3.util import Retry

    cfg.retries = Retry(total=3, connect=3, read=1, status=0, other=0, redirect=3,
                        respect_retry_after_header=False, raise_on_status=False)
    client = ApiClient(cfg)
    client.user_agent = f"kproxy/{__version__}"
    return client


# -- the state writer -----------------------------------------------------------------------
class StateStore:
    """Writes reflected objects into ``app.state`` and asks the app for syncs."""

    def __init__(self, app, on_listed):
        self.app = app
        self.state = app.state
        self._on_listed = on_listed

    def keys(self, kind: str) -> set:
        s = self.state
        if kind == "Service":
            return set(s.services)
        if kind == "EndpointSlice":
            return set(s.slices)
        if kind == "Node":
            return {("", s.node.name)} if s.node is not None else set()
        return {("", name) for name in s.service_cidrs}

    def _current(self, kind: str, key):
        s = self.state
        if kind == "Service":
            return s.services.get(key)
        if kind == "EndpointSlice":
            return s.slices.get(key)
        if kind == "Node":
            return s.node if s.node is not None and s.node.name == key[1] else None
        return s.service_cidrs.get(key[1])

    def put(self, kind: str, key, obj: Service | EndpointSlice | Node | ServiceCIDR) -> bool:
        if kind == "Node" and obj.name != self.state.node_name:
            return False
        if self._current(kind, key) == obj:
            return False
        self.state.put(obj)
        return True

    def remove(self, kind: str, key) -> bool:
        if self._current(kind, key) is None:
            return False
        self.state.remove(kind, key[0], key[1])
        return True

    def changed(self, kind: str) -> None:
        if kind == "Node" and self.app.sources_synced.is_set():
            log.info("node %s changed (labels, podCIDRs or addresses): full sync", self.state.node_name)
        self.app.request_sync(full=kind == "Node")

    def listed(self, kind: str) -> None:
        self._on_listed(kind)


# -- metrics --------------------------------------------------------------------------------------
class StatusCollector:
    """Prometheus view of the reflectors' status (registered in ``app.metrics``)."""

    def __init__(self, source: "KubeSource"):
        self.source = source

    def describe(self):
        return []  # collected on demand only (no auto-describe at registration)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.source.status()
        fams = {
            "synced": GaugeMetricFamily("kproxy_kube_reflector_synced",
                                        "1 once the initial list of the resource is complete", labels=["resource"]),
            "watching": GaugeMetricFamily("kproxy_kube_reflector_watching", "1 while a watch stream is open",
                                          labels=["resource"]),
            "last_event": GaugeMetricFamily("kproxy_kube_reflector_last_event_timestamp_seconds",
                                            "Time of the last watch event or bookmark", labels=["resource"]),
            "events": CounterMetricFamily("kproxy_kube_reflector_events", "Watch events handled",
                                          labels=["resource"]),
            "lists": CounterMetricFamily("kproxy_kube_reflector_lists", "Complete lists (1 + relists)",
                                         labels=["resource"]),
            "errors": CounterMetricFamily("kproxy_kube_reflector_errors",
                                          "Failed requests and broken watch streams", labels=["resource"]),
            "skipped": CounterMetricFamily("kproxy_kube_reflector_skipped_objects",
                                           "Objects skipped as malformed", labels=["resource"]),
        }
        for name, r in st.items():
            fams["synced"].add_metric([name], float(r.synced))
            fams["watching"].add_metric([name], float(r.watching))
            fams["last_event"].add_metric([name], r.last_event or 0.0)
            for key in ("events", "lists", "errors", "skipped"):
                fams[key].add_metric([name], getattr(r, key))
        yield from fams.values()


# -- the source ---------------------------------------------------------------------------------
class KubeSource:
    """The reflectors of one kproxy process; ``start()``, ``stop()``, ``status()``."""

    def __init__(self, app, client, options: WatchOptions | None = None):
        self.app = app
        self.client = client
        self.options = options or WatchOptions()
        self._listed: set[str] = set()
        self._lock = threading.Lock()
        self._started = 0.0
        self._stopped = False
        store = StateStore(app, self._listed_one)
        self.reflectors = {r.kind: Reflector(client, r, store, self.options) for r in resources(app.config.node_name)}
        self._collector = StatusCollector(self)
        registry = getattr(app, "metrics", None)
        if registry is not None:
            registry.register(self._collector)

    @classmethod
    def from_kubeconfig(cls, app, kubeconfig: str | None = None, options: WatchOptions | None = None):
        cfg, where = client_configuration(kubeconfig)
        log.info("Kubernetes API %s (from %s)", cfg.host, where)
        return cls(app, api_client(cfg), options)

    def _listed_one(self, kind: str) -> None:
        with self._lock:
            self._listed.add(kind)
            ready = all(k in self._listed for k in REQUIRED) and not self.app.sources_synced.is_set()
        if ready:
            s = self.app.state
            log.info("initial lists complete after %.2fs: %d Services, %d EndpointSlices; programming starts",
                     time.monotonic() - self._started, len(s.services), len(s.slices))
            self.app.sources_synced.set()

    def start(self) -> "KubeSource":
        self._started = time.monotonic()
        for r in self.reflectors.values():
            r.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every reflector (idempotent); the state and the datapath stay as they are."""
        if self._stopped:
            return
        self._stopped = True
        for r in self.reflectors.values():
            r.stop()
        deadline = time.monotonic() + timeout
        for r in self.reflectors.values():
            r.join(max(0.0, deadline - time.monotonic()))
        self.client.close()
        registry = getattr(self.app, "metrics", None)
        if registry is not None:
            registry.unregister(self._collector)

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the initial lists that gate programming; False on timeout."""
        return self.app.sources_synced.wait(timeout)

    def wait_all_listed(self, timeout: float) -> bool:
        """Wait until every reflector (the Node and ServiceCIDRs too) has listed once or
        found its resource missing; False on timeout. Used by ``--once``."""
        deadline = time.monotonic() + timeout
        while not all(r.snapshot().synced for r in self.reflectors.values()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def status(self) -> dict[str, ReflectorStatus]:
        """A copy of every reflector's status, by resource name."""
        return {r.resource.name: r.snapshot() for r in self.reflectors.values()}

    def describe_pending(self) -> str:
        """Which gating lists are not complete yet, with their last error (for messages)."""
        out = []
        for kind in REQUIRED:
            st = self.reflectors[kind].snapshot()
            if not st.synced:
                out.append(st.resource + (f" (last error: {st.last_error})" if st.last_error else " (no answer yet)"))
        return ", ".join(out) or "none"
