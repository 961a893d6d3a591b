"""Synthetic cluster states for benchmarks: N Services × M endpoints."""

from __future__ import annotations

from kproxy.model import EndpointSlice, Endpoint, EndpointPort, Service, ServicePort
from kproxy.state import ClusterState

NODE = "node-1"


def cluster_ip(i: int) -> str:
    return f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}"


def endpoint_ip(i: int, e: int) -> str:
    n = i * 64 + e
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def service(i: int) -> Service:
    return Service(namespace="bench", name=f"svc-{i}", type="ClusterIP", cluster_ips=(cluster_ip(i),),
                   ports=(ServicePort("http", "TCP", 80),))


def endpoint_slice(i: int, m: int, generation: int = 0) -> EndpointSlice:
    # endpoints spread over 10 nodes, as in a real cluster (this node is node-1)
    eps = tuple(Endpoint(endpoint_ip(i, (e + generation) % 64), node_name=f"node-{(i + e) % 10}") for e in range(m))
    return EndpointSlice("bench", f"svc-{i}-abc", f"svc-{i}", "IPv4", eps, (EndpointPort("http", "TCP", 8080),))


def build(n: int, m: int) -> ClusterState:
    state = ClusterState(node_name=NODE)
    for i in range(n):
        state.put(service(i))
        state.put(endpoint_slice(i, m))
    state.take_changes()
    return state
