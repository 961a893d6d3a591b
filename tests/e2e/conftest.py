"""Fixtures for end-to-end tests: one network-namespace cluster for the whole suite.

Topology (see tests/netlab.py): a node namespace routing between pod-a (10.0.1.2) and
pod-b (10.0.2.2), which serve TCP 8080 and UDP 5353, a client pod inside the cluster
CIDR (10.0.3.2) and an external client (192.168.50.2). kproxy runs in the node
namespace, as the real command (``python -m kproxy``), on manifests the tests write.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import netlab
from objects import write_manifests

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = Path(__file__).resolve().parent / "plugins"
CLUSTER_CIDR = "10.0.0.0/16"
NODE = "node-1"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)


class Cluster:
    def __init__(self, lab, tmp: Path):
        self.lab = lab
        self.node = lab.node
        self.tmp = tmp
        self.pod_a = lab.pod("pod-a", "10.0.1.2/24", gw="10.0.1.1/24")
        self.pod_b = lab.pod("pod-b", "10.0.2.2/24", gw="10.0.2.1/24")
        self.client = lab.pod("client", "10.0.3.2/24", gw="10.0.3.1/24")
        self.ext = lab.pod("ext", "192.168.50.2/24", gw="192.168.50.1/24")
        for pod in (self.pod_a, self.pod_b):
            pod.serve(8080, "tcp", name=pod.label)
            pod.serve(5353, "udp", name=pod.label)
        self.config = self.write_config()

    def write_config(self, name="kproxy.yaml", **fields) -> Path:
        """Write a KubeProxyConfiguration (the base one plus ``fields``, by their API
        names, e.g. ``nodePortAddresses=[...]``; a value of None removes the field)."""
        cfg = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
               "hostnameOverride": NODE, "clusterCIDR": CLUSTER_CIDR}
        cfg.update(fields)
        path = self.tmp / name
        path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
        return path

    def kproxy(self, *args, check=True, env=None) -> subprocess.CompletedProcess:
        """Run the kproxy command in the node namespace."""
        full_env = {**os.environ, "PYTHONPATH": str(PLUGIN_DIR), **(env or {})}
        argv = self.node.exec_argv([sys.executable, "-m", "kproxy", *args])
        proc = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kproxy {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def sync(self, objects, *extra, name="state", config=None) -> subprocess.CompletedProcess:
        """Write ``objects`` as manifests and run ``kproxy run --once`` on them.

        ``config`` (a dict of KubeProxyConfiguration fields) replaces the base
        configuration's fields for this run; by default the base file is used.
        """
        path = write_manifests(self.tmp / name, objects)
        cfg = self.config if config is None else self.write_config(f"{name}-config.yaml", **config)
        return self.kproxy("run", "--once", "--config", str(cfg), "--manifests", str(path), *extra)

    @contextlib.contextmanager
    def run_kproxy(self, *args, log_name="kproxy-run.log", env=None):
        """``kproxy run ARGS`` as a long-running process in the node namespace; yields
        (process, log path); SIGTERM (then SIGKILL) at exit."""
        log_path = self.tmp / log_name
        with open(log_path, "a") as log:
            proc = self.node.popen([sys.executable, "-m", "kproxy", "run", *map(str, args)], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            yield proc, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def ruleset(self) -> str:
        return self.node.run(["nft", "list", "ruleset"]).stdout


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = netlab.available()
    if reason:
        pytest.skip(f"network-namespace tests cannot run here: {reason}")
    with netlab.Lab() as lab:
        yield Cluster(lab, tmp_path_factory.mktemp("e2e"))


@pytest.fixture
def clean(cluster):
    """A node namespace without kproxy tables before and after the test."""
    cluster.kproxy("cleanup")
    yield cluster
    cluster.kproxy("cleanup")
