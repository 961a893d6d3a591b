"""What loading the load-balancing elements costs through ``nft -f`` and through netlink.

A full sync's apply step is nft loading the map elements, most of them the backends of
every Service port (``addr . proto . port . index : endpoint-addr . endpoint-port``, one
per endpoint). This measures, for N Services × M endpoints, each in a fresh network
namespace with the map already declared:

- ``nft -f``: the elements as kproxy writes them (2,000 per ``add element`` command);
- netlink: the same elements encoded by ``kproxy.nft.netlink`` as ``NFT_MSG_NEWSETELEM``
  messages of one nfnetlink batch (encoding time, then the kernel's time until every
  message is acknowledged), as a full sync into a new table loads them.

Both must leave the same map (the listings are compared). Prints a table; asserts
nothing.

    sudo .venv/bin/python bench/bench_element_load.py [--sizes 10000x10] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from statefactory import cluster_ip, endpoint_ip  # noqa: E402

from kproxy.nft import Elements, Set, netlink  # noqa: E402

MAP = "add table ip kproxy\nadd map ip kproxy cluster-backends { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport ; }\n"
PORT, TARGET, BATCH = 80, 8080, 2000


def elements(n: int, m: int):
    """(service address, endpoint index, endpoint address) of every backend element."""
    for i in range(n):
        for e in range(m):
            yield cluster_ip(i), e, endpoint_ip(i, e)


def nft_script(n: int, m: int) -> str:
    items = [f"{a} . tcp . {PORT} . {e} : {ep} . {TARGET}" for a, e, ep in elements(n, m)]
    return "".join(f"add element ip kproxy cluster-backends {{ {', '.join(items[i:i + BATCH])} }}\n"
                   for i in range(0, len(items), BATCH))


def netlink_batch(n: int, m: int) -> tuple[bytes, int]:
    """The elements as kproxy's full sync sends them (``kproxy.nft.netlink``): one
    indexed run per Service port."""
    s = Set("ip", "kproxy", "cluster-backends", "ip daddr . meta l4proto . th dport . numgen random mod 1",
            "ip daddr . th dport", typeof=True)
    runs = tuple((f"{cluster_ip(i)} . tcp . {PORT}", tuple(f"{endpoint_ip(i, e)} . {TARGET}" for e in range(m)), None)
                 for i in range(n))
    return netlink.batch([(netlink.encoder(s), [Elements("ip", "kproxy", "cluster-backends", runs)])])


def loaded() -> tuple[int, str]:
    """How many elements the map holds, and a digest of them as nft lists them.

    Listed until two listings agree: right after a large batch the kernel may still be
    resizing the map's hash table, and a dump walking it then can see an element twice."""
    last = None
    while True:
        out = subprocess.run(["nft", "-j", "list", "map", "ip", "kproxy", "cluster-backends"],
                             capture_output=True, text=True, check=True).stdout
        elems = [json.dumps(e, sort_keys=True) for i in json.loads(out)["nftables"] if "map" in i
                 for e in i["map"].get("elem", ())]
        now = len(elems), hashlib.sha256("\n".join(sorted(elems)).encode()).hexdigest()
        if now == last:
            return now
        last = now


def child(n: int, m: int, how: str) -> dict:
    subprocess.run(["nft", "-f", "-"], input=MAP, text=True, check=True)
    if how == "nft":
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
            f.write(nft_script(n, m))
            f.flush()
            t0 = time.perf_counter()
            subprocess.run(["nft", "-f", f.name], check=True)
            out = {"encode": 0.0, "load": time.perf_counter() - t0}
    else:
        t0 = time.perf_counter()
        batch, acks = netlink_batch(n, m)
        t1 = time.perf_counter()
        netlink.send(batch, acks)
        out = {"encode": t1 - t0, "load": time.perf_counter() - t1}
    out["elements"], out["digest"] = loaded()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000x10,10000x10")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("N", "M", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2])))
        return
    rows = []
    for size in args.sizes.split(","):
        n, m = map(int, size.split("x"))
        med = {}
        for how in ("nft", "netlink"):
            runs = []
            for r in range(args.runs):
                name = f"kpel{os.getpid()}{how[0]}{r}"
                subprocess.run(["ip", "netns", "add", name], check=True)
                try:
                    proc = subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__, "--child", str(n), str(m), how],
                                          capture_output=True, text=True)
                finally:
                    subprocess.run(["ip", "netns", "del", name], check=False)
                if proc.returncode:
                    raise SystemExit(f"{size} {how}: {proc.stderr[-2000:]}")
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if runs[-1]["elements"] != n * m:
                    raise SystemExit(f"{size} {how}: {runs[-1]['elements']} elements loaded, not {n * m}")
            med[how] = {k: statistics.median(x[k] for x in runs) for k in ("encode", "load")}
            med[how]["digest"] = runs[0]["digest"]
        if med["nft"]["digest"] != med["netlink"]["digest"]:
            raise SystemExit(f"{size}: the two ways left different maps")
        rows.append((size, n * m, med))
    print(f"\nBackend elements into a declared map, fresh network namespace each, median of {args.runs} runs")
    print(f"{'Services×endpoints':>18} {'elements':>9} {'nft -f':>8} {'netlink: encode':>16} {'kernel':>8} {'total':>8} {'nft/netlink':>12}")
    for size, count, med in rows:
        nl = med["netlink"]["encode"] + med["netlink"]["load"]
        print(f"{size:>18} {count:>9} {med['nft']['load']:>7.2f}s {med['netlink']['encode']:>15.2f}s "
              f"{med['netlink']['load']:>7.2f}s {nl:>7.2f}s {med['nft']['load'] / nl:>11.1f}×")


if __name__ == "__main__":
    main()
