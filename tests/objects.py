"""Builders of Kubernetes manifests for tests, and a summary of probe results."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

NODE = "node-1"


def service(name, cluster_ip, ports, ns="demo", **spec):
    """A v1 Service manifest; ports are (name, protocol, port) tuples."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": cluster_ip, "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports], **spec}}


def endpoint_slice(svc, ips, ports, ns="demo", name=None, ready=True, node=NODE, address_type="IPv4"):
    """An EndpointSlice manifest for Service ``svc``; ports are (name, protocol, port)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name or f"{svc}-slice", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": address_type,
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "nodeName": node} for ip in ips]}


def write_manifests(path: Path, objects) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.yaml"):
        old.unlink()
    (path / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    return path


def answered_by(results) -> Counter:
    """How many attempts each server answered, plus the failures by outcome."""
    return Counter(r.name if r.ok else r.outcome for r in results)
