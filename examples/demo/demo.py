"""kproxy demo: real traffic through ClusterIPs in network namespaces.

Builds a one-node "cluster" out of network namespaces (a node routing between two pods,
a client pod and an off-cluster client), starts ``kproxy run`` in the node namespace on
the manifests in examples/demo/manifests, sends real TCP and UDP traffic to the
ClusterIPs and shows which endpoint answered and which source address it saw. Then it
edits the manifests while kproxy runs and shows the datapath following. Everything it
creates is removed at the end. Run as root: examples/demo/run.sh
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import netlab  # noqa: E402  (the test suite's namespace lab)


def show(title, results):
    by = Counter((r.name, r.peer) if r.ok else (r.outcome, "") for r in results)
    print(f"\n{title}")
    for (who, peer), n in sorted(by.items()):
        seen = f"saw the client as {peer}" if peer else ""
        print(f"   {n:3d} x {who:<8} {seen}")


def wait_for(pred, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def main() -> int:
    reason = netlab.available()
    if reason:
        print(f"demo cannot run: {reason}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="kproxy-demo-"))
    manifests = work / "manifests"
    shutil.copytree(HERE / "manifests", manifests)
    with netlab.Lab() as lab:
        pod_a = lab.pod("pod-a", "10.0.1.2/24", gw="10.0.1.1/24")
        pod_b = lab.pod("pod-b", "10.0.2.2/24", gw="10.0.2.1/24")
        client = lab.pod("client", "10.0.3.2/24", gw="10.0.3.1/24")
        ext = lab.pod("ext", "192.168.50.2/24", gw="192.168.50.1/24")
        for pod in (pod_a, pod_b):
            pod.serve(8080, "tcp", name=pod.label)
            pod.serve(5353, "udp", name=pod.label)
        print(f"namespaces: {', '.join(lab.namespaces())}")
        print("pods: pod-a 10.0.1.2, pod-b 10.0.2.2 (endpoints), client 10.0.3.2 (in the cluster CIDR), "
              "ext 192.168.50.2 (off-cluster)")
        log = open(work / "kproxy.log", "w")
        kproxy = lab.node.popen([sys.executable, "-m", "kproxy", "run", "--config", str(HERE / "kproxy-config.yaml"),
                                 "--manifests", str(manifests)], stdout=log, stderr=subprocess.STDOUT)
        try:
            if not wait_for(lambda: "172.30.0.10" in lab.node.run(["nft", "list", "ruleset"]).stdout):
                print("kproxy did not program the rules; its log:\n" + (work / "kproxy.log").read_text())
                return 1
            print("\nkproxy is running in the node namespace; its table:")
            print(lab.node.run(["nft", "list", "table", "ip", "kproxy"]).stdout)
            show("40 TCP connections from the client pod to web (172.30.0.10:80):",
                 client.probe("172.30.0.10", 80, "tcp", count=40))
            show("20 UDP queries from the client pod to dns (172.30.0.53:53):",
                 client.probe("172.30.0.53", 53, "udp", count=20))
            show("20 TCP connections from the off-cluster client (masqueraded to the node's address):",
                 ext.probe("172.30.0.10", 80, "tcp", count=20))
            show("pod-a calling web (hairpin: reaching itself, it sees the node's address):",
                 pod_a.probe("172.30.0.10", 80, "tcp", count=20))
            show("3 connections to 'empty' (no endpoints: rejected at once):",
                 client.probe("172.30.0.99", 80, "tcp", count=3))
            web = manifests / "web.yaml"
            web.write_text(web.read_text().replace('  - addresses: ["10.0.2.2"]\n    conditions: {ready: true}',
                                                   '  - addresses: ["10.0.2.2"]\n    conditions: {ready: false}'))
            print("\nmarking pod-b not ready in web's EndpointSlice while kproxy runs ...")
            wait_for(lambda: "10.0.2.2 . 8080" not in lab.node.run(["nft", "list", "map", "ip", "kproxy", "cluster-backends"]).stdout)
            show("40 TCP connections to web now:", client.probe("172.30.0.10", 80, "tcp", count=40))
        finally:
            kproxy.send_signal(signal.SIGTERM)
            kproxy.wait(10)
            lab.node.run([sys.executable, "-m", "kproxy", "cleanup"])
            log.close()
    shutil.rmtree(work, ignore_errors=True)
    print("\ndone: kproxy stopped, its tables removed, namespaces deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
