"""Which endpoints of a Service port receive traffic, with kube-proxy's rules.

- Cluster policy: ready endpoints, filtered by topology hints when they are usable; when
  no endpoint is ready, serving+terminating endpoints (without topology).
- Local policy: ready endpoints on this node; when none, serving+terminating ones on it.
- Endpoints neither ready nor serving+terminating are never used.
"""

from __future__ import annotations

from typing import NamedTuple

from .model import Service
from .state import ServiceEndpoint


class Categorized(NamedTuple):
    """The endpoints of one Service port by use (a named tuple: a sync makes one per
    Service port and family)."""

    cluster: tuple[ServiceEndpoint, ...]  # for Cluster traffic policy
    local: tuple[ServiceEndpoint, ...]  # for Local traffic policy
    has_any: bool  # a usable endpoint exists anywhere (decides REJECT)

    def for_internal(self, service: Service) -> tuple[ServiceEndpoint, ...]:
        return self.local if service.internal_policy_local else self.cluster

    def for_external(self, service: Service) -> tuple[ServiceEndpoint, ...]:
        return self.local if service.external_policy_local else self.cluster


def _topology_filter(ready: list[ServiceEndpoint], node_name: str, zone: str) -> list[ServiceEndpoint]:
    # an endpoint without hints (None, or an empty list) makes that kind of hint unusable
    if ready and all(e.node_hints for e in ready) and any(node_name in e.node_hints for e in ready):
        return [e for e in ready if node_name in e.node_hints]
    if zone and ready and all(e.zone_hints for e in ready) and any(zone in e.zone_hints for e in ready):
        return [e for e in ready if zone in e.zone_hints]
    return ready


_NONE = Categorized((), (), False)


def categorize(endpoints: list[ServiceEndpoint], node_name: str, zone: str = "") -> Categorized:
    """Sort the endpoints of a Service port into those used for Cluster and for Local
    traffic policy (see the module docstring)."""
    if not endpoints:
        return _NONE
    ready = [e for e in endpoints if e.ready]
    if len(ready) == len(endpoints) and not any(e.node_hints or e.zone_hints for e in ready):
        # the common case, in a third of the time: every endpoint ready, no topology hints
        local = tuple([e for e in ready if e.node_name == node_name]) if node_name else ()
        return Categorized(tuple(ready), local, True)
    fallback = [e for e in endpoints if e.serving and e.terminating]
    cluster = _topology_filter(ready, node_name, zone) if ready else fallback
    local_ready = [e for e in ready if e.node_name == node_name and node_name]
    local = local_ready or [e for e in fallback if e.node_name == node_name and node_name]
    return Categorized(tuple(cluster), tuple(local), bool(ready or fallback))
