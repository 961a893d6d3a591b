"""Where the Python side of a full sync goes, and how far it is from a bare loop.

For each size (Services × endpoints) the engine plans a full sync into an empty kernel
(the in-memory fake: no nft runs), and prints medians over --runs of: the whole plan,
each plugin's ``kproxy_pre_render``, and the engine's own share (merging the
declarations, rules, reference checks, the transaction). Beside it, a *bare loop* does
only the work no renderer can skip: join each Service port with its EndpointSlice, sort
the endpoints, build the element strings of the ClusterIP, dispatch, backend and hairpin
elements, and store them in a dict; no plugins, no checks, no scopes. Prints a table;
asserts nothing.

    .venv/bin/python bench/bench_render.py [--sizes 1000x10,10000x10] [--runs 5]
"""

from __future__ import annotations

import argparse
import gc
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from statefactory import NODE, build  # noqa: E402


def bare_loop(state) -> int:
    """The unavoidable part of rendering the state's elements; returns their count."""
    els = {}
    pton, af = socket.inet_pton, socket.AF_INET
    for svc in state.services.values():
        group = state._by_service.get(svc.key, {})
        for port in svc.ports:
            found = []
            for sl in group.values():
                number = next((p.port for p in sl.ports if p.name == port.name and p.protocol == port.protocol), None)
                if number is not None:
                    found += [(pton(af, e.ip), e.ip, number) for e in sl.endpoints if e.ready]
            found.sort()
            values = tuple([f"{ip} . {n}" for _, ip, n in found])
            for ip in svc.cluster_ips:
                dest = f"{ip} . tcp . {port.port}"
                els[("cluster-ips", ip)] = (ip, None)
                els[("service-ips", dest)] = (dest, f"goto cluster-{len(values)}")
                els[("backends", dest)] = (dest, values)
        for sl in group.values():
            for e in sl.endpoints:
                if e.node_name == NODE:
                    els[("hairpin", f"{e.ip} . {e.ip}")] = None
    return len(els)


def measure(n: int, m: int, runs: int) -> dict:
    from kproxy import pluginmanager as plugins
    from kproxy.app import App
    from kproxy.config import Config
    from kproxy.nft import FakeNft

    names = ["service-maps", "masquerade"]
    pm = plugins.make_manager()
    plugins.load(pm, names, plugins.discover())
    app = App(Config(node_name=NODE, cluster_cidrs=("10.0.0.0/8",)), FakeNft(), pm, names)
    app.state.replace_all(build(n, m))
    app.state.take_changes()
    samples: dict[str, list[float]] = {}
    gc.disable()  # as during a sync (see Engine.sync)
    try:
        for _ in range(runs):
            seconds: dict[str, float] = {}
            state = app.state.snapshot()
            t0 = time.perf_counter()
            app.engine.plan(state, True, seconds=seconds)
            total = time.perf_counter() - t0
            app.engine.committed = None
            for name, value in [("plan", total), *seconds.items(), ("engine", total - sum(seconds.values()))]:
                samples.setdefault(name, []).append(value)
            t0 = time.perf_counter()
            bare_loop(state)
            samples.setdefault("bare loop", []).append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000x10,10000x10,30000x10")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for size in args.sizes.split(","):
        n, m = map(int, size.split("x"))
        rows.append((size, measure(n, m, args.runs)))
    columns = ["plan", "service-maps", "masquerade", "engine", "bare loop"]
    print(f"Full-sync render (Python) in seconds, median of {args.runs} runs; plan = the plugins' "
          "pre_render + the engine (merge, rules, checks, transaction)")
    print(f"{'Services×endpoints':>18} " + " ".join(f"{c:>13}" for c in columns) + f" {'plan / bare':>12}")
    for size, med in rows:
        print(f"{size:>18} " + " ".join(f"{med.get(c, 0.0):>12.3f}s" for c in columns)
              + f" {med['plan'] / med['bare loop']:>11.1f}×")


if __name__ == "__main__":
    main()
