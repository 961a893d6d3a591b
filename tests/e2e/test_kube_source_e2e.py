"""``kproxy run --kubeconfig`` end to end: fake API server, real nft, real packets.

Where things run: kproxy runs as the real command inside the lab's node namespace
(``ip netns exec``), where it programs nftables. A new network namespace has a loopback
of its own, so the fake API server must listen *inside* that namespace to be reachable
on 127.0.0.1 from kproxy. The test process creates the server's listening socket from
a short-lived thread that first joins the node namespace (``setns(2)`` changes only the
calling thread's namespace; a socket stays in the namespace it was created in), so the
server's threads and its Python control methods (create, delete, drop_watches) stay in
the test process. Nothing runs or changes in the host namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import pytest

from apiserver import FakeAPIServer
from objects import answered_by, endpoint_slice, service

WEB = "172.30.1.10"
CLONE_NEWNET = 0x40000000


def start_in_netns(server: FakeAPIServer, netns: str) -> None:
    """Start ``server`` with its listening socket in network namespace ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    errors = []

    def enter_and_start():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            server.start()
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=enter_and_start, name="netns-apiserver")
    t.start()
    t.join()
    if errors:
        raise errors[0]


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def api_kproxy(clean):
    """The fake API server in the node namespace and ``kproxy run --kubeconfig`` watching it."""
    server = FakeAPIServer(bookmark_interval=1.0)
    start_in_netns(server, clean.node.name)
    kubeconfig = server.kubeconfig(clean.tmp / "kube-e2e.kubeconfig")
    config = clean.write_config("kube-e2e.yaml", nftables={"minSyncPeriod": "100ms"})
    try:
        with clean.run_kproxy("--kubeconfig", kubeconfig, "--config", config, log_name="kproxy-kube-e2e.log",
                              env={"HTTPS_PROXY": "", "HTTP_PROXY": "", "NO_PROXY": "127.0.0.1"}) as (proc, log_path):
            yield clean, server, proc, log_path
    finally:
        server.stop()


def test_run_kubeconfig_programs_and_keeps_programming_the_datapath(api_kproxy):
    cluster, server, proc, log_path = api_kproxy

    def ruleset():
        assert proc.poll() is None, f"kproxy exited:\n{log_path.read_text()}"
        return cluster.ruleset()

    def log_text():
        return log_path.read_text()

    wait_for(lambda: "initial lists complete" in log_text(), 15, "the initial lists")
    wait_for(lambda: "table ip kproxy" in ruleset(), 10, "the first sync")
    assert WEB not in ruleset()

    t0 = time.monotonic()
    server.create(service("web", WEB, [("http", "TCP", 80)]))
    server.create(endpoint_slice("web", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)]))
    t1 = wait_for(lambda: WEB in ruleset() and "10.0.2.2" in ruleset(), 3, "the ClusterIP in the ruleset")
    print(f"create -> rules in the kernel: {t1 - t0:.2f}s")
    counts = answered_by(cluster.client.probe(WEB, 80, "tcp", count=30))
    assert set(counts) == {"pod-a", "pod-b"}, counts

    # the connection drops in mid-watch; later events still arrive
    assert server.drop_watches() >= 2
    server.apply(endpoint_slice("web", ["10.0.1.2"], [("http", "TCP", 8080)]))
    wait_for(lambda: "10.0.2.2" not in ruleset(), 5, "pod-b's endpoint to leave the ruleset")
    counts = answered_by(cluster.client.probe(WEB, 80, "tcp", count=10))
    assert counts == {"pod-a": 10}, counts

    server.delete("Service", "demo", "web")
    server.delete("EndpointSlice", "demo", "web-slice")
    wait_for(lambda: WEB not in ruleset(), 3, "the ClusterIP to leave the ruleset")
    assert "table ip kproxy" in ruleset()
    assert "Traceback" not in log_text()
