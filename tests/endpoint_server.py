#!/usr/bin/env python3
"""Tiny test endpoint: tells every client who answered and what it saw.

Usage::

    python tests/endpoint_server.py --name NAME --port P --proto tcp|udp|both [--bind ADDR]

Without ``--bind`` it listens on the wildcard address with one dual-stack
IPv6 socket (IPv4 arrives as v4-mapped addresses, reported in plain dotted
form); if IPv6 is unavailable it falls back to ``0.0.0.0``.

Every TCP connection gets one JSON line and is closed; every UDP datagram is
answered with the same JSON line::

    {"name": NAME, "local": "<address the packet arrived on>",
     "peer": "<client address>", "peer_port": N}

UDP replies are sent from the address the datagram arrived on (IP_PKTINFO /
IPV6_PKTINFO), so clients talking to a secondary address get a valid answer.
Prints ``ready`` on stdout once all sockets are listening.  A single
selector loop serves everything; each request costs one small write.
"""

import argparse
import ipaddress
import json
import selectors
import socket
import struct
import sys

# Linux values; Python 3.11 does not export IP_PKTINFO.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


def plain(addr):
    """Normalize an address: drop the zone, unwrap ``::ffff:a.b.c.d``."""
    ip = ipaddress.ip_address(addr.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def reply(name, local, peer):
    """The JSON line sent to a client."""
    msg = {"name": name, "local": plain(local), "peer": plain(peer[0]), "peer_port": peer[1]}
    return json.dumps(msg).encode() + b"\n"


def open_socket(kind, port, bind):
    """Create one bound (and, for TCP, listening) non-blocking socket."""
    if bind:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        host = bind
    elif socket.has_ipv6:
        family, host = socket.AF_INET6, "::"
    else:
        family, host = socket.AF_INET, "0.0.0.0"
    try:
        sock = socket.socket(family, kind)
    except OSError:
        if bind or family == socket.AF_INET:
            raise
        family, host = socket.AF_INET, "0.0.0.0"  # kernel without IPv6
        sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        if not bind:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_DGRAM:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    if kind == socket.SOCK_DGRAM:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # also for v4 on a dual-stack socket
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


def serve_tcp(lsock, name):
    """Accept every pending connection, answer it and close it."""
    while True:
        try:
            conn, peer = lsock.accept()
        except BlockingIOError:
            return
        except OSError:
            return  # e.g. ECONNABORTED; the selector calls us again if more is pending
        with conn:
            try:
                conn.settimeout(1.0)
                conn.sendall(reply(name, conn.getsockname()[0], peer))
            except OSError:
                pass


def serve_udp(sock, name):
    """Answer every pending datagram from the address it was sent to."""
    while True:
        try:
            _, anc, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(64))
        except OSError:
            return
        local, cmsg = sock.getsockname()[0], []
        for level, ctype, data in anc:
            if level == socket.IPPROTO_IPV6 and ctype == IPV6_PKTINFO:
                local = socket.inet_ntop(socket.AF_INET6, data[:16])
                cmsg = [(level, ctype, data[:16] + struct.pack("@I", 0))]
            elif level == socket.IPPROTO_IP and ctype == IP_PKTINFO:
                _, _, dst = struct.unpack("@i4s4s", data[:12])
                local = socket.inet_ntop(socket.AF_INET, dst)
                cmsg = [(level, ctype, struct.pack("@i4s4s", 0, dst, bytes(4)))]
        try:
            sock.sendmsg([reply(name, local, peer)], cmsg, 0, peer)
        except OSError:
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proto", choices=("tcp", "udp", "both"), default="tcp")
    ap.add_argument("--bind", default=None, help="address to bind (default: wildcard)")
    args = ap.parse_args(argv)

    sel = selectors.DefaultSelector()
    if args.proto in ("tcp", "both"):
        sel.register(open_socket(socket.SOCK_STREAM, args.port, args.bind), selectors.EVENT_READ, serve_tcp)
    if args.proto in ("udp", "both"):
        sel.register(open_socket(socket.SOCK_DGRAM, args.port, args.bind), selectors.EVENT_READ, serve_udp)
    print("ready", flush=True)
    try:
        while True:
            for key, _ in sel.select():
                key.data(key.fileobj, args.name)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
