"""healthcheck-nodeports: kube-proxy's per-Service health check servers.

For every LoadBalancer Service with ``externalTrafficPolicy: Local`` and a
``healthCheckNodePort``, an HTTP server listens on that port on each node address that
accepts NodePorts (``nodePortAddresses``; ``primary`` means the Node's primary IPs) or
on every address when ``nodePortAddresses`` matches everything. A GET answers 200 when
this node has ready endpoints of the Service (terminating ones do not count) and kproxy
itself is healthy, else 503, with kube-proxy's JSON body::

    {"service": {"namespace": NS, "name": NAME}, "localEndpoints": N, "serviceProxyHealthy": BOOL}

and headers ``Content-Type: application/json``, ``X-Content-Type-Options: nosniff``,
``X-Load-Balancing-Endpoint-Weight: N``. kproxy is healthy as ``/healthz`` says
(``app.health`` when the core provides it), else when no sync has been failing for
``2 × syncPeriod`` or longer.

Servers are reconciled after each successful sync (only the changed Services on a
partial sync, every Service on a full one) and their counts updated; a port that cannot
be bound is logged (kube-proxy's event ``FailedToStartServiceHealthcheck``) and retried
at the next sync. Each server is a ``ThreadingHTTPServer`` in a daemon thread; all stop
when kproxy stops.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kproxy import hookimpl

from .service_maps.nodeport_addresses import nodeport_ips

log = logging.getLogger("kproxy.healthcheck-nodeports")

POLL_INTERVAL = 0.2  # how often a server looks for a stop request (bounds how long a stop takes)



def bind_addresses(ctx) -> list[str]:
    """Where the servers listen: the NodePort addresses of both families, or the
    wildcard address of a family whose nodePortAddresses match everything."""
    out: list[str] = []
    for version, wildcard in ((4, "0.0.0.0"), (6, "::")):
        ips = nodeport_ips(ctx, version)
        out.extend([wildcard] if ips is None else ips)
    return out


def local_ready(svc, state, node_name: str) -> int:
    """kube-proxy's LocalReadyEndpoints: distinct ready endpoint IPs on this node."""
    ips = {e.ip for port in svc.ports for e in state.service_endpoints(svc, port)
           if e.ready and node_name and e.node_name == node_name}
    return len(ips)


@dataclass
class Check:
    """One Service's health check: its port, its count and its servers by address."""

    namespace: str
    name: str
    port: int
    count: int = 0
    servers: dict = field(default_factory=dict)  # address -> _Server


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        check, healthy = self.server.check, self.server.healthy()
        count = check.count
        body = json.dumps({"service": {"namespace": check.namespace, "name": check.name},
                           "localEndpoints": count, "serviceProxyHealthy": healthy}, indent="\t").encode()
        self.send_response(200 if count > 0 and healthy else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Load-Balancing-Endpoint-Weight", str(count))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, port: int, check: Check, healthy):
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.check, self.healthy = check, healthy
        super().__init__((address, port), _Handler)  # binds, or raises OSError

    def server_bind(self):
        if self.address_family == socket.AF_INET6:  # "::" must not take the IPv4 port too
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no reverse DNS lookup
        self.server_name, self.server_port = self.server_address[:2]


def _stop(servers) -> None:
    """Stop servers in parallel (each ``shutdown`` waits up to one poll interval)."""
    threads = [threading.Thread(target=s.shutdown, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t, s in zip(threads, servers):
        t.join()
        s.server_close()


class HealthChecks:
    """The health check servers of one kproxy process."""

    def __init__(self, app, addresses=None):
        self.app = app
        self.addresses_of = addresses  # ctx -> addresses (default: bind_addresses)
        self.addresses: list[str] | None = None
        self.checks: dict[tuple, Check] = {}
        self.retry: set[tuple] = set()  # Services with a server that could not be started
        self.failing_since: float | None = None

    def healthy(self) -> bool:
        health = getattr(self.app, "health", None)
        if health is not None and callable(getattr(health, "healthy", None)):
            return bool(health.healthy())
        return self.failing_since is None or time.monotonic() - self.failing_since < 2 * self.app.config.sync_period

    def observe(self, result) -> None:
        if result.ok:
            self.failing_since = None
        elif self.failing_since is None:
            self.failing_since = time.monotonic()

    def reconcile(self, ctx) -> None:
        state = ctx.state
        if ctx.full or self.addresses is None:
            self.addresses = (self.addresses_of or bind_addresses)(ctx)
        keys = set(state.services) | set(self.checks) if ctx.full else set(ctx.changed or ()) | self.retry
        stop, start = [], []
        for key in keys:
            svc = state.services.get(key)
            check = self.checks.get(key)
            port = svc.health_check_node_port if svc is not None and svc.type == "LoadBalancer" \
                and svc.external_policy_local else 0
            if check is not None and check.port != port:
                stop.extend(check.servers.values())
                del self.checks[key]
                check = None
            if not port:
                continue
            if check is None:
                check = self.checks[key] = Check(svc.namespace, svc.name, port)
            check.count = local_ready(svc, state, ctx.config.node_name)
            for addr in [a for a in check.servers if a not in self.addresses]:
                stop.append(check.servers.pop(addr))
            start.extend((key, check, a) for a in self.addresses if a not in check.servers)
            if not self.addresses:
                log.warning("no address to serve the health check of Service %s/%s on (nodePortAddresses %s)",
                            svc.namespace, svc.name, ",".join(ctx.config.node_port_addresses))
        _stop(stop)
        self.retry -= keys
        for key, check, addr in start:
            try:
                server = _Server(addr, check.port, check, self.healthy)
            except OSError as e:
                log.error("FailedToStartServiceHealthcheck: Service %s/%s: cannot listen on %s port %d: %s "
                          "(retried at the next sync)", check.namespace, check.name, addr, check.port, e)
                self.retry.add(key)
                continue
            check.servers[addr] = server
            threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,), name=f"healthcheck-{check.port}",
                             daemon=True).start()

    def stop_all(self) -> None:
        _stop([s for c in self.checks.values() for s in c.servers.values()])
        self.checks.clear()
        self.retry.clear()


@hookimpl
def kproxy_configure(app):
    """Prepare this app's (still empty) set of health check servers."""
    app.plugin_data[__name__] = HealthChecks(app)


@hookimpl
def kproxy_post_apply(ctx, result):
    """Track kproxy's health; after a successful sync start and stop servers as the
    Services say and update the local endpoint counts."""
    checks = ctx.app.plugin_data.get(__name__)
    if checks is None:
        return
    checks.observe(result)
    if result.ok:
        checks.reconcile(ctx)


@hookimpl
def kproxy_unconfigure(app):
    """Stop every health check server."""
    checks = app.plugin_data.pop(__name__, None)
    if checks is not None:
        checks.stop_all()
