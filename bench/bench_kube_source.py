#!/usr/bin/env python3
"""Benchmark: the Kubernetes API source at 10,000 Services (prints a table; not a test).

The fake API server (tests/apiserver.py) serves N Services and N EndpointSlices with E
endpoints each. kproxy runs as a separate process, so its peak RSS is its own: the
child process builds exactly what ``kproxy run --kubeconfig`` builds (``App.from_config``
with the default plugins, ``KubeSource.from_kubeconfig``, ``App.run_forever``), once with
the in-memory ``FakeNft`` backend and once with the real ``nft`` backend. Both run inside
a fresh network namespace (root needed), with the API server's listening socket created
in that namespace, so the real run programs an empty namespace and nothing on the host.

Measured:
- start to first complete sync: from just before the child process is started to the end
  of its first successful (full) sync, Python start-up and imports included; and, inside
  that, when the initial lists were complete;
- peak RSS of the kproxy process (VmHWM; the ``nft`` processes it runs are not included),
  also when the lists were complete (the source and the state, before any sync);
- one watch event to datapath: the parent changes one EndpointSlice through the server
  and times until the child finished the sync that carries it (minSyncPeriod is 0, so
  it is excluded), plus the part until the change was in the child's state; median and
  90th percentile over ``--events`` events.

Targets from issue 5: first complete sync within 5 s, peak RSS under 150 MiB, one event
to rules within 20 ms.

    sudo .venv/bin/python bench/bench_kube_source.py [--services 10000] [--endpoints 10]
                                                     [--events 50] [--only fake|nft] [--hints]

``--hints`` gives every endpoint topology hints (forZones and forNodes), as the
EndpointSlice controller does with topology-aware routing; kproxy then keeps the hints
of 100k endpoints in its state but programs only the endpoints hinted for its node, so
the datapath (and the sync) is smaller than without.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

MARK_NS, MARK_NAME = "bench-0", "svc-0-slice"  # the slice the event test changes
CLONE_NEWNET = 0x40000000


# -- the objects -------------------------------------------------------------------------------
def objects(n: int, endpoints: int, hints: bool = False):
    """N Services (100 per namespace) with one TCP port, and one slice of E endpoints each."""
    for i in range(n):
        ns, name = f"bench-{i // 100}", f"svc-{i}"
        yield {"kind": "Service", "apiVersion": "v1",
               "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
               "spec": {"type": "ClusterIP", "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                        "clusterIPs": [f"10.96.{i // 250}.{i % 250 + 1}"], "ipFamilies": ["IPv4"],
                        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
                        "selector": {"app": name}, "sessionAffinity": "None",
                        "internalTrafficPolicy": "Cluster"}}
        yield slice_of(i, endpoints, hints=hints)


def slice_of(i: int, endpoints: int, first_ip: str | None = None, hints: bool = False) -> dict:
    base = i * endpoints
    ips = [f"10.{128 + (base + j) // 65536}.{(base + j) // 256 % 256}.{(base + j) % 256}" for j in range(endpoints)]
    if first_ip:
        ips[0] = first_ip
    eps = [{"addresses": [ip], "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": f"node-{j % 50}", "zone": "zone-a",
            "targetRef": {"kind": "Pod", "namespace": f"bench-{i // 100}", "name": f"svc-{i}-pod-{j}"}}
           for j, ip in enumerate(ips)]
    if hints:
        for e in eps:
            e["hints"] = {"forZones": [{"name": e["zone"]}], "forNodes": [{"name": e["nodeName"]}]}
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": f"svc-{i}-slice", "namespace": f"bench-{i // 100}",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": eps}


# -- the kproxy side (child process) -----------------------------------------------------------------
def child(args) -> None:
    """Run kproxy's API source and sync loop; report progress as JSON lines on stdout."""
    import logging

    from kproxy import config as configmod
    from kproxy.app import App
    from kproxy.nft import FakeNft
    from kproxy.nft.lib import HybridNft
    from kproxy.sources.kube import KubeSource

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out_lock = threading.Lock()

    def emit(**kw):
        with out_lock:
            sys.stdout.write(json.dumps(kw) + "\n")
            sys.stdout.flush()

    config = configmod.from_dict({"hostnameOverride": "node-0", "clusterCIDR": "10.128.0.0/9",
                                  "nftables": {"minSyncPeriod": "0s"}})
    app = App.from_config(config, FakeNft() if args.child == "fake" else HybridNft())  # as `kproxy run`
    source = KubeSource.from_kubeconfig(app, args.kubeconfig)

    key = (MARK_NS, MARK_NAME)
    state_put = app.state.put

    def put(obj):  # note when the marked slice reaches the state
        state_put(obj)
        if getattr(obj, "key", None) == key and app.sources_synced.is_set():
            emit(phase="state", t=time.time(), marker=obj.endpoints[0].ip)

    app.state.put = put
    sync = app.sync

    def timed_sync(full=False):
        sl = app.state.slices.get(key)
        marker = sl.endpoints[0].ip if sl else None
        result = sync(full)
        emit(phase="synced", t=time.time(), ok=result.ok, full=result.full, duration=result.duration,
             marker=marker, error=result.error)
        return result

    app.sync = timed_sync
    threading.Thread(target=lambda: (app.sources_synced.wait(),
                                     emit(phase="listed", t=time.time(), rss_mib=vm_hwm_mib(os.getpid()))),
                     daemon=True).start()
    app.configure()
    source.start()
    loop = threading.Thread(target=app.run_forever, daemon=True)
    loop.start()
    sys.stdin.read()  # the parent closes stdin when it is done
    app.stop()
    source.stop()
    loop.join(10)
    app.unconfigure()
    emit(phase="exit", maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# -- the parent: server, namespace, measurements ---------------------------------------------------------
def start_in_netns(server, netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    errors = []

    def enter():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            server.start()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    if errors:
        raise errors[0]


class Child:
    """The kproxy process; its JSON lines are read by a thread, so waits can time out."""

    def __init__(self, backend: str, netns: str, kubeconfig: str):
        self.t_launch = time.time()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
        self.proc = subprocess.Popen(  # ip netns exec execs the command: same PID
            ["ip", "netns", "exec", netns, sys.executable, __file__, "--child", backend, "--kubeconfig", kubeconfig],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.queue.put(json.loads(line))
        self.queue.put(None)

    def next(self, phase: str, timeout: float = 120.0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(phase) from None
            if msg is None:
                raise RuntimeError(f"kproxy child exited (rc={self.proc.wait()}) before {phase}")
            if msg["phase"] == phase and all(msg.get(k) == v for k, v in match.items()):
                return msg

    def kill(self):
        self.proc.kill()  # by its PID: the process this benchmark started
        self.proc.wait(10)

    def finish(self) -> dict:
        self.proc.stdin.close()
        end = self.next("exit", timeout=60)
        self.proc.wait(30)
        return end


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a running process (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(backend: str, server, netns: str, kubeconfig: str, e: int, events: int, sync_timeout: float,
                hints: bool = False) -> dict:
    child = Child(backend, netns, kubeconfig)
    res = {"backend": backend}
    try:
        listed = child.next("listed", timeout=sync_timeout)
        res["listed"] = listed["t"] - child.t_launch
        res["listed_rss_mib"] = listed["rss_mib"]
        first = child.next("synced", timeout=sync_timeout, ok=True)
    except TimeoutError:
        res["rss_mib"] = vm_hwm_mib(child.proc.pid)
        child.kill()
        res["timeout"] = sync_timeout
        return res
    res.update(first_sync=first["t"] - child.t_launch, first_sync_duration=first["duration"])
    if backend == "nft":
        out = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "set", "ip", "kproxy", "cluster-ips"],
                             capture_output=True, text=True).stdout
        res["cluster_ips_in_kernel"] = out.count("10.96.")
    time.sleep(0.5)
    latencies, to_state, durations = [], [], []
    for k in range(events):
        ip = f"10.250.{k // 250}.{k % 250 + 1}"
        t0 = time.time()
        server.apply(slice_of(0, e, first_ip=ip, hints=hints))
        st = child.next("state", marker=ip)
        done = child.next("synced", marker=ip)
        latencies.append(done["t"] - t0)
        to_state.append(st["t"] - t0)
        durations.append(done["duration"])
        time.sleep(0.05)
    res["rss_mib"] = vm_hwm_mib(child.proc.pid)
    child.finish()
    res.update(event_median=statistics.median(latencies), event_p90=sorted(latencies)[int(0.9 * len(latencies)) - 1],
               state_median=statistics.median(to_state), sync_median=statistics.median(durations))
    return res


def row(r: dict) -> str:
    def ms(key):
        return f"{r[key] * 1000:.1f}ms" if key in r else "-"

    def sec(key):
        return f"{r[key]:.2f}s" if key in r else "-"

    first = sec("first_sync") if "timeout" not in r else f">{r['timeout']:.0f}s"
    listed_rss = f"{r['listed_rss_mib']:.0f}MiB" if "listed_rss_mib" in r else "-"
    return (f"{r['backend']:<8} {sec('listed'):>10} {listed_rss:>9} {first:>13} {sec('first_sync_duration'):>13} "
            f"{r['rss_mib']:>6.0f}MiB {ms('event_median'):>12} {ms('event_p90'):>8} "
            f"{ms('state_median'):>8} {ms('sync_median'):>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--events", type=int, default=50)
    ap.add_argument("--only", choices=("fake", "nft"))
    ap.add_argument("--hints", action="store_true", help="topology hints (forZones, forNodes) on every endpoint")
    ap.add_argument("--sync-timeout", type=float, default=300.0,
                    help="give up on a variant whose first complete sync takes longer (seconds)")
    ap.add_argument("--child", choices=("fake", "nft"), help=argparse.SUPPRESS)
    ap.add_argument("--kubeconfig", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    if os.geteuid() != 0:
        print("needs root (a network namespace for the run; real nft)", file=sys.stderr)
        return 2

    from apiserver import FakeAPIServer

    netns = f"kpbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    server = FakeAPIServer(bookmark_interval=5.0, history_limit=None)
    tmp = Path(f"/tmp/{netns}")
    tmp.mkdir(exist_ok=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        t = time.monotonic()
        server.bulk_load(objects(args.services, args.endpoints, args.hints))
        load_s = time.monotonic() - t
        start_in_netns(server, netns)
        kubeconfig = server.kubeconfig(tmp / "kubeconfig")
        print(f"fake API server: {args.services} Services + {args.services} EndpointSlices x {args.endpoints} "
              f"endpoints{' with topology hints' if args.hints else ''} loaded in {load_s:.1f}s; kproxy runs in netns {netns}")
        results = []
        for backend in ("fake", "nft"):
            if args.only and backend != args.only:
                continue
            results.append(run_variant(backend, server, netns, kubeconfig, args.endpoints, args.events,
                                       args.sync_timeout, args.hints))
            if backend == "nft":
                subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "kproxy", "cleanup"],
                               capture_output=True)
        print()
        print(f"{'backend':<8} {'lists done':>10} {'(RSS then)':>9} {'1st sync done':>13} {'(sync itself)':>13} {'peak RSS':>9} "
              f"{'event->rules':>12} {'p90':>8} {'->state':>8} {'sync':>8}")
        for r in results:
            print(row(r))
        for r in results:
            if "cluster_ips_in_kernel" in r:
                print(f"\nnft: {r['cluster_ips_in_kernel']} ClusterIPs in set ip kproxy cluster-ips after the first sync")
        print("\ntargets: first complete sync <= 5 s from start, peak RSS < 150 MiB, one event to rules <= 20 ms")
        print("times from process start (imports included); event = change through the API server until the sync "
              "carrying it has finished (minSyncPeriod 0); ->state = until it was in kproxy's state; "
              f"median and p90 of {args.events}; peak RSS = VmHWM of the kproxy process "
              "(nft's own memory not included); the fake backend deep-copies its whole ruleset per transaction, which is in its sync times")
    finally:
        server.stop()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
