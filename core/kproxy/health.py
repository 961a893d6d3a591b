"""/healthz and /livez with kube-proxy's semantics, and the HTTP servers for them and
for /metrics.

kproxy is unhealthy when a change has been waiting to be programmed for longer than
``2 × syncPeriod`` (a stuck or failing sync loop). ``/healthz`` is also 503 while the
Node is being deleted or tainted ToBeDeletedByClusterAutoscaler, so load balancers
drain it; ``/livez`` only reports the staleness.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("kproxy.health")


def _iso(t: float | None) -> str:
    return datetime.fromtimestamp(t or 0, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ProxyHealth:
    """Tracks queued and completed updates (kube-proxy's ProxyHealthServer logic)."""

    def __init__(self, timeout: float, clock=time.time):
        self.timeout = timeout
        self.clock = clock
        self.last_updated: float | None = None
        self.oldest_pending: float | None = None
        self._lock = threading.Lock()

    def queued(self) -> None:
        with self._lock:
            if self.oldest_pending is None:
                self.oldest_pending = self.clock()

    def updated(self) -> None:
        with self._lock:
            self.oldest_pending = None
            self.last_updated = self.clock()

    def healthy(self) -> bool:
        with self._lock:
            return self.oldest_pending is None or self.clock() - self.oldest_pending < self.timeout

    def body(self, node_eligible: bool | None) -> tuple[int, dict]:
        now = self.clock()
        ok = self.healthy()
        last = now if ok else self.last_updated
        status = {"lastUpdated": _iso(last), "healthy": ok}
        body = {"lastUpdated": _iso(last), "currentTime": _iso(now), "healthy": ok,
                "status": {"IPv4": dict(status), "IPv6": dict(status)}}
        if node_eligible is not None:
            body["nodeEligible"] = node_eligible
            ok = ok and node_eligible
        return (200 if ok else 503), body


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def _serve(address: str, app, name: str):
    host, _, port = address.rpartition(":")
    server = make_server(host.strip("[]"), int(port), app, ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return server


class Servers:
    """The metrics server (``metricsBindAddress``) and health server (``healthzBindAddress``)."""

    def __init__(self, app):
        self.app = app
        reg = app.metrics
        self.healthz_total = Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=reg)
        self.livez_total = Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=reg)
        self.servers = []
        self._metrics_app = make_wsgi_app(reg)

    def _node_eligible(self) -> bool:
        node = self.app.state.node
        return not (node is not None and node.deleting)

    def health_app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/livez"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"404 page not found\n"]
        code, body = self.app.health.body(self._node_eligible() if path == "/healthz" else None)
        (self.healthz_total if path == "/healthz" else self.livez_total).labels(str(code)).inc()
        start_response(f"{code} {'OK' if code == 200 else 'Service Unavailable'}",
                       [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")])
        return [json.dumps(body).encode()]

    def metrics_app(self, environ, start_response):
        if environ.get("PATH_INFO") == "/proxyMode":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"nftables"]
        return self._metrics_app(environ, start_response)

    def start(self) -> None:
        cfg = self.app.config
        for address, wsgi, name in ((cfg.metrics_bind_address, self.metrics_app, "metrics"),
                                    (cfg.healthz_bind_address, self.health_app, "healthz")):
            if not address or address.endswith(":0"):
                continue
            try:
                self.servers.append(_serve(address, wsgi, name))
                log.info("%s server listening on %s", name, address)
            except OSError as e:
                log.error("cannot start the %s server on %s: %s", name, address, e)

    def stop(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()
        self.servers = []
