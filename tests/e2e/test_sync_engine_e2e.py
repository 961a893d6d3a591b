"""The long-running sync engine with real nft: restarts without disruption, failures
that keep the previous rules, metrics and health over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from objects import answered_by, endpoint_slice, service, write_manifests

WEB = "172.30.0.10"

# A client that opens (and closes) TCP connections for SECONDS and prints the outcomes.
LOOP_CLIENT = r"""
import json, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
errors = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.recv(200)
        ok += 1
    except OSError as e:
        failed += 1
        errors.append(repr(e))
    time.sleep(0.005)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""

FETCH = r"""
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=3)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""

NFT_WRAPPER = """#!/bin/sh
# fails every transaction while the flag file exists (listing still works)
if [ -e "{flag}" ] && [ "$1" = "-f" ]; then echo "/dev/stdin:1:1-3: Error: injected failure" >&2; exit 1; fi
exec {nft} "$@"
"""


def objects(endpoints):
    return [service("web", WEB, [("http", "TCP", 80)]),
            endpoint_slice("web", list(endpoints), [("http", "TCP", 8080)])]


def wait_for(pred, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def fetch(cluster, url):
    out = cluster.node.run([sys.executable, "-c", FETCH, url], check=False).stdout
    code, _, body = out.partition("\n")
    return int(code or 0), body


def config(cluster, name, **nftables):
    path = cluster.tmp / name
    path.write_text(yaml.safe_dump({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "hostnameOverride": "node-1", "clusterCIDR": "10.0.0.0/16",
        "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
        "nftables": {"minSyncPeriod": "200ms", "syncPeriod": "2s", **nftables}}))
    return path


def test_restart_keeps_connections_flowing(clean):
    manifests = write_manifests(clean.tmp / "restart", objects(["10.0.1.2", "10.0.2.2"]))
    cfg = config(clean, "restart.yaml")
    with clean.run_kproxy("--config", cfg, "--manifests", manifests) as (first, _):
        wait_for(lambda: WEB in clean.ruleset(), what="first rules")
        loop = clean.client.popen([sys.executable, "-c", LOOP_CLIENT, WEB, "80", "6"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
    assert first.returncode == 0  # SIGTERM stops kproxy cleanly and leaves the rules in place ...
    assert WEB in clean.ruleset()
    with clean.run_kproxy("--config", cfg, "--manifests", manifests):  # ... the next one replaces them atomically
        out, _ = loop.communicate(timeout=30)
        result = json.loads(out)
        assert result["failed"] == 0 and result["ok"] > 50, result
        assert set(answered_by(clean.client.probe(WEB, 80, count=30))) == {"pod-a", "pod-b"}


def test_failed_sync_keeps_rules_counts_and_recovers_with_a_full_sync(clean, tmp_path):
    flag = tmp_path / "fail"
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    (wrapper_dir / "nft").write_text(NFT_WRAPPER.format(flag=flag, nft=subprocess.check_output(["which", "nft"], text=True).strip()))
    (wrapper_dir / "nft").chmod(0o755)
    manifests = write_manifests(clean.tmp / "failing", objects(["10.0.1.2", "10.0.2.2"]))
    with clean.run_kproxy("--config", config(clean, "failing.yaml"), "--manifests", manifests,
                          env={"PATH": f"{wrapper_dir}:{os.environ['PATH']}"}):
        wait_for(lambda: WEB in clean.ruleset(), what="first rules")
        wait_for(lambda: fetch(clean, "http://127.0.0.1:10256/healthz")[0] == 200, what="healthz 200")
        code, body = fetch(clean, "http://127.0.0.1:10256/healthz")
        assert {"lastUpdated", "currentTime", "healthy", "nodeEligible"} <= set(json.loads(body))
        flag.touch()
        write_manifests(manifests, objects(["10.0.2.2"]))  # this change cannot be applied
        wait_for(lambda: 'kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 1.0' in fetch(clean, "http://127.0.0.1:10249/metrics")[1],
                 what="the failure metric")
        # the previous rules still serve traffic, to both endpoints
        assert set(answered_by(clean.client.probe(WEB, 80, count=30))) == {"pod-a", "pod-b"}
        # a change queued for longer than 2 × syncPeriod makes kproxy unhealthy
        wait_for(lambda: fetch(clean, "http://127.0.0.1:10256/healthz")[0] == 503, timeout=15, what="healthz 503")
        assert fetch(clean, "http://127.0.0.1:10256/livez")[0] == 503
        flag.unlink()  # the retry after syncPeriod is a full sync and succeeds
        wait_for(lambda: answered_by(clean.client.probe(WEB, 80, count=20)) == {"pod-b": 20}, timeout=15,
                 what="the new endpoint set")
        metrics = fetch(clean, "http://127.0.0.1:10249/metrics")[1]
        for name in ("kubeproxy_sync_proxy_rules_duration_seconds_bucket", "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                     "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "kubeproxy_network_programming_duration_seconds_bucket",
                     "kubeproxy_sync_proxy_rules_endpoint_changes_total", "kproxy_plugin_hook_duration_seconds_count",
                     "kubeproxy_proxy_healthz_total", "kubeproxy_sync_proxy_rules_no_local_endpoints_total"):
            assert name in metrics, name
        assert fetch(clean, "http://127.0.0.1:10256/healthz")[0] == 200
        assert fetch(clean, "http://127.0.0.1:10249/proxyMode")[1].strip() == "nftables"
