"""Tests of the namespace lab itself (no nftables rules involved; needs root)."""

import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netlab  # noqa: E402

pytestmark = pytest.mark.skipif(netlab.available() is not None, reason=str(netlab.available()))


def netns_list():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid):
    return os.path.exists(f"/proc/{pid}")


@pytest.fixture(scope="module")
def lab():
    with netlab.Lab() as lab:
        lab.pod("pod-a", "10.0.1.2/24", gw="10.0.1.1/24", v6="fd00:1::2/64", gw6="fd00:1::1/64")
        pb = lab.pod("pod-b", "10.0.2.2/24", gw="10.0.2.1/24", v6="fd00:2::2/64", gw6="fd00:2::1/64")
        lab.pod("ext", "192.168.50.2/24", gw="192.168.50.1/24")
        pb.serve(8080, proto="both", name="pod-b")
        yield lab


def assert_all_ok(results, name, local, peer, count):
    assert len(results) == count
    for r in results:
        assert r.ok, r
        assert (r.name, r.local, r.peer, r.peer_port) == (name, local, peer, r.sport)
    assert len({r.sport for r in results}) == count  # each attempt is its own flow


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_pod_to_pod_through_node(lab, proto):
    pa, pb = lab.pods["pod-a"], lab.pods["pod-b"]
    assert_all_ok(pa.probe(pb.addr, 8080, proto=proto, count=20), "pod-b", "10.0.2.2", "10.0.1.2", 20)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv6(lab, proto):
    pa, pb = lab.pods["pod-a"], lab.pods["pod-b"]
    assert_all_ok(pa.probe(pb.addr6, 8080, proto=proto, count=5), "pod-b", "fd00:2::2", "fd00:1::2", 5)


def test_external_and_node_clients(lab):
    pb = lab.pods["pod-b"]
    assert_all_ok(lab.pods["ext"].probe(pb.addr, 8080, count=3), "pod-b", "10.0.2.2", "192.168.50.2", 3)
    assert lab.node() is lab.node
    assert_all_ok(lab.node.probe(pb.addr, 8080, proto="udp", count=3), "pod-b", "10.0.2.2", "10.0.2.1", 3)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_node_server_on_extra_address(lab, proto):
    """A server in the node answers on an address added to lo (UDP replies from it too)."""
    if "192.168.99.1" not in lab.node.run(["ip", "-4", "addr", "show", "dev", "lo"]).stdout:
        lab.node.add_address("192.168.99.1/32")
        lab.node.serve(9090, proto="both", name="node")
    res = lab.pods["ext"].probe("192.168.99.1", 9090, proto=proto, count=3)
    assert_all_ok(res, "node", "192.168.99.1", "192.168.50.2", 3)


def test_extra_pod_address_on_dummy_and_source(lab):
    pa, pb = lab.pods["pod-a"], lab.pods["pod-b"]
    pb.add_address("10.0.2.100/32", dev="extra0")
    pa.add_address("10.0.1.50/32")
    res = pa.probe("10.0.2.100", 8080, proto="udp", source="10.0.1.50", count=2)
    assert_all_ok(res, "pod-b", "10.0.2.100", "10.0.1.50", 2)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_closed_port_is_refused_quickly(lab, proto):
    res = lab.pods["pod-a"].probe(lab.pods["pod-b"].addr, 1, proto=proto, count=3, timeout=2.0)
    assert [r.outcome for r in res] == ["refused"] * 3
    assert all(r.elapsed < 0.5 for r in res)


@pytest.mark.parametrize("host", ["10.99.0.1", "10.0.2.99", "fd00:99::1"])
def test_no_host_times_out(lab, host):
    res = lab.pods["pod-a"].probe(host, 80, count=1, timeout=0.3)
    assert all(r.outcome in ("timeout", "unreachable") for r in res), res
    assert all(r.elapsed < 0.6 for r in res)


def test_no_route_without_uplink_is_unreachable():
    with netlab.Lab(node_uplink=False) as lab:
        pa = lab.pod("a", v6="fd00:1::2/64")
        assert (pa.addr, pa.gw, pa.addr6, pa.gw6) == ("10.0.1.2", "10.0.1.1", "fd00:1::2", "fd00:1::1")
        res = [r for host in ("10.99.0.1", "fd00:99::1") for proto in ("tcp", "udp")
               for r in pa.probe(host, 80, proto=proto, timeout=1.0)]
        assert [r.outcome for r in res] == ["unreachable"] * 4, res
        assert all(r.elapsed < 0.5 for r in res)


def test_add_and_remove_pod(lab):
    pa = lab.pods["pod-a"]
    pc = lab.pod("pod-c")  # auto address 10.0.<N>.2/24
    server = pc.serve(80, name="c")
    assert pa.probe(pc.addr, 80)[0].name == "c"
    lab.remove_pod("pod-c")
    assert pc.name not in netns_list() and pc.name not in lab.namespaces()
    assert not pid_alive(server.pid)
    assert pa.probe(pc.addr, 80, timeout=0.3)[0].outcome in ("timeout", "unreachable")


def test_close_removes_namespaces_and_processes():
    with netlab.Lab() as lab, netlab.Lab() as other:
        assert other.prefix != lab.prefix
        for l in (lab, other):  # same names and addresses in both labs: isolated
            pod = l.pod("pod-a", "10.0.1.2/24")
            pod.serve(80, proto="both")
            l.node.serve(81)
            assert pod.probe("10.0.1.1", 81)[0].ok
            assert l.node.probe("10.0.1.2", 80, proto="udp")[0].ok
        other.close()
        assert not [n for n in netns_list() if n.startswith(other.prefix + "-")]
        assert sorted(n for n in netns_list() if n.startswith(lab.prefix + "-")) == sorted(lab.namespaces())
        assert all(pid_alive(p) for p in lab.started_pids)
        pids = lab.started_pids + other.started_pids
    assert not [n for n in netns_list() if n.startswith(lab.prefix + "-")]
    assert len(pids) == 4 and not any(pid_alive(p) for p in pids)
    lab.close()  # idempotent


def test_atexit_cleanup():
    """A lab that is never closed is cleaned up when the interpreter exits."""
    code = textwrap.dedent("""
        import netlab
        lab = netlab.Lab()
        lab.pod("x").serve(80)
        print(lab.prefix, *lab.started_pids)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split()
    prefix, pids = out[0], [int(p) for p in out[1:]]
    assert not [n for n in netns_list() if n.startswith(prefix + "-")]
    assert pids and not any(pid_alive(p) for p in pids)


REJECT_RULES = """
table ip t {
    chain forward_reject {
        type filter hook forward priority 0;
        tcp dport 81 reject with tcp reset
        meta l4proto { tcp, udp } th dport 82 reject with icmp port-unreachable
        meta l4proto { tcp, udp } th dport 83 reject with icmp admin-prohibited
    }
}
table ip6 t {
    chain forward_reject {
        type filter hook forward priority 0;
        meta l4proto { tcp, udp } th dport 82 reject with icmpv6 port-unreachable
        meta l4proto { tcp, udp } th dport 83 reject with icmpv6 admin-prohibited
    }
}
"""


@pytest.mark.skipif(not netlab.shutil.which("nft"), reason="needs nft")
def test_rejects_are_classified_and_not_rate_limited():
    """TCP reset / ICMP errors from the node are reported at once for every attempt."""
    with netlab.Lab() as lab:
        pa = lab.pod("a", v6="fd00:1::2/64")
        pb = lab.pod("b", v6="fd00:2::2/64")
        lab.node.run(["nft", "-f", "-"], input=REJECT_RULES)
        cases = [(host, proto, port, want)
                 for host in (pb.addr, pb.addr6) for proto in ("tcp", "udp")
                 for port, want in ((82, "refused"), (83, "unreachable"))]
        cases.append((pb.addr, "tcp", 81, "refused"))
        for host, proto, port, want in cases:
            res = pa.probe(host, port, proto=proto, count=10, timeout=1.0)
            assert [r.outcome for r in res] == [want] * 10, (host, proto, port, res)
            assert max(r.elapsed for r in res) < 0.5
