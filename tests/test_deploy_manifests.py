"""The deployment under examples/deploy: the fields that make kproxy work in a cluster."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from kproxy import config as configmod

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "examples" / "deploy"


@pytest.fixture(scope="module")
def objects():
    out = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def daemonset(objects):
    return objects[("DaemonSet", "kproxy")]


@pytest.fixture(scope="module")
def container(daemonset):
    (c,) = daemonset["spec"]["template"]["spec"]["containers"]
    return c


def test_image_is_the_one_the_dockerfile_builds(container):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"].rsplit("/", 1)[-1] == f"kproxy:{version}"
    docker = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"apt-get install .*\bnftables\b", docker)
    assert "pip install" in docker and 'ENTRYPOINT ["kproxy"]' in docker
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"!core/**", "!plugins/**", "!pyproject.toml"} <= set(ignore)


def test_pod_runs_in_the_host_network_with_net_admin_only(daemonset, container):
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not any("xtables" in str(v) for v in pod.get("volumes", []))
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


def test_node_name_and_api_address_come_from_the_pod_spec(container):
    args = container["args"]
    assert args[0] == "run" and "--hostname-override=$(NODE_NAME)" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["KUBERNETES_SERVICE_HOST"]["value"] and env["KUBERNETES_SERVICE_PORT"]["value"].isdigit()
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/livez" and probe["port"] == 10256


def test_config_is_mounted_where_kproxy_reads_it(objects, daemonset, container):
    config_arg = next(a for a in container["args"] if a.startswith("--config"))
    path = Path(config_arg.split("=", 1)[1] if "=" in config_arg else container["args"][container["args"].index(config_arg) + 1])
    pod = daemonset["spec"]["template"]["spec"]
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = objects[("ConfigMap", volume["configMap"]["name"])]
    assert cm["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    text = cm["data"][path.name]
    warnings = []
    cfg = configmod.from_dict(yaml.safe_load(text), warn=warnings.append)
    assert warnings == [] and cfg.kubeconfig == ""  # no kubeconfig: in-cluster configuration
    assert cfg.cluster_cidrs and cfg.healthz_bind_address.endswith(":10256")
    # the image's default command reads the same path
    cmd = re.search(r"^CMD (.*)$", (DEPLOY / "Dockerfile").read_text(), re.M)[1]
    assert str(path) in cmd


def test_rbac_grants_what_the_reflectors_use(objects, daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    sa = objects[("ServiceAccount", pod["serviceAccountName"])]
    assert sa["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    role = objects[("ClusterRole", "kproxy")]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    for group, resource in (("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices"),
                            ("networking.k8s.io", "servicecidrs")):
        assert {(group, resource, "list"), (group, resource, "watch")} <= granted, resource
    assert {("", "events", "create"), ("", "events", "patch")} <= granted
    # nothing that writes what kproxy only reads, and no wildcards
    writes = {(g, r) for g, r, v in granted if v not in ("get", "list", "watch")}
    assert writes <= {("", "events"), ("events.k8s.io", "events")}
    assert not any("*" in (g, r, v) for g, r, v in granted)
    binding = objects[("ClusterRoleBinding", "kproxy")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kproxy"}
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in binding["subjects"]


def test_reflector_paths_match_the_rbac(objects):
    """Every collection the source watches is granted list and watch."""
    from kproxy.sources.kube import resources

    role = objects[("ClusterRole", "kproxy")]
    for r in resources("node-1"):
        parts = r.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        assert any(group in rule["apiGroups"] and parts[-1] in rule["resources"]
                   and {"list", "watch"} <= set(rule["verbs"]) for rule in role["rules"]), r.path


def test_guide_covers_replacing_and_rolling_back():
    text = (DEPLOY / "README.md").read_text()
    for needle in ("kube-proxy --cleanup", "kproxy cleanup", "nodeSelector", "--skip-phases=addon/kube-proxy",
                   "Rolling back", "xtables.lock", "NET_ADMIN", "NET_RAW"):
        assert needle in text, needle
