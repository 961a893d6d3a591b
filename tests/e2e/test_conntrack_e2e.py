"""UDP conntrack cleanup with real conntrack entries (plugin conntrack-cleanup).

A client in the client pod sends UDP datagrams to a ClusterIP from fixed source ports,
so each source port keeps one conntrack entry in the node namespace, DNATed to pod-a or
pod-b. Every ``kproxy run --once`` is a fresh process doing a full sync, so the plugin
has to find the stale entries without any memory of the previous run.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from objects import endpoint_slice, service

DNS = "172.30.0.53"
ADDRS = {"pod-a": "10.0.1.2", "pod-b": "10.0.2.2"}
SPORTS = list(range(40100, 40112))

SENDER = r"""
import json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
out = {}
for sport in map(int, sys.argv[3].split(",")):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport))
    s.settimeout(1.0)
    names = []
    for _ in range(count):
        s.sendto(b"q", (host, port))
        try:
            names.append(json.loads(s.recv(4096))["name"])
        except (socket.timeout, ConnectionRefusedError):
            names.append("timeout")
    s.close()
    out[sport] = names
print(json.dumps(out))
"""

ENTRY = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+) .*?src=(\S+) dst=\S+ sport=\d+ dport=\d+")


def send(cluster, sports, count=3) -> dict[int, list[str]]:
    """Who answered each datagram, by client source port."""
    out = cluster.client.run([sys.executable, "-c", SENDER, DNS, 53, ",".join(map(str, sports)), count]).stdout
    return {int(k): v for k, v in json.loads(out).items()}


def entries(cluster) -> dict[int, str]:
    """UDP conntrack entries of the client to the ClusterIP: source port -> reply source."""
    out = cluster.node.run(["conntrack", "-L", "-p", "udp"], check=False).stdout
    found = {}
    for line in out.splitlines():
        m = ENTRY.search(line)
        if m and m.group(1) == cluster.client.addr and m.group(2) == DNS and m.group(4) == "53":
            found[int(m.group(3))] = m.group(5)
    return found


@pytest.fixture
def clean(clean):
    """No UDP conntrack entries of the client left from earlier tests."""
    clean.node.run(["conntrack", "-D", "-p", "udp", "-s", clean.client.addr], check=False)
    yield clean
    clean.node.run(["conntrack", "-D", "-p", "udp", "-s", clean.client.addr], check=False)


def dns(*endpoints):
    objs = [service("dns", DNS, [("dns", "UDP", 53)])]
    if endpoints is not None:
        objs.append(endpoint_slice("dns", [ADDRS[e] for e in endpoints], [("dns", "UDP", 5353)]))
    return objs


def flows_to_both(cluster) -> dict[int, str]:
    """Send from every source port until both endpoints hold some flows; returns the
    conntrack entries (source port -> endpoint address)."""
    answers = send(cluster, SPORTS)
    for sport, names in answers.items():
        assert len(set(names)) == 1 and names[0] in ADDRS, (sport, names)  # one entry: one endpoint
    assert {n[0] for n in answers.values()} == set(ADDRS), answers  # P(all 12 on one side) = 1/2048
    found = entries(cluster)
    assert found == {sport: ADDRS[names[0]] for sport, names in answers.items()}, found
    return found


def test_removed_endpoint_loses_exactly_its_entries_and_the_flow_moves(clean):
    clean.sync(dns("pod-a", "pod-b"))
    before = flows_to_both(clean)
    on_a = sorted(p for p, ip in before.items() if ip == ADDRS["pod-a"])

    clean.sync(dns("pod-b"))  # a fresh process: a full sync
    after = entries(clean)
    assert after == {p: ip for p, ip in before.items() if ip == ADDRS["pod-b"]}, after

    answers = send(clean, on_a)  # the same source ports now reach the remaining endpoint
    assert all(names == ["pod-b"] * 3 for names in answers.values()), answers
    assert set(entries(clean).values()) == {ADDRS["pod-b"]}


def test_scaled_to_zero_loses_every_entry(clean):
    clean.sync(dns("pod-a", "pod-b"))
    flows_to_both(clean)
    clean.sync(dns())
    assert entries(clean) == {}


def test_removed_service_loses_every_entry_to_its_clusterip(clean):
    clean.sync(dns("pod-a", "pod-b"))
    flows_to_both(clean)
    clean.sync([service("web", "172.30.0.10", [("http", "TCP", 80)])])  # a new process knows no "dns"
    assert entries(clean) == {}


def test_unrelated_service_change_keeps_the_entries(clean):
    clean.sync(dns("pod-a", "pod-b"))
    before = flows_to_both(clean)
    clean.sync([*dns("pod-a", "pod-b"), service("web", "172.30.0.10", [("http", "TCP", 80)])])
    assert entries(clean) == before


NETLINK_CHECK = r"""
import json
from kproxy_plugins.conntrack_cleanup import NetlinkConntrack
nc = NetlinkConntrack()
out = {"v6": [[f.dst, f.dport, f.reply_src] for f in nc.list_udp(6, "fd00:30::53", 53)],
       "v4": [[f.dst, f.dport, f.reply_src, f.ref[4]] for f in nc.list_udp(4, "172.30.9.53", 53)]}
v4 = nc.list_udp(4, "172.30.9.53")
out["deleted"] = nc.delete(4, v4) + nc.delete(6, nc.list_udp(6, "fd00:30::53"))
out["again"] = nc.delete(4, v4)  # already gone: no error, nothing deleted
out["left"] = len(nc.list_udp(4, "172.30.9.53")) + len(nc.list_udp(6, "fd00:30::53"))
print(json.dumps(out))
"""


def test_netlink_client_lists_filters_and_deletes_in_zones_and_ipv6(clean):
    clean.sync(dns("pod-a"))  # kproxy's tables: conntrack is active in the node namespace
    insert = ["conntrack", "-I", "-p", "udp", "-t", "100"]
    for argv in (["-s", "10.0.3.9", "-d", "172.30.9.53", "--sport", "4000", "--dport", "53", "-r", "10.0.1.2",
                  "-q", "10.0.3.9", "--reply-port-src", "5353", "--reply-port-dst", "4000"],
                 ["-s", "10.0.3.9", "-d", "172.30.9.53", "--sport", "4001", "--dport", "53", "-r", "10.0.1.2",
                  "-q", "10.0.3.9", "--reply-port-src", "5353", "--reply-port-dst", "4001", "-w", "7"],
                 ["-s", "10.0.3.9", "-d", "172.30.9.53", "--sport", "4002", "--dport", "54", "-r", "10.0.2.2",
                  "-q", "10.0.3.9", "--reply-port-src", "5353", "--reply-port-dst", "4002"],
                 ["-s", "fd00:3::9", "-d", "fd00:30::53", "--sport", "4000", "--dport", "53", "-r", "fd00:1::2",
                  "-q", "fd00:3::9", "--reply-port-src", "5353", "--reply-port-dst", "4000"],
                 ["-s", "fd00:3::9", "-d", "fd00:30::54", "--sport", "4001", "--dport", "53", "-r", "fd00:1::2",
                  "-q", "fd00:3::9", "--reply-port-src", "5353", "--reply-port-dst", "4001"]):
        clean.node.run(insert + argv)
    try:
        out = json.loads(clean.node.run([sys.executable, "-c", NETLINK_CHECK]).stdout)
    finally:
        clean.node.run(["conntrack", "-D", "-p", "udp", "-s", "10.0.3.9"], check=False)
        clean.node.run(["conntrack", "-D", "-p", "udp", "-s", "fd00:3::9"], check=False)
    assert out["v6"] == [["fd00:30::53", 53, "fd00:1::2"]]
    assert sorted(out["v4"]) == [["172.30.9.53", 53, "10.0.1.2", 0], ["172.30.9.53", 53, "10.0.1.2", 7]]
    assert out["deleted"] == 4 and out["again"] == 0 and out["left"] == 0
