"""Builders of Kubernetes manifests for tests, and a summary of probe results."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

NODE = "node-1"


def _service_port(port):
    name, proto, number, *node_port = port
    out = {"name": name, "protocol": proto, "port": number}
    if node_port and node_port[0]:
        out["nodePort"] = node_port[0]
    return out


def service(name, cluster_ip, ports, ns="demo", labels=None, status=None, **spec):
    """A v1 Service manifest.

    ``ports`` are (name, protocol, port) or (name, protocol, port, nodePort) tuples;
    ``cluster_ip`` is one address ("None" for headless) or a list (written as
    ``clusterIPs``); ``status`` is the Service status (see ``lb_status``); any other
    keyword is a spec field by its API name (``type``, ``externalIPs``, ...).
    """
    meta = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = dict(labels)
    ips = {"clusterIPs": list(cluster_ip)} if isinstance(cluster_ip, (list, tuple)) else {"clusterIP": cluster_ip}
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
           "spec": {**ips, "ports": [_service_port(p) for p in ports], **spec}}
    if status:
        obj["status"] = status
    return obj


def lb_status(*ips, ip_mode=None):
    """A Service status with one load-balancer ingress per IP (``ip_mode``: VIP, Proxy)."""
    return {"loadBalancer": {"ingress": [{"ip": ip, **({"ipMode": ip_mode} if ip_mode else {})} for ip in ips]}}


def endpoint(ip, ready=True, serving=None, terminating=None, node=NODE, zone=None, for_zones=None, for_nodes=None):
    """One EndpointSlice endpoint; ``None`` leaves a condition (or the nodeName) unset.

    ``for_zones`` / ``for_nodes`` are lists of names written as topology hints.
    """
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None}
    ep = {"addresses": [ip], "conditions": conditions}
    if node is not None:
        ep["nodeName"] = node
    if zone is not None:
        ep["zone"] = zone
    hints = {}
    if for_zones is not None:
        hints["forZones"] = [{"name": z} for z in for_zones]
    if for_nodes is not None:
        hints["forNodes"] = [{"name": n} for n in for_nodes]
    if hints:
        ep["hints"] = hints
    return ep


def endpoint_slice(svc, ips, ports, ns="demo", name=None, ready=True, node=NODE, address_type="IPv4", labels=None):
    """An EndpointSlice manifest for Service ``svc``; ports are (name, protocol, port).

    ``ips`` items are addresses (with the given ``ready`` and ``node``) or endpoint
    dicts made by ``endpoint()``.
    """
    meta_labels = {"kubernetes.io/service-name": svc, **(labels or {})}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-slice", "namespace": ns, "labels": meta_labels},
            "addressType": address_type,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
            "endpoints": [ip if isinstance(ip, dict) else {"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node}
                          for ip in ips]}


def node(name=NODE, addresses=(), zone=None, pod_cidrs=(), labels=None):
    """A v1 Node manifest; ``addresses`` are InternalIP addresses (or (type, address) pairs)."""
    node_labels = dict(labels or {})
    if zone is not None:
        node_labels["topology.kubernetes.io/zone"] = zone
    addrs = [{"type": a[0], "address": a[1]} if isinstance(a, tuple) else {"type": "InternalIP", "address": a}
             for a in addresses]
    obj = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": node_labels},
           "spec": {}, "status": {"addresses": addrs}}
    if pod_cidrs:
        obj["spec"] = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
    return obj


def service_cidr(name, *cidrs):
    """A networking.k8s.io/v1 ServiceCIDR manifest."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": name},
            "spec": {"cidrs": list(cidrs)}}


def write_manifests(path: Path, objects) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.yaml"):
        old.unlink()
    (path / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    return path


def answered_by(results) -> Counter:
    """How many attempts each server answered, plus the failures by outcome."""
    return Counter(r.name if r.ok else r.outcome for r in results)


def answered_at(results) -> Counter:
    """How many attempts each endpoint address answered (the address the server saw the
    connection arrive on, i.e. the DNAT target), plus the failures by outcome."""
    return Counter(r.local if r.ok else r.outcome for r in results)
