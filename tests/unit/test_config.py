"""The KubeProxyConfiguration file (kproxy.config) and its use through the command line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from kproxy_plugins import DEFAULT_PLUGINS
from click.testing import CliRunner

from kproxy import config as configmod
from kproxy.cli import cli
from kproxy.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"

GOOD = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: " Node-1 "
clusterCIDR: 10.0.0.0/16,fd00:10::/56
detectLocalMode: InterfaceNamePrefix
detectLocal:
  bridgeInterface: cbr0
  interfaceNamePrefix: veth
nodePortAddresses: [192.168.0.0/16, "fd00::/64"]
bindAddress: 0.0.0.0
metricsBindAddress: 0.0.0.0:10249
healthzBindAddress: "[::]:10256"
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
  burst: 0
nftables:
  masqueradeAll: true
  masqueradeBit: 15
  syncPeriod: 1m0s
  minSyncPeriod: 500ms
  fastpathPacketThreshold: 20
iptables:
  masqueradeBit: 14
  syncPeriod: 30s
ipvs:
  scheduler: rr
conntrack:
  maxPerCore: null
  min: null
kproxy:
  plugins: [fastpath]
  disablePlugins: [interfaces]
  fastpath:
    packetThreshold: 10
    enabled: true
"""


def load_text(tmp_path, text, warnings=None):
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(textwrap.dedent(text))
    return configmod.load(str(path), warn=(warnings.append if warnings is not None else _no_warning))


def _no_warning(message):
    raise AssertionError(f"unexpected warning: {message}")


def from_dict(data, warnings=None):
    return configmod.from_dict(data, warn=(warnings.append if warnings is not None else _no_warning))


def test_good_file_with_every_supported_field(tmp_path):
    cfg = load_text(tmp_path, GOOD)
    assert cfg.node_name == "node-1"
    assert cfg.cluster_cidrs == ("10.0.0.0/16", "fd00:10::/56")
    assert cfg.cluster_cidr(4) == "10.0.0.0/16" and cfg.cluster_cidr(6) == "fd00:10::/56"
    assert cfg.detect_local_mode == "InterfaceNamePrefix"
    assert cfg.bridge_interface == "cbr0" and cfg.interface_name_prefix == "veth"
    assert cfg.node_port_addresses == ("192.168.0.0/16", "fd00::/64")
    assert cfg.bind_address == "0.0.0.0"
    assert cfg.metrics_bind_address == "0.0.0.0:10249"
    assert cfg.healthz_bind_address == "[::]:10256"
    assert cfg.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert cfg.masquerade_all is True
    assert cfg.masquerade_bit == 15 and cfg.masquerade_mark == 0x8000
    assert cfg.sync_period == 60.0 and cfg.min_sync_period == 0.5
    assert cfg.plugins == ("fastpath",) and cfg.disable_plugins == ("interfaces",)
    assert cfg.plugin_config == {"fastpath": {"packetThreshold": 10, "enabled": True}}
    # nftables fields kube-proxy does not have are kept for the plugins that declare them
    assert cfg.kube_proxy_extra == {"fastpathPacketThreshold": 20}


def test_defaults(tmp_path):
    cfg = load_text(tmp_path, "kind: KubeProxyConfiguration\n")
    assert cfg.node_name  # the host name
    assert (cfg.cluster_cidrs, cfg.detect_local_mode, cfg.node_port_addresses) == ((), "ClusterCIDR", ("primary",))
    assert (cfg.masquerade_all, cfg.masquerade_bit, cfg.masquerade_mark) == (False, 14, 0x4000)
    assert (cfg.sync_period, cfg.min_sync_period) == (30.0, 1.0)
    assert (cfg.plugins, cfg.disable_plugins, cfg.plugin_config) == ((), (), {})
    assert cfg.cluster_cidr(4) is None
    assert load_text(tmp_path, "").masquerade_bit == 14  # an empty file is the defaults


def test_demo_config_loads():
    cfg = configmod.load(str(DEMO / "kproxy-config.yaml"), warn=_no_warning)
    assert cfg.node_name == "node-1" and cfg.cluster_cidrs == ("10.0.0.0/16",)


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("1m0s", 60.0), ("500ms", 0.5), ("1h30m", 5400.0), ("1.5s", 1.5), ("0s", 0.0),
    ("250us", 0.00025), ("0", 0.0), (30, 30.0), (0.5, 0.5),
])
def test_durations(text, seconds):
    assert configmod.parse_duration(text, "nftables.syncPeriod") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "30", "abc", "30 s", "1d", "ms", "1m-5s", "-1s", "s30", -1, True])
def test_bad_durations(bad):
    with pytest.raises(ConfigError, match="^nftables.syncPeriod: "):
        configmod.parse_duration(bad, "nftables.syncPeriod")


def test_duration_fields_in_file(tmp_path):
    with pytest.raises(ConfigError, match="nftables.minSyncPeriod: invalid duration '1 minute'"):
        load_text(tmp_path, "nftables: {minSyncPeriod: 1 minute}\n")


@pytest.mark.parametrize("text, field", [
    ("portRange: 30000-32767\n", "portRange"),
    ("conntrack:\n  maxPerCore: 0\n  tcpEstablishedTimeout: 24h0m0s\n", "conntrack.tcpEstablishedTimeout"),
    ("featureGates: {SomeGate: true}\n", "featureGates.SomeGate"),
    ("oomScoreAdj: -999\n", "oomScoreAdj"),
])
def test_unsupported_field_warns_once_naming_it(tmp_path, text, field):
    warnings = []
    cfg = load_text(tmp_path, "kind: KubeProxyConfiguration\n" + text, warnings)
    assert len(warnings) == 1, warnings
    assert f"field {field} " in warnings[0] and "not supported" in warnings[0]
    assert cfg.masquerade_bit == 14


def test_zero_values_and_other_modes_do_not_warn(tmp_path):
    # a kube-proxy ConfigMap carries every field with its zero value, and the sections of other modes
    load_text(tmp_path, """\
        conntrack: {maxPerCore: null, min: null, tcpCloseWaitTimeout: null}
        featureGates: {}
        portRange: ""
        oomScoreAdj: 0
        showHiddenMetricsForVersion: ""
        iptables: {masqueradeAll: false, masqueradeBit: 14, syncPeriod: 30s}
        ipvs: {scheduler: rr, strictARP: true}
        winkernel: {networkName: x}
        """)


@pytest.mark.parametrize("text, message", [
    ("nftables: {masqueradeBit: 40}\n", "nftables.masqueradeBit: must be 0..31, got 40"),
    ("nftables: {masqueradeBit: '14'}\n", "nftables.masqueradeBit: must be an integer"),
    ("nftables: {masqueradeAll: 'yes'}\n", "nftables.masqueradeAll: must be true or false"),
    ("nftables: {syncPeriod: 0s}\n", "nftables.syncPeriod: must be greater than 0"),
    ("nftables: {syncPeriod: 1s, minSyncPeriod: 2s}\n", "nftables.minSyncPeriod"),
    ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR: invalid CIDR '10.0.0.0/33'"),
    ("clusterCIDR: not-a-cidr\n", "clusterCIDR: invalid CIDR 'not-a-cidr'"),
    ("clusterCIDR: 10.0.0.0/16,10.1.0.0/16\n", "clusterCIDR: at most one IPv4 and one IPv6 CIDR"),
    ("detectLocalMode: Foo\n", "detectLocalMode: must be one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix, got 'Foo'"),
    ("detectLocalMode: BridgeInterface\n", "detectLocal.bridgeInterface: required"),
    ("detectLocalMode: InterfaceNamePrefix\n", "detectLocal.interfaceNamePrefix: required"),
    ("nodePortAddresses: [10.0.0.0/8, bad]\n", "nodePortAddresses: invalid CIDR 'bad'"),
    ("nodePortAddresses: primary\n", "nodePortAddresses: must be a list"),
    ("metricsBindAddress: localhost:10249\n", "metricsBindAddress: invalid IP"),
    ("bindAddress: localhost\n", "bindAddress: invalid IP address 'localhost'"),
    ("healthzBindAddress: 0.0.0.0\n", "healthzBindAddress: must be IP:port"),
    ("hostnameOverride: 5\n", "hostnameOverride: must be a string"),
    ("apiVersion: kubeproxy.config.k8s.io/v1beta1\n", "apiVersion: expected kubeproxy.config.k8s.io/v1alpha1, got 'kubeproxy.config.k8s.io/v1beta1'"),
    ("kind: KubeletConfiguration\n", "kind: expected KubeProxyConfiguration, got 'KubeletConfiguration'"),
    ("mode: iptables\n", "mode: kproxy implements the nftables mode only, got 'iptables'"),
    ("mode: ipvs\n", "mode: kproxy implements the nftables mode only"),
    ("kproxy: [fastpath]\n", "kproxy: must be a mapping"),
    ("kproxy: []\n", "kproxy: must be a mapping"),
    ("kproxy: {plugins: fastpath}\n", "kproxy.plugins: must be a list of plugin names"),
    ("kproxy: {disablePlugins: [1]}\n", "kproxy.disablePlugins: must be a list of plugin names"),
    ("kproxy: {fastpath: 3}\n", "kproxy.fastpath: plugin options must be a mapping"),
    ("kproxy: {netlinkElements: 'no'}\n", "kproxy.netlinkElements: must be true or false, got 'no'"),
])
def test_invalid_values_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text, warnings=[])
    assert message in str(exc.value)


def test_unreadable_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        configmod.load(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_text(tmp_path, "a: [1,\n")
    with pytest.raises(ConfigError, match="expected a KubeProxyConfiguration mapping"):
        load_text(tmp_path, "- a\n- b\n")


def test_kproxy_section():
    cfg = from_dict({"kproxy": {"plugins": ["a", "b"], "disablePlugins": ["masquerade"],
                                "a": {"x": 1}, "b": {}}})
    assert cfg.plugins == ("a", "b")
    assert cfg.disable_plugins == ("masquerade",)
    assert cfg.plugin_config == {"a": {"x": 1}, "b": {}}
    assert cfg.netlink_elements is True
    assert from_dict({"kproxy": None}).plugins == ()
    assert from_dict({"kproxy": {"netlinkElements": False}}).netlink_elements is False


def test_replace_validates():
    cfg = from_dict({})
    assert cfg.replace(masquerade_bit=3).masquerade_mark == 8
    with pytest.raises(ConfigError, match="nftables.masqueradeBit"):
        cfg.replace(masquerade_bit=32)


# -- through the command line -----------------------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("text, field", [
    ("nftables: {masqueradeBit: 40}\n", "nftables.masqueradeBit"),
    ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR"),
    ("detectLocalMode: Foo\n", "detectLocalMode"),
    ("mode: iptables\n", "mode"),
    ("kproxy: {plugins: [no-such-plugin]}\n", "no-such-plugin"),
])
def test_cli_render_with_bad_config_exits_2(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" + text)
    result = run_cli("render", "--config", path, "--manifests", DEMO / "manifests")
    assert result.exit_code == 2, result.output
    assert "kproxy: error: " in result.stderr and field in result.stderr
    assert result.stdout == ""  # no half-rendered script


PROBE = """\
from kproxy import hookimpl
from kproxy.nft import Chain


@hookimpl
def kproxy_pre_render(ctx):
    ctx.declare(Chain("ip", ctx.table(4).name, "probe"))


@hookimpl
def kproxy_render_chain(ctx, chain):
    if ctx.owns(chain):
        return [f"ip saddr {ctx.config.cluster_cidr(4)} meta mark set {hex(ctx.config.masquerade_mark)}"]
"""
NO_BUILTINS = tuple(arg for name in DEFAULT_PLUGINS for arg in ("--disable-plugin", name))


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A plugin (``--plugin kproxy_unit_config_probe``) that shows two config values in a rule."""
    (tmp_path / "kproxy_unit_config_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return ("--plugin", "kproxy_unit_config_probe", *NO_BUILTINS)


def test_cli_render_warns_about_unsupported_field(tmp_path, probe):
    path = tmp_path / "cfg.yaml"
    path.write_text((DEMO / "kproxy-config.yaml").read_text() + "portRange: 30000-32767\n")
    result = run_cli("render", "--config", path, "--manifests", DEMO / "manifests", *probe)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("portRange") == 1
    assert "add rule ip kproxy probe ip saddr 10.0.0.0/16 meta mark set 0x4000" in result.stdout


def test_cli_flag_overrides_config_and_is_validated(probe):
    args = ("render", "--config", DEMO / "kproxy-config.yaml", "--manifests", DEMO / "manifests", *probe)
    result = run_cli(*args, "--cluster-cidr", "10.9.0.0/16")
    assert result.exit_code == 0, result.output
    assert "add rule ip kproxy probe ip saddr 10.9.0.0/16 meta mark set 0x4000" in result.stdout
    result = run_cli(*args, "--cluster-cidr", "10.9.0.0/33")
    assert result.exit_code == 2 and "--cluster-cidr: invalid CIDR '10.9.0.0/33'" in result.stderr


def test_cli_warns_about_unclaimed_nftables_field(tmp_path, probe):
    path = tmp_path / "cfg.yaml"
    path.write_text((DEMO / "kproxy-config.yaml").read_text().replace("masqueradeBit: 14", "masqueradeBitt: 15"))
    result = run_cli("render", "--config", path, "--manifests", DEMO / "manifests", *probe)
    assert result.exit_code == 0, result.output
    assert "meta mark set 0x4000" in result.stdout  # the default: the misspelt field did nothing
    assert "nftables.masqueradeBitt" in result.stderr
