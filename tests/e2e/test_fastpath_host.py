"""fastpath on a kernel without flowtables (this host): the probe disables it, kproxy
still programs everything else and exits 0, and ClusterIPs work.

The offload itself is proven in a kernel with flowtables by tests/vm/test_fastpath_vm.py.
"""

from __future__ import annotations

import pytest

from objects import answered_by, endpoint_slice, service

WEB = "172.30.0.10"


def _host_has_flowtables(cluster) -> bool:
    proc = cluster.node.run(["nft", "-f", "-"], check=False, input=(
        "add table inet fastpath-host-check\n"
        "add flowtable inet fastpath-host-check f { hook ingress priority filter ; }\n"
        "delete table inet fastpath-host-check\n"))
    return proc.returncode == 0


def test_probe_disables_fastpath_and_the_rest_works(clean):
    if _host_has_flowtables(clean):
        pytest.skip("this kernel has flowtables; the VM tests cover that case")
    objs = [service("web", WEB, [("http", "TCP", 80)]),
            endpoint_slice("web", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)])]
    proc = clean.sync(objs, "--plugin", "fastpath")  # raises unless exit status 0
    warnings = [line for line in proc.stderr.splitlines() if "fastpath disabled" in line]
    assert len(warnings) == 1, proc.stderr
    assert "CONFIG_NF_FLOW_TABLE" in warnings[0] and "nf_flow_table" in warnings[0], warnings[0]
    ruleset = clean.ruleset()
    assert "kproxy-fastpath" not in ruleset  # neither the table nor the probe's scratch table
    assert "flowtable" not in ruleset
    assert "table ip kproxy" in ruleset
    counts = answered_by(clean.client.probe(WEB, 80, "tcp", count=20))
    assert set(counts) == {"pod-a", "pod-b"}, counts


def test_threshold_zero_on_this_host_is_quiet(clean):
    objs = [service("web", WEB, [("http", "TCP", 80)]),
            endpoint_slice("web", ["10.0.1.2"], [("http", "TCP", 8080)])]
    proc = clean.sync(objs, "--plugin", "fastpath", "--fastpath-packet-threshold", "0")
    assert "fastpath disabled" not in proc.stderr  # no probe when offload is off
    assert "kproxy-fastpath" not in clean.ruleset()
    assert all(r.ok for r in clean.client.probe(WEB, 80, "tcp", count=3))
