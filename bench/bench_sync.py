"""Full and partial sync cost of kproxy against kube-proxy's nftables layout.

For each size (Services × endpoints) a child process in a fresh network namespace builds
the state, runs one full sync through the real ``nft`` (recording Python render time,
apply time, total, its own peak RSS and nft's), and at the partial-sync size measures
partial syncs (1 endpoint changed, 1 Service added, 100 Services changed) and a full sync
run again over the tables already in place (a restart, the hourly full sync). Beside it,
``nft -f`` loads the same state written in kube-proxy's layout (one chain per Service
port and per endpoint). Medians over --runs. Prints a table; asserts nothing.

    sudo .venv/bin/python bench/bench_sync.py [--sizes 1000x10,10000x10] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class NftPeak:
    """The peak resident memory of the nft processes this process starts from now on.

    Not ``RUSAGE_CHILDREN``: a child's ru_maxrss counts the parent's pages it was forked
    with, which are more than nft needs once set elements go through netlink. Each nft
    process's VmHWM (its own high-water mark) is read every 2 ms until it exits."""

    def __init__(self):
        self.peak_kib = 0
        watch = self._watch

        class Watched(subprocess.Popen):
            def __init__(self, args, *a, **kw):
                super().__init__(args, *a, **kw)  # returns once the child has exec'd
                if os.path.basename(str(args[0])) == "nft":
                    threading.Thread(target=watch, args=(self.pid,), daemon=True).start()
        subprocess.Popen = Watched

    def _watch(self, pid: int) -> None:
        while True:
            try:
                with open(f"/proc/{pid}/status") as f:
                    found = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
            except OSError:
                return
            if not found:
                return  # exited: a zombie has no memory left
            self.peak_kib = max(self.peak_kib, int(found[1]))
            time.sleep(0.002)


def child(n: int, m: int, partial: bool) -> dict:
    from kproxy import pluginmanager as plugins
    from kproxy.app import App
    from kproxy.config import Config
    from kproxy.nft.lib import HybridNft
    from statefactory import build, endpoint_slice, service

    names = ["service-maps", "masquerade"]
    pm = plugins.make_manager()
    plugins.load(pm, names, plugins.discover())
    app = App(Config(node_name="node-1", cluster_cidrs=("10.0.0.0/8",)), HybridNft(), pm, names)
    app.state.replace_all(build(n, m))
    app.state.take_changes()
    nft_peak = NftPeak()
    r = app.sync(full=True)
    assert r.ok, r.error
    out = {"render": r.render_seconds, "apply": r.apply_seconds, "total": r.duration,
           "ops": len(r.transaction),
           "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "nft_rss_mib": nft_peak.peak_kib / 1024}
    if partial:
        def timed(change):
            change()
            t0 = time.perf_counter()
            res = app.sync()
            assert res.ok and not res.full, (res.error, res.full)
            return time.perf_counter() - t0
        samples = {"1 endpoint changed": [], "1 Service added": [], "100 Services changed": []}
        for k in range(5):
            samples["1 endpoint changed"].append(timed(lambda: app.state.put(endpoint_slice(7 + k, m, generation=1))))
            samples["1 Service added"].append(timed(lambda: (app.state.put(service(n + k)), app.state.put(endpoint_slice(n + k, m)))))
            samples["100 Services changed"].append(timed(lambda: [app.state.put(endpoint_slice(1000 + 100 * k + j, m, generation=2))
                                                                 for j in range(100)]))
        out["partial"] = {key: statistics.median(v) for key, v in samples.items()}
        # what a restart, the hourly full sync or a sync after a failure costs: a full sync
        # over tables the kernel already holds (it lists them first)
        full_again = []
        for _ in range(5):
            t0 = time.perf_counter()
            res = app.sync(full=True)
            assert res.ok and res.full, res.error
            full_again.append((time.perf_counter() - t0, res.render_seconds))
        out["partial"]["full sync, rules in place"] = statistics.median(t for t, _ in full_again)
        out["full_again_render"] = statistics.median(r for _, r in full_again)
    return out


def in_netns(argv, name) -> subprocess.CompletedProcess:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def kube_proxy_load(n: int, m: int) -> dict:
    from kube_proxy_layout import script

    with tempfile.NamedTemporaryFile("w", suffix=".nft", delete=False) as f:
        f.write(script(n, m))
        path = f.name
    try:
        proc = in_netns(["/usr/bin/env", "python3", "-c",
                         "import resource,subprocess,sys,time;t=time.perf_counter();"
                         f"r=subprocess.run(['nft','-f','{path}']);"
                         "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, r.returncode)"],
                        f"kpbench-kp{os.getpid()}")
        seconds, rss, rc = proc.stdout.split()
        if rc != "0":
            raise RuntimeError(f"kube-proxy layout failed to load: {proc.stderr[-300:]}")
        return {"seconds": float(seconds), "rss_mib": float(rss)}
    finally:
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000x10,10000x10,30000x10,5000x50")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--partial-size", default="10000x10")
    ap.add_argument("--kube-proxy-max", type=int, default=10000,
                    help="largest Service count to load in kube-proxy's layout (10,000 × 10 takes ~5 min)")
    ap.add_argument("--kube-proxy-runs", type=int, default=1,
                    help="loads of kube-proxy's layout per size (median; its load time varies 2x between runs)")
    ap.add_argument("--child", nargs=3, metavar=("N", "M", "PARTIAL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2] == "1")))
        return
    rows, partial_rows, full_again_render = [], None, None
    for size in args.sizes.split(","):
        n, m = map(int, size.split("x"))
        runs = []
        for r in range(args.runs):
            proc = in_netns([sys.executable, __file__, "--child", str(n), str(m), "1" if size == args.partial_size and r == 0 else "0"],
                            f"kpbench{os.getpid()}x{r}")
            if proc.returncode:
                raise SystemExit(f"{size}: child failed:\n{proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if "partial" in runs[-1]:
                partial_rows = runs[-1]["partial"]
                full_again_render = runs[-1]["full_again_render"]
        med = {k: statistics.median(x[k] for x in runs) for k in ("render", "apply", "total", "rss_mib", "nft_rss_mib")}
        kp = None
        if n <= args.kube_proxy_max:
            loads = [kube_proxy_load(n, m) for _ in range(args.kube_proxy_runs)]
            kp = {k: statistics.median(x[k] for x in loads) for k in ("seconds", "rss_mib")}
        rows.append((size, runs[0]["ops"], med, kp))
        print(f"... {size} done", file=sys.stderr, flush=True)
    print(f"\nFull sync, real nft in a fresh network namespace, median of {args.runs} runs "
          f"(kube-proxy layout: median of {args.kube_proxy_runs}); nft MiB: the largest nft process's peak, "
          "sampled every 2 ms (low for runs of a few ms)")
    print(f"{'Services×endpoints':>18} {'nft ops':>8} {'render':>8} {'apply':>8} {'total':>8} {'render %':>8} "
          f"{'RSS MiB':>8} {'nft MiB':>8} {'kube-proxy layout':>18} {'ratio':>7}")
    for size, ops, med, kp in rows:
        kp_text = f"{kp['seconds']:.2f} s / {kp['rss_mib']:.0f} MiB" if kp else "not run"
        ratio = f"{kp['seconds'] / med['total']:.0f}×" if kp else "-"
        print(f"{size:>18} {ops:>8} {med['render']:>7.2f}s {med['apply']:>7.2f}s {med['total']:>7.2f}s "
              f"{100 * med['render'] / med['total']:>7.0f}% {med['rss_mib']:>8.0f} {med['nft_rss_mib']:>8.0f} {kp_text:>18} {ratio:>7}")
    if partial_rows:
        print(f"\nPartial syncs at {args.partial_size} (median of 5; element-only transactions go through libnftables in-process;"
              " the full sync lists the tables in place and replaces their contents)")
        for key, seconds in partial_rows.items():
            extra = f"  (render {full_again_render * 1000:.1f} ms)" if key == "full sync, rules in place" else ""
            print(f"{key:>25}: {seconds * 1000:7.1f} ms{extra}")


if __name__ == "__main__":
    main()
