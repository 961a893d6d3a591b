"""kube-proxy's ``kubeproxy_sync_proxy_rules_no_local_endpoints_total`` for service-maps.

A gauge per IP family and traffic policy (``internal``, ``external``): the Service ports
whose traffic policy of that kind is Local, that have usable endpoints, but none on this
node, so that such traffic is dropped here. As in kube-proxy, it is recounted by every
successful sync; a partial sync recounts only the Services it rendered and keeps the
counts of the others.
"""

from __future__ import annotations

from prometheus_client import Gauge

POLICIES = ("internal", "external")
FAMILY_LABEL = {4: "IPv4", 6: "IPv6"}


class NoLocalEndpoints:
    def __init__(self, registry):
        self.gauge = Gauge("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                           "Number of services with a Local traffic policy and no endpoints",
                           ["ip_family", "traffic_policy"], registry=registry)
        self.counts: dict[tuple, list[int]] = {}  # (IP version, Service key) -> [internal, external], non-zero only
        self._publish()

    def update(self, rendered: dict[tuple, list[int]], full: bool, changed) -> None:
        """Take the counts of a successful sync: ``rendered`` holds the non-zero counts of
        the Services it rendered (every Service on a full sync, else those in ``changed``)."""
        if full:
            self.counts = dict(rendered)
        else:
            for key in changed:
                for version in FAMILY_LABEL:
                    self.counts.pop((version, key), None)
            self.counts.update(rendered)
        self._publish()

    def _publish(self) -> None:
        totals = {(version, policy): 0 for version in FAMILY_LABEL for policy in POLICIES}
        for (version, _), per_policy in self.counts.items():
            for policy, n in zip(POLICIES, per_policy):
                totals[(version, policy)] += n
        for (version, policy), n in totals.items():
            self.gauge.labels(FAMILY_LABEL[version], policy).set(n)
