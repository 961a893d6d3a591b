#!/usr/bin/env python3
"""Benchmark: a ClusterIP TCP stream with fastpath off and on, in the flowtable VM.

    python bench/bench_fastpath.py [--runs 5] [--seconds 5] [--json FILE]

boots the test VM once (tests/vm/run_in_vm.py: Debian's 6.1 kernel under qemu TCG) and
runs the guest part (``--guest``) there: the lab of tests/vm/fastpath_lab.py (client pod
-> node with kproxy -> server pod), an iperf3 TCP stream from the client to a ClusterIP,
with kproxy programming the node (``kproxy run --once --plugin fastpath``) as

- ``off``: ``--fastpath-packet-threshold 0`` (no flowtable at all),
- ``threshold 20``: the default,
- ``threshold 1``: offload at once ("always").

The configurations are interleaved (round 1: off, 20, 1; round 2: ...) so slow drifts of
the emulated machine hit all of them alike. Per configuration it prints medians over the
runs of: throughput (iperf3 receiver), packets of the data connection that went through
the forward hook (counted by a test-only table at priority -300, see fastpath_lab.py),
and packets that entered the node on the two pod links (every packet of the test
crosses the node once), with the ratio to ``off``. Only measured numbers are printed.
Under emulation absolute throughput is low and noisy; the forward-chain packet count is
the robust figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vm"))

CONFIGS = (("off (threshold 0)", 0), ("threshold 20", 20), ("threshold 1", 1))
MARK = "@@bench-fastpath@@"


# -- guest ------------------------------------------------------------------------------

def _link_rx(lab, dev) -> int:
    return int(lab.node.run(["cat", f"/sys/class/net/{dev}/statistics/rx_packets"]).stdout)


def guest(runs: int, seconds: int) -> int:
    from fastpath_lab import BULK, FastpathLab

    lab = FastpathLab(Path(tempfile.mkdtemp(prefix="bench-fastpath-")))
    rows = []
    try:
        cport = 41000
        for rnd in range(runs):
            for label, threshold in CONFIGS:
                proc = lab.kproxy_once("--fastpath-packet-threshold", str(threshold))
                if proc.returncode:
                    raise RuntimeError(f"kproxy failed: {proc.stderr[-2000:]}")
                has_ft = lab.flowtable_devices() is not None
                if has_ft != (threshold > 0):
                    raise RuntimeError(f"{label}: flowtable present={has_ft}")
                cport += 1
                devs = (lab.client.host_dev, lab.server.host_dev)
                before = sum(_link_rx(lab, d) for d in devs)
                proc = lab.iperf(BULK, cport, seconds)
                time.sleep(seconds / 2)  # sample conntrack mid-flow (after the flow ends, [OFFLOAD] is gone)
                entry = lab.conntrack_entry(cport) or ""
                result = lab.iperf_result(proc, timeout=seconds + 120)
                after = sum(_link_rx(lab, d) for d in devs)
                row = {"config": label, "threshold": threshold, "round": rnd + 1,
                       "mbit_s": result["end"]["sum_received"]["bits_per_second"] / 1e6,
                       "forward_packets": lab.flow_packets(cport),
                       "node_packets": after - before,
                       "offloaded": "[OFFLOAD]" in entry}
                rows.append(row)
                print(MARK + " " + json.dumps(row), flush=True)
    finally:
        lab.close()
    return 0


# -- host -------------------------------------------------------------------------------

def table(rows) -> str:
    by = {label: [r for r in rows if r["config"] == label] for label, _ in CONFIGS}
    med = {label: {k: statistics.median(r[k] for r in rs) for k in ("mbit_s", "forward_packets", "node_packets")}
           for label, rs in by.items() if rs}
    base = med.get(CONFIGS[0][0])
    head = (f"{'configuration':<18} {'runs':>4} {'Mbit/s':>8} {'x off':>6} {'fwd pkts/flow':>13} {'x off':>7} "
            f"{'node pkts/flow':>14} {'fwd share':>9} {'offloaded':>9}")
    lines = [head, "-" * len(head)]
    for label, _ in CONFIGS:
        if label not in med:
            continue
        m, rs = med[label], by[label]
        ratio_t = m["mbit_s"] / base["mbit_s"] if base and base["mbit_s"] else float("nan")
        ratio_f = m["forward_packets"] / base["forward_packets"] if base and base["forward_packets"] else float("nan")
        share = m["forward_packets"] / m["node_packets"] if m["node_packets"] else float("nan")
        lines.append(f"{label:<18} {len(rs):>4} {m['mbit_s']:>8.1f} {ratio_t:>6.2f} {m['forward_packets']:>13.0f} "
                     f"{ratio_f:>7.4f} {m['node_packets']:>14.0f} {share:>9.2%} {sum(r['offloaded'] for r in rs):>5}/{len(rs)}")
    lines.append("medians over the runs; x off = ratio to the 'off' median; fwd share = forward-hook packets / "
                 "packets entering the node on the pod links")
    for label, _ in CONFIGS:
        if by.get(label):
            lines.append(f"  {label}: Mbit/s per run " + ", ".join(f"{r['mbit_s']:.0f}" for r in by[label])
                         + "; fwd pkts " + ", ".join(str(r["forward_packets"]) for r in by[label]))
    return "\n".join(lines)


def host(runs: int, seconds: int, json_out: str | None) -> int:
    import run_in_vm as vm

    ok, reason = vm.vm_available()
    if not ok:
        print(f"bench_fastpath: the flowtable VM is not available: {reason}", file=sys.stderr)
        return 125
    t0 = time.monotonic()
    cmd = f".venv/bin/python bench/bench_fastpath.py --guest --runs {runs} --seconds {seconds}"
    rc, output = vm.run_in_vm(cmd, cwd=ROOT, timeout=300 + runs * len(CONFIGS) * (seconds + 60))
    rows = [json.loads(line[len(MARK):]) for line in output.splitlines() if line.startswith(MARK)]
    if rc or not rows:
        print(output[-4000:], file=sys.stderr)
        print(f"bench_fastpath: the guest part failed (exit {rc})", file=sys.stderr)
        return rc or 1
    print(f"ClusterIP TCP stream (iperf3, {seconds} s per run, {runs} runs per configuration), "
          f"client pod -> node (kproxy) -> server pod, qemu TCG VM, kernel 6.1; "
          f"{time.monotonic() - t0:.0f} s in total")
    print(table(rows))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the per-run rows to this file")
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.guest:
        return guest(args.runs, args.seconds)
    return host(args.runs, args.seconds, args.json)


if __name__ == "__main__":
    sys.exit(main())
