"""The shapes of the Kubernetes API objects kproxy reads, as msgspec structs.

Only the fields kproxy uses are declared; everything else in an object is skipped while
decoding, which keeps 100k endpoints cheap (see shared notes: msgspec decodes them in a
fraction of the time and memory of the kubernetes package's model classes). These raw
shapes are turned into validated model values by ``kproxy.model``.
"""

from __future__ import annotations

from msgspec import Struct, field


class Meta(Struct, rename="camel", frozen=True):
    name: str = ""
    namespace: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    resource_version: str = ""
    deletion_timestamp: str | None = None


class ServicePortSpec(Struct, rename="camel", frozen=True):
    name: str = ""
    protocol: str = "TCP"
    port: int = 0
    node_port: int = 0


class ClientIPConfig(Struct, rename="camel", frozen=True):
    timeout_seconds: int | None = None


class SessionAffinityConfig(Struct, frozen=True):
    client_ip: ClientIPConfig | None = field(default=None, name="clientIP")


class ServiceSpec(Struct, rename="camel", frozen=True):
    type: str = "ClusterIP"
    cluster_ip: str = field(default="", name="clusterIP")
    cluster_ips: list[str] = field(default_factory=list, name="clusterIPs")
    ports: list[ServicePortSpec] = []
    external_ips: list[str] = field(default_factory=list, name="externalIPs")
    session_affinity: str = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    health_check_node_port: int = 0
    load_balancer_source_ranges: list[str] = []
    ip_families: list[str] = []


class LoadBalancerIngressSpec(Struct, rename="camel", frozen=True):
    ip: str = ""
    hostname: str = ""
    ip_mode: str = ""


class LoadBalancerStatus(Struct, frozen=True):
    ingress: list[LoadBalancerIngressSpec] = []


class ServiceStatus(Struct, rename="camel", frozen=True):
    load_balancer: LoadBalancerStatus | None = None


class ServiceObj(Struct, rename="camel", frozen=True):
    metadata: Meta = Meta()
    spec: ServiceSpec = ServiceSpec()
    status: ServiceStatus = ServiceStatus()
    kind: str = "Service"


class Conditions(Struct, frozen=True):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class HintName(Struct, frozen=True):
    name: str = ""


class Hints(Struct, rename="camel", frozen=True):
    for_zones: list[HintName] | None = None
    for_nodes: list[HintName] | None = None


class EndpointSpec(Struct, rename="camel", frozen=True):
    addresses: list[str] = []
    conditions: Conditions = Conditions()
    node_name: str = ""
    zone: str = ""
    hints: Hints | None = None


class EndpointPortSpec(Struct, frozen=True):
    name: str = ""
    protocol: str = "TCP"
    port: int | None = None


class EndpointSliceObj(Struct, rename="camel", frozen=True):
    metadata: Meta = Meta()
    address_type: str = "IPv4"
    endpoints: list[EndpointSpec] = []
    ports: list[EndpointPortSpec] = []
    kind: str = "EndpointSlice"


class NodeAddress(Struct, frozen=True):
    type: str = ""
    address: str = ""


class Taint(Struct, frozen=True):
    key: str = ""
    effect: str = ""


class NodeSpec(Struct, frozen=True):
    pod_cidr: str = field(default="", name="podCIDR")
    pod_cidrs: list[str] = field(default_factory=list, name="podCIDRs")
    taints: list[Taint] = []


class NodeStatus(Struct, frozen=True):
    addresses: list[NodeAddress] = []


class NodeObj(Struct, frozen=True):
    metadata: Meta = Meta()
    spec: NodeSpec = NodeSpec()
    status: NodeStatus = NodeStatus()
    kind: str = "Node"


class ServiceCIDRSpec(Struct, frozen=True):
    cidrs: list[str] = []


class ServiceCIDRObj(Struct, frozen=True):
    metadata: Meta = Meta()
    spec: ServiceCIDRSpec = ServiceCIDRSpec()
    kind: str = "ServiceCIDR"
