#!/usr/bin/env python3
"""Probe a TCP or UDP service N times and print what happened, as JSON.

Usage::

    python tests/probe_client.py --host H --port P --proto tcp|udp \\
        --count N --timeout S [--source ADDR]

Each attempt uses a new socket (TCP: connect and read one JSON line; UDP:
connect, send one datagram, wait for one reply).  Sockets of successful
attempts stay open until every attempt is done, so the successful attempts of
one run have distinct source ports (distinct connections/conntrack flows);
failed ones are closed at once (no SYN retransmissions after giving up).

Prints a JSON list with one object per attempt::

    {"outcome": "ok"|"refused"|"unreachable"|"timeout"|"error",
     "reply": {...server JSON...} or null, "elapsed": seconds,
     "sport": local port or null, "error": "ExceptionName: text" or null}

Outcomes: ECONNREFUSED (TCP RST, ICMP port unreachable) -> "refused";
EHOSTUNREACH / ENETUNREACH / EACCES (ICMP host/net unreachable, admin
prohibited, no route) -> "unreachable"; no answer within --timeout ->
"timeout"; anything else (reset after connect, garbage reply, EPERM from a
local drop ...) -> "error".

ICMP errors are read from the socket error queue (IP_RECVERR/IPV6_RECVERR).
This matters for TCP over veth: the ICMP answering a SYN is processed while
connect() still holds the socket lock, so the kernel drops it for the TCP
state machine (TcpExtLockDroppedIcmps) and would only give up after the SYN
retransmission a second later; the error queue still gets it at once.
"""

import argparse
import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import time

# Linux values (not exported by every Python).
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)

OUTCOME_BY_ERRNO = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EACCES: "unreachable",  # ICMPv6 administratively prohibited
    errno.ETIMEDOUT: "timeout",
}


def classify(exc):
    """Map an exception raised by an attempt to an outcome string."""
    if isinstance(exc, TimeoutError) and exc.errno is None:  # socket timeout
        return "timeout"
    return OUTCOME_BY_ERRNO.get(getattr(exc, "errno", None), "error")


def queued_icmp_error(sock):
    """errno of the first ICMP error in the socket's error queue, or 0."""
    try:
        _, anc, _, _ = sock.recvmsg(1, 512, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    for level, ctype, data in anc:
        if (level, ctype) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            return struct.unpack_from("=I", data)[0]  # sock_extended_err.ee_errno
    return 0


def tcp_connect(sock, addr, remaining):
    """Non-blocking connect that also honours ICMP errors from the error queue."""
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    poller = select.poll()
    poller.register(sock, select.POLLOUT)  # POLLERR/POLLHUP are always reported
    while err in (errno.EINPROGRESS, errno.EAGAIN):
        if not poller.poll(remaining() * 1000):
            continue  # remaining() raises once the deadline has passed
        err = queued_icmp_error(sock) or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            try:
                sock.getpeername()
            except OSError:  # woken up, but not connected yet
                err = errno.EINPROGRESS
    if err:
        raise OSError(err, os.strerror(err))


def attempt(args, family, addr, keep):
    """One connection attempt; returns the result dict."""
    start = time.monotonic()
    deadline = start + args.timeout
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    res = {"outcome": "ok", "reply": None, "elapsed": None, "sport": None, "error": None}

    def remaining():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    sock = None
    try:
        sock = socket.socket(family, kind)
        if family == socket.AF_INET6:  # report every ICMP error, see above
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        if args.source:
            sock.bind((args.source, 0))
        if kind == socket.SOCK_STREAM:
            tcp_connect(sock, addr, remaining)
            res["sport"] = sock.getsockname()[1]
            data = b""
            while not data.endswith(b"\n"):
                sock.settimeout(remaining())
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        else:
            sock.connect(addr)
            res["sport"] = sock.getsockname()[1]
            sock.send(b"probe\n")
            sock.settimeout(remaining())
            data = sock.recv(65535)
        res["reply"] = json.loads(data)
        keep.append(sock)  # hold the source port until the run is over
    except (OSError, ValueError) as exc:
        res["outcome"] = classify(exc)
        res["error"] = f"{type(exc).__name__}: {exc}"
        if sock is not None:  # no SYN retransmissions after we gave up
            res["sport"] = sock.getsockname()[1] or None
            sock.close()
    res["elapsed"] = round(time.monotonic() - start, 6)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--source", default=None, help="local address to send from")
    args = ap.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # we hold one socket per attempt
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    family, _, _, _, addr = socket.getaddrinfo(args.host, args.port, 0, kind)[0]
    keep = []
    try:
        results = [attempt(args, family, addr, keep) for _ in range(args.count)]
    finally:
        for sock in keep:
            sock.close()
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
