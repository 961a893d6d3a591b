"""The cluster state kproxy proxies: a store of validated objects and the joins on it.

Sources (manifest files, the Kubernetes API) write into a ``ClusterState``; each sync
reads a consistent ``snapshot()`` of it. ``service_endpoints`` joins a Service port with
the endpoints of its EndpointSlices exactly as kube-proxy does: by the slice's
``kubernetes.io/service-name`` label plus port name and protocol, one entry per address.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field

from msgspec import Struct

from .model import EndpointSlice, Node, Service, ServiceCIDR, ServicePort


class ServiceEndpoint(Struct, frozen=True, gc=False):
    """An endpoint of one Service port: its address, the port to DNAT to, and its state.

    Not tracked by the cyclic garbage collector (``gc=False``): it holds only strings,
    numbers and tuples of strings, so it can never be part of a reference cycle, and
    a sync makes one per endpoint."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: tuple[str, ...] | None = None
    node_hints: tuple[str, ...] | None = None

    @property
    def version(self) -> int:
        return 6 if ":" in self.ip else 4


def _address_key(ip: str):
    """Sort key of a canonical address: numeric order, IPv4 first."""
    return (1, socket.inet_pton(socket.AF_INET6, ip)) if ":" in ip else (0, socket.inet_pton(socket.AF_INET, ip))


@dataclass
class Changes:
    services: set  # keys (namespace, name) of Services whose Service or endpoints changed
    everything: bool  # the Node or the ServiceCIDRs changed: every Service is affected
    first_seen: list  # wall-clock times at which the changes were first seen
    service_events: int
    endpoint_events: int


@dataclass
class ClusterState:
    """Services, EndpointSlices, this node and the ServiceCIDRs, keyed by namespace/name."""

    node_name: str = ""
    services: dict[tuple[str, str], Service] = field(default_factory=dict)
    slices: dict[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    node: Node | None = None
    service_cidrs: dict[str, ServiceCIDR] = field(default_factory=dict)
    # slices grouped by (namespace, service name); kept in step by put/remove
    _by_service: dict[tuple[str, str], dict[str, EndpointSlice]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # what changed since the last take_changes(): Service keys, and whether anything
    # that affects every Service (this Node, the ServiceCIDRs) changed
    _changed: dict = field(default_factory=dict, repr=False, compare=False)  # key -> first seen (time.time)
    _changed_all: bool = field(default=False, repr=False, compare=False)
    _events: dict = field(default_factory=lambda: {"service": 0, "endpoint": 0}, repr=False, compare=False)
    _endpoint_cache: dict | None = field(default=None, repr=False, compare=False)  # set on snapshots

    # -- writing (sources) -------------------------------------------------------------
    def put(self, obj) -> None:
        with self._lock:
            if isinstance(obj, Service):
                if self.services.get(obj.key) != obj:
                    self.services[obj.key] = obj
                    self._mark(obj.key, "service")
            elif isinstance(obj, EndpointSlice):
                if self.slices.get(obj.key) != obj:
                    self._remove_slice(obj.key)
                    self.slices[obj.key] = obj
                    group = (obj.namespace, obj.service_name)
                    # groups are replaced, never changed in place, so snapshots may share them
                    self._by_service[group] = {**self._by_service.get(group, {}), obj.name: obj}
                    self._mark((obj.namespace, obj.service_name), "endpoint")
            elif isinstance(obj, Node):
                if obj.name == self.node_name and obj != self.node:
                    self.node = obj
                    self._changed_all = True
            elif isinstance(obj, ServiceCIDR):
                if self.service_cidrs.get(obj.name) != obj:
                    self.service_cidrs[obj.name] = obj
                    self._changed_all = True
            else:
                raise TypeError(f"cannot store {type(obj).__name__}")

    def remove(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            if kind == "Service":
                if self.services.pop((namespace, name), None) is not None:
                    self._mark((namespace, name), "service")
            elif kind == "EndpointSlice":
                self._remove_slice((namespace, name))
            elif kind == "Node":
                if name == self.node_name and self.node is not None:
                    self.node = None
                    self._changed_all = True
            elif kind == "ServiceCIDR":
                if self.service_cidrs.pop(name, None) is not None:
                    self._changed_all = True

    def _remove_slice(self, key):
        old = self.slices.pop(key, None)
        if old is not None:
            self._mark((old.namespace, old.service_name), "endpoint")
            key = (old.namespace, old.service_name)
            group = {n: sl for n, sl in self._by_service.get(key, {}).items() if n != old.name}
            if group:
                self._by_service[key] = group
            else:
                self._by_service.pop(key, None)

    def replace_all(self, other: "ClusterState") -> None:
        """Take over every object of ``other`` (a freshly loaded state), recording
        which Services changed."""
        with self._lock:
            for key in set(self.services) | set(other.services):
                if self.services.get(key) != other.services.get(key):
                    self._mark(key, "service")
            for key in set(self._by_service) | set(other._by_service):
                if self._by_service.get(key) != other._by_service.get(key):
                    self._mark(key, "endpoint")
            if self.node != other.node or self.service_cidrs != other.service_cidrs:
                self._changed_all = True
            self.services, self.slices = other.services, other.slices
            self.node, self.service_cidrs = other.node, other.service_cidrs
            self._by_service = other._by_service

    def _mark(self, key, kind: str) -> None:
        self._changed.setdefault(key, time.time())
        self._events[kind] += 1

    def take_changes(self) -> "Changes":
        """What changed since the last call (and forget it)."""
        with self._lock:
            out = Changes(set(self._changed), self._changed_all, list(self._changed.values()),
                          self._events["service"], self._events["endpoint"])
            self._changed, self._changed_all = {}, False
            self._events = {"service": 0, "endpoint": 0}
            return out

    def pending(self) -> tuple[int, int]:
        """(Service events, EndpointSlice events) not yet taken by a sync."""
        with self._lock:
            return self._events["service"], self._events["endpoint"]


    def snapshot(self) -> "ClusterState":
        """A consistent copy for one sync; sources may keep writing to the original."""
        with self._lock:
            return ClusterState(
                node_name=self.node_name, services=dict(self.services), slices=dict(self.slices),
                node=self.node, service_cidrs=dict(self.service_cidrs),
                _by_service=dict(self._by_service), _endpoint_cache={},
            )

    def forget_memo(self) -> None:
        """Drop the endpoint joins memoised on this snapshot (its sync is over; the
        joins are computed again if asked for)."""
        if self._endpoint_cache is not None:
            self._endpoint_cache = {}

    # -- reading (plugins) -------------------------------------------------------------
    def service_endpoints(self, service: Service, port: ServicePort, version: int | None = None) -> list[ServiceEndpoint]:
        """The endpoints of one Service port (of IP ``version`` if given), duplicates
        across slices counted once (see ``_service_endpoints``). Memoised
        per state object: a snapshot is read by several plugins in one sync."""
        if self._endpoint_cache is None:  # a live store, still being written to
            return self._service_endpoints(service, port, version)
        key = (service.key, port.name, port.protocol, version)  # all the join depends on
        found = self._endpoint_cache.get(key)
        if found is None:
            found = self._endpoint_cache[key] = self._service_endpoints(service, port, version)
        return found

    def _service_endpoints(self, service: Service, port: ServicePort, version: int | None = None) -> list[ServiceEndpoint]:
        """The endpoints of one Service port (of IP ``version`` if given), duplicates
        across slices counted once: like kube-proxy, a non-terminating copy wins over a
        terminating one, otherwise the first seen. Sorted by address (numerically, IPv4
        first), then port."""
        group = self._by_service.get(service.key)
        if not group:
            return []
        address_type = None if version is None else f"IPv{version}"
        name, protocol = port.name, port.protocol
        found: dict[tuple[str, int], ServiceEndpoint] = {}  # by address and port, as in kube-proxy
        get = found.get
        for sl in group.values():
            if address_type is not None and sl.address_type != address_type:
                continue
            for p in sl.ports:
                if p.name == name and p.protocol == protocol:
                    number = p.port
                    break
            else:
                continue
            for e in sl.endpoints:
                key = (e.ip, number)
                prev = get(key)
                if prev is not None and not (prev.terminating and not e.terminating):
                    continue
                found[key] = ServiceEndpoint(e.ip, number, e.ready, e.serving, e.terminating, e.node_name,
                                             e.zone, e.zone_hints, e.node_hints)
        if len(found) < 2:
            return list(found.values())
        if address_type is not None:  # one family: its packed addresses sort numerically
            af, pton = (socket.AF_INET if version == 4 else socket.AF_INET6), socket.inet_pton
            decorated = [(pton(af, ip), number, e) for (ip, number), e in found.items()]
        else:
            decorated = [(_address_key(ip), number, e) for (ip, number), e in found.items()]
        decorated.sort()  # (address, port) pairs are unique: the endpoints are never compared
        return [d[2] for d in decorated]

    def cidrs(self, version: int) -> list[str]:
        """The ServiceCIDRs of one IP version."""
        out = []
        for sc in self.service_cidrs.values():
            out.extend(c for c in sc.cidrs if ipaddress.ip_network(c).version == version)
        return sorted(set(out))
