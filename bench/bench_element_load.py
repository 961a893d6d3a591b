"""What loading the load-balancing elements costs through ``nft -f`` and through netlink.

A full sync's apply step is nft loading the map elements, most of them the backends of
every Service port (``addr . proto . port . index : endpoint-addr . endpoint-port``, one
per endpoint). This measures, for N Services × M endpoints, each in a fresh network
namespace with the map already declared:

- ``nft -f``: the elements as kproxy writes them (2,000 per ``add element`` command);
- netlink: the same elements encoded in Python as ``NFT_MSG_NEWSETELEM`` messages of one
  nfnetlink batch, sent on a ``NETLINK_NETFILTER`` socket (encoding time, then the
  kernel's time until every message is acknowledged).

Both must leave the same map (the listings are compared). kproxy does not write elements
through netlink: a full sync must stay one atomic transaction with its chains and rules,
which only nft can encode. This shows what such a writer would save. Prints a table;
asserts nothing.

    sudo .venv/bin/python bench/bench_element_load.py [--sizes 10000x10] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from statefactory import cluster_ip, endpoint_ip  # noqa: E402

MAP = "add table ip kproxy\nadd map ip kproxy cluster-backends { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport ; }\n"
PORT, TARGET, BATCH = 80, 8080, 2000

NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM = 10, 12
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NLMSG_ERROR = 0x10, 0x11, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLA_F_NESTED = 1, 4, 0x400, 0x8000
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
PER_MESSAGE = 1000  # a netlink attribute holds at most 64 KiB


def elements(n: int, m: int):
    """(service address, endpoint index, endpoint address) of every backend element."""
    for i in range(n):
        for e in range(m):
            yield cluster_ip(i), e, endpoint_ip(i, e)


def nft_script(n: int, m: int) -> str:
    items = [f"{a} . tcp . {PORT} . {e} : {ep} . {TARGET}" for a, e, ep in elements(n, m)]
    return "".join(f"add element ip kproxy cluster-backends {{ {', '.join(items[i:i + BATCH])} }}\n"
                   for i in range(0, len(items), BATCH))


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload  # nfgenmsg
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def netlink_batch(n: int, m: int) -> tuple[bytes, int]:
    """One nfnetlink batch adding every element; and how many messages want an ack.

    Each concatenation field takes a multiple of 4 bytes: address, protocol (1 byte),
    port (network order), the numgen index (host order, an integer register)."""
    key_head = struct.pack("=HHHH", 24, 1 | NLA_F_NESTED, 20, 1)  # SET_ELEM_KEY { DATA_VALUE (16 bytes) }
    data_head = struct.pack("=HHHH", 16, 2 | NLA_F_NESTED, 12, 1)  # SET_ELEM_DATA { DATA_VALUE (8 bytes) }
    proto_port = bytes((socket.IPPROTO_TCP, 0, 0, 0)) + struct.pack("!H2x", PORT)
    target = struct.pack("!H2x", TARGET)
    aton = socket.inet_aton
    items = [struct.pack("=HH", 44, 1 | NLA_F_NESTED) + key_head + aton(a) + proto_port + struct.pack("=I", e)
             + data_head + aton(ep) + target for a, e, ep in elements(n, m)]
    seq = 0
    messages = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)]
    for i in range(0, len(items), PER_MESSAGE):
        chunk = b"".join(items[i:i + PER_MESSAGE])
        seq += 1
        payload = (_attr(1, b"kproxy\0") + _attr(2, b"cluster-backends\0")
                   + struct.pack("=HH", 4 + len(chunk), 3 | NLA_F_NESTED) + chunk)
        messages.append(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
                                 NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, seq, socket.AF_INET, payload))
    messages.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(messages), seq


def send_batch(batch: bytes, acks: int) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as s:  # NETLINK_NETFILTER
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 2 * len(batch))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
        s.bind((0, 0))
        s.send(batch)
        s.settimeout(30)
        while acks:
            data, off = s.recv(1 << 20), 0
            while off < len(data):
                size, kind = struct.unpack_from("=IH", data, off)
                if kind == NLMSG_ERROR:
                    acks -= 1
                    err = struct.unpack_from("=i", data, off + 16)[0]
                    if err:
                        raise OSError(-err, f"the kernel refused the batch: {os.strerror(-err)}")
                off += (size + 3) & ~3


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
        send_batch(batch, acks)
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
