"""Validated, immutable values for the objects kproxy proxies.

``from_api(kind, raw)`` turns an API object (a dict from YAML or JSON, or bytes) into
one of these values, or raises ``InvalidObject`` naming the object and the field. The
rules about which Services are proxied at all (headless, ExternalName, the
service-proxy-name label) live here too, because they are Kubernetes semantics, not a
datapath feature.
"""

from __future__ import annotations

import ipaddress
import re
import sys

import msgspec
from msgspec import Struct

from . import api_types as api

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800
PROTOCOLS = ("TCP", "UDP", "SCTP")


class InvalidObject(ValueError):
    """An API object kproxy cannot use; ``str()`` names the object and the field."""

    def __init__(self, kind: str, ref: str, field: str, problem: str):
        self.kind, self.ref, self.field, self.problem = kind, ref, field, problem
        super().__init__(f"{kind} {ref or '<unnamed>'}: {field}: {problem}")


# gc=False: these values hold only strings, numbers, and tuples and dicts of those, so
# they can never be part of a reference cycle; untracked, each is 16 bytes smaller and
# the collector does not walk 100k endpoints.
class ServicePort(Struct, frozen=True, gc=False):
    name: str
    protocol: str  # TCP, UDP or SCTP
    port: int
    node_port: int = 0


class LoadBalancerIngress(Struct, frozen=True, gc=False):
    ip: str
    ip_mode: str = ""  # "", "VIP" or "Proxy"


class Service(Struct, frozen=True, gc=False):
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[str, ...] = ()
    lb_ingress: tuple[LoadBalancerIngress, ...] = ()
    lb_source_ranges: tuple[str, ...] = ()
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 = no affinity
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def port_name(self, port: ServicePort) -> str:
        """kube-proxy's ServicePortName string, ``namespace/name:port``."""
        return f"{self.namespace}/{self.name}:{port.name}"

    def cluster_ips_of(self, version: int) -> tuple[str, ...]:
        """The ClusterIPs of IP ``version`` (4 or 6), canonical like every address here."""
        ips = self.cluster_ips
        if len(ips) == 1:  # the common case, without a generator (called per Service, family and plugin)
            return ips if (":" in ips[0]) == (version == 6) else ()
        return tuple(ip for ip in ips if (":" in ip) == (version == 6))


class Endpoint(Struct, frozen=True, gc=False):
    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: tuple[str, ...] | None = None
    node_hints: tuple[str, ...] | None = None


class EndpointPort(Struct, frozen=True, gc=False):
    name: str
    protocol: str
    port: int


class EndpointSlice(Struct, frozen=True, gc=False):
    namespace: str
    name: str
    service_name: str
    address_type: str  # IPv4 or IPv6 (FQDN slices are not kept)
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


class Node(Struct, frozen=True, gc=False):
    name: str
    labels: dict[str, str] = {}
    addresses: tuple[str, ...] = ()  # InternalIP first, then ExternalIP
    pod_cidrs: tuple[str, ...] = ()
    deleting: bool = False  # being deleted, or tainted ToBeDeletedByClusterAutoscaler

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")

    def primary_ip(self, version: int) -> str | None:
        return next((a for a in self.addresses if ipaddress.ip_address(a).version == version), None)


class ServiceCIDR(Struct, frozen=True, gc=False):
    name: str
    cidrs: tuple[str, ...]


class Ignored(Exception):
    """A valid object that kproxy deliberately does not proxy (reason in ``str()``)."""


# -- conversion ------------------------------------------------------------------------

_RAW = {
    "Service": api.ServiceObj,
    "EndpointSlice": api.EndpointSliceObj,
    "Node": api.NodeObj,
    "ServiceCIDR": api.ServiceCIDRObj,
}
KINDS = tuple(_RAW)


def _ref(meta: api.Meta) -> str:
    return f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name


# A canonical dotted quad (no leading zeros), which ipaddress would return unchanged:
# checked without building an address object, since 100k endpoints are checked at start.
_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def _intern(text: str) -> str:
    """One shared copy of strings that repeat across objects (namespaces, node and zone
    names, port names, protocols, types)."""
    return sys.intern(text) if text else text


_SHARED: dict = {}
_SHARED_MAX = 4096


def _share(value: tuple) -> tuple:
    """One shared copy of an immutable tuple of values that repeats across objects (most
    Services and slices have the same few ports). Bounded: forgotten when full."""
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def _ip(kind, ref, field, value) -> str:
    if type(value) is str and _IPV4.fullmatch(value):
        return value
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise InvalidObject(kind, ref, field, f"invalid IP address {value!r}") from None


def _port(kind, ref, field, value, allow_zero=False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 65535:
        raise InvalidObject(kind, ref, field, f"invalid port {value!r} (must be 1..65535)")
    return value


def _proto(kind, ref, field, value) -> str:
    if value not in PROTOCOLS:
        raise InvalidObject(kind, ref, field, f"unsupported protocol {value!r} (must be TCP, UDP or SCTP)")
    return sys.intern(value)


def decode_raw(kind: str, data):
    """Decode an object (dict, JSON bytes or str) into its raw API shape."""
    cls = _RAW.get(kind)
    if cls is None:
        raise InvalidObject(kind, "", "kind", f"unsupported kind (expected one of {', '.join(KINDS)})")
    try:
        if isinstance(data, (bytes, str)):
            return msgspec.json.decode(data, type=cls)
        return msgspec.convert(data, type=cls)
    except msgspec.ValidationError as e:
        ref = ""
        if isinstance(data, dict):
            md = data.get("metadata") or {}
            if isinstance(md, dict):
                ref = f"{md.get('namespace')}/{md.get('name')}" if md.get("namespace") else str(md.get("name", ""))
        msg = str(e)
        field = msg.split("at `$.", 1)[1].rstrip("`") if "at `$." in msg else "?"
        raise InvalidObject(kind, ref, field, msg.split(" - at ")[0]) from None


def service_from_raw(raw: api.ServiceObj) -> Service:
    m, s = raw.metadata, raw.spec
    ref = _ref(m)
    if not m.name or not m.namespace:
        raise InvalidObject("Service", ref, "metadata", "name and namespace are required")
    if PROXY_NAME_LABEL in m.labels:
        raise Ignored(f"Service {ref} has label {PROXY_NAME_LABEL}")
    if s.type == "ExternalName":
        raise Ignored(f"Service {ref} is of type ExternalName")
    if s.type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise InvalidObject("Service", ref, "spec.type", f"unknown type {s.type!r}")
    ips = s.cluster_ips or ([s.cluster_ip] if s.cluster_ip else [])
    if not ips or ips[0] == "None":
        raise Ignored(f"Service {ref} is headless or has no clusterIP")
    where = "spec.clusterIPs[{}]" if s.cluster_ips else "spec.clusterIP"  # the field the user wrote
    cluster_ips = tuple(_ip("Service", ref, where.format(i), a) for i, a in enumerate(ips))
    ports = []
    for i, p in enumerate(s.ports):
        ports.append(ServicePort(
            name=_intern(p.name),
            protocol=_proto("Service", ref, f"spec.ports[{i}].protocol", p.protocol),
            port=_port("Service", ref, f"spec.ports[{i}].port", p.port),
            node_port=_port("Service", ref, f"spec.ports[{i}].nodePort", p.node_port, allow_zero=True),
        ))
    names = [p.name for p in ports]
    if len(set((p.name, p.protocol) for p in ports)) != len(ports) or (len(ports) > 1 and "" in names):
        raise InvalidObject("Service", ref, "spec.ports", "port names must be unique and set when there are several ports")
    external = tuple(_ip("Service", ref, f"spec.externalIPs[{i}]", a) for i, a in enumerate(s.external_ips))
    ingress = []
    lb = raw.status.load_balancer
    for i, ing in enumerate(lb.ingress if lb else ()):
        if ing.ip:
            ingress.append(LoadBalancerIngress(_ip("Service", ref, f"status.loadBalancer.ingress[{i}].ip", ing.ip), ing.ip_mode))
    ranges = []
    for r in s.load_balancer_source_ranges:
        try:  # kube-proxy tolerates whitespace and ignores unparsable entries
            ranges.append(str(ipaddress.ip_network(r.strip(), strict=False)))
        except ValueError:
            pass
    timeout = 0
    if s.session_affinity == "ClientIP":
        cfg = s.session_affinity_config.client_ip if s.session_affinity_config else None
        timeout = (cfg.timeout_seconds if cfg and cfg.timeout_seconds else DEFAULT_AFFINITY_TIMEOUT)
        if not 1 <= timeout <= 86400:
            raise InvalidObject("Service", ref, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{timeout} is not in 1..86400")
    elif s.session_affinity != "None":
        raise InvalidObject("Service", ref, "spec.sessionAffinity", f"unknown value {s.session_affinity!r}")
    for field_name, value in (("externalTrafficPolicy", s.external_traffic_policy), ("internalTrafficPolicy", s.internal_traffic_policy)):
        if value not in ("Cluster", "Local"):
            raise InvalidObject("Service", ref, f"spec.{field_name}", f"must be Cluster or Local, got {value!r}")
    return Service(
        namespace=_intern(m.namespace), name=m.name, type=_intern(s.type), cluster_ips=cluster_ips,
        ports=_share(tuple(ports)),
        external_ips=external, lb_ingress=tuple(ingress), lb_source_ranges=tuple(ranges),
        affinity_timeout=timeout,
        external_policy_local=s.external_traffic_policy == "Local" and s.type in ("NodePort", "LoadBalancer"),
        internal_policy_local=s.internal_traffic_policy == "Local",
        health_check_node_port=_port("Service", ref, "spec.healthCheckNodePort", s.health_check_node_port, allow_zero=True),
        labels=dict(m.labels), annotations=dict(m.annotations),
    )


def _hints(names: list[api.HintName] | None) -> tuple[str, ...] | None:
    # with topology-aware routing every endpoint has hints, mostly the same few
    return None if names is None else _share(tuple(_intern(h.name) for h in names))


def slice_from_raw(raw: api.EndpointSliceObj) -> EndpointSlice:
    m = raw.metadata
    ref = _ref(m)
    if not m.name or not m.namespace:
        raise InvalidObject("EndpointSlice", ref, "metadata", "name and namespace are required")
    service = m.labels.get(SERVICE_NAME_LABEL)
    if not service:
        raise Ignored(f"EndpointSlice {ref} has no {SERVICE_NAME_LABEL} label")
    if raw.address_type not in ("IPv4", "IPv6"):
        raise Ignored(f"EndpointSlice {ref} has addressType {raw.address_type}")
    version = 4 if raw.address_type == "IPv4" else 6
    endpoints = []
    for i, e in enumerate(raw.endpoints):
        c = e.conditions
        hints = e.hints
        for j, a in enumerate(e.addresses[:1]):  # kube-proxy uses the first address only
            addr = _ip("EndpointSlice", ref, f"endpoints[{i}].addresses[{j}]", a)
            if (6 if ":" in addr else 4) != version:  # addr is canonical
                raise InvalidObject("EndpointSlice", ref, f"endpoints[{i}].addresses[{j}]", f"{a} is not an {raw.address_type} address")
            endpoints.append(Endpoint(
                ip=addr,
                ready=c.ready is not False, serving=c.serving is not False, terminating=c.terminating is True,
                node_name=_intern(e.node_name), zone=_intern(e.zone),
                zone_hints=_hints(hints.for_zones) if hints else None,
                node_hints=_hints(hints.for_nodes) if hints else None,
            ))
    ports = []
    for i, p in enumerate(raw.ports):
        if p.port is None:
            continue  # a port without a number applies to no Service port
        ports.append(EndpointPort(_intern(p.name), _proto("EndpointSlice", ref, f"ports[{i}].protocol", p.protocol),
                                  _port("EndpointSlice", ref, f"ports[{i}].port", p.port)))
    return EndpointSlice(_intern(m.namespace), m.name, service, _intern(raw.address_type), tuple(endpoints),
                         _share(tuple(ports)))


def node_from_raw(raw: api.NodeObj) -> Node:
    m = raw.metadata
    if not m.name:
        raise InvalidObject("Node", "", "metadata.name", "is required")
    order = {"InternalIP": 0, "ExternalIP": 1}
    addrs = sorted((a for a in raw.status.addresses if a.type in order), key=lambda a: order[a.type])
    cidrs = raw.spec.pod_cidrs or ([raw.spec.pod_cidr] if raw.spec.pod_cidr else [])
    for i, c in enumerate(cidrs):
        try:
            ipaddress.ip_network(c)
        except ValueError:
            raise InvalidObject("Node", m.name, f"spec.podCIDRs[{i}]", f"invalid CIDR {c!r}") from None
    deleting = m.deletion_timestamp is not None or any(t.key == "ToBeDeletedByClusterAutoscaler" for t in raw.spec.taints)
    return Node(
        name=m.name, labels=dict(m.labels),
        addresses=tuple(_ip("Node", m.name, f"status.addresses[{i}].address", a.address) for i, a in enumerate(addrs)),
        pod_cidrs=tuple(cidrs), deleting=deleting,
    )


def service_cidr_from_raw(raw: api.ServiceCIDRObj) -> ServiceCIDR:
    m = raw.metadata
    for i, c in enumerate(raw.spec.cidrs):
        try:
            ipaddress.ip_network(c)
        except ValueError:
            raise InvalidObject("ServiceCIDR", m.name, f"spec.cidrs[{i}]", f"invalid CIDR {c!r}") from None
    return ServiceCIDR(m.name, tuple(raw.spec.cidrs))


_CONVERT = {
    "Service": service_from_raw,
    "EndpointSlice": slice_from_raw,
    "Node": node_from_raw,
    "ServiceCIDR": service_cidr_from_raw,
}


def from_api(kind: str, data):
    """Decode and validate one API object of ``kind``; raises InvalidObject or Ignored."""
    raw = decode_raw(kind, data)  # first: an unknown kind is an InvalidObject, not a KeyError
    return _CONVERT[kind](raw)
