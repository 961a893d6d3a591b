"""kproxy's configuration: a kube-proxy KubeProxyConfiguration file plus flags.

The file is kube-proxy's own format (``kubeproxy.config.k8s.io/v1alpha1``) so an operator
can hand kproxy the ConfigMap kube-proxy used. kproxy's own settings (which plugins run,
plugin options) live under a top-level ``kproxy:`` key that kube-proxy would not read.
Fields kproxy does not implement yet produce one warning each; invalid values raise
``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from dataclasses import dataclass, field

import yaml

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class Config:
    node_name: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    detect_local_mode: str = "ClusterCIDR"
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    node_port_addresses: tuple[str, ...] = ("primary",)
    bind_address: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    metrics_bind_address: str = "127.0.0.1:10249"
    healthz_bind_address: str = "0.0.0.0:10256"
    kubeconfig: str = ""
    plugins: tuple[str, ...] = ()
    disable_plugins: tuple[str, ...] = ()
    plugin_config: dict = field(default_factory=dict)  # plugin name -> {option: value}
    kube_proxy_extra: dict = field(default_factory=dict)  # unmapped nftables.* fields, for plugins
    netlink_elements: bool = True  # kproxy.netlinkElements: a new table's set elements through netlink

    @property
    def masquerade_mark(self) -> int:
        return 1 << self.masquerade_bit

    def cluster_cidr(self, version: int) -> str | None:
        return next((c for c in self.cluster_cidrs if ipaddress.ip_network(c).version == version), None)

    def replace(self, **changes) -> "Config":
        return validate(dataclasses.replace(self, **changes))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration(value, field_name: str) -> float:
    """A Go duration (``30s``, ``1m0s``, ``500ms``) or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        parts = _DURATION.findall(text)
        if text == "0":  # the one duration Go accepts without a unit
            parts = [("0", "s")]
        elif not text or "".join(n + u for n, u in parts) != text:
            raise ConfigError(f"{field_name}: invalid duration {value!r} (examples: 30s, 1m, 500ms)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds < 0:
        raise ConfigError(f"{field_name}: must not be negative")
    return seconds


def _cidr_list(value, field_name) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value or ())
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{field_name}: invalid CIDR {item!r}") from None
    return tuple(out)


def _host_port(value: str, field_name: str) -> str:
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{field_name}: must be IP:port, got {value!r}")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(f"{field_name}: invalid IP in {value!r}") from None
    return value


def validate(cfg: Config) -> Config:
    """Check the cross-field rules; return the config with derived defaults filled in."""
    versions = [ipaddress.ip_network(c).version for c in cfg.cluster_cidrs]
    if len(versions) > 2 or len(set(versions)) != len(versions):
        raise ConfigError("clusterCIDR: at most one IPv4 and one IPv6 CIDR")
    if cfg.detect_local_mode not in DETECT_LOCAL_MODES:
        raise ConfigError(f"detectLocalMode: must be one of {', '.join(DETECT_LOCAL_MODES)}, got {cfg.detect_local_mode!r}")
    if cfg.detect_local_mode == "BridgeInterface" and not cfg.bridge_interface:
        raise ConfigError("detectLocal.bridgeInterface: required when detectLocalMode is BridgeInterface")
    if cfg.detect_local_mode == "InterfaceNamePrefix" and not cfg.interface_name_prefix:
        raise ConfigError("detectLocal.interfaceNamePrefix: required when detectLocalMode is InterfaceNamePrefix")
    if not 0 <= cfg.masquerade_bit <= 31:
        raise ConfigError(f"nftables.masqueradeBit: must be 0..31, got {cfg.masquerade_bit}")
    if cfg.sync_period <= 0:
        raise ConfigError("nftables.syncPeriod: must be greater than 0")
    if cfg.min_sync_period > cfg.sync_period:
        raise ConfigError("nftables.minSyncPeriod: must not be greater than syncPeriod")
    if cfg.node_port_addresses != ("primary",):
        _cidr_list(cfg.node_port_addresses, "nodePortAddresses")
    if cfg.bind_address:
        try:
            ipaddress.ip_address(cfg.bind_address)
        except ValueError:
            raise ConfigError(f"bindAddress: invalid IP address {cfg.bind_address!r}") from None
    _host_port(cfg.metrics_bind_address, "metricsBindAddress")
    _host_port(cfg.healthz_bind_address, "healthzBindAddress")
    if not cfg.node_name:
        cfg = dataclasses.replace(cfg, node_name=socket.gethostname().lower())
    return cfg


# Fields kproxy reads, by their path in the file.
_SUPPORTED = {
    "apiVersion", "kind", "mode", "hostnameOverride", "clusterCIDR", "detectLocalMode",
    "detectLocal.bridgeInterface", "detectLocal.interfaceNamePrefix", "nodePortAddresses",
    "bindAddress", "metricsBindAddress", "healthzBindAddress", "clientConnection.kubeconfig",
    "nftables.masqueradeAll", "nftables.masqueradeBit", "nftables.syncPeriod", "nftables.minSyncPeriod",
    "kproxy",
}
# Sections that belong to other proxy modes: ignored without a warning.
_OTHER_MODES = ("iptables", "ipvs", "winkernel")


def _flatten(data: dict, prefix="") -> dict:
    out = {}
    for k, val in data.items():
        path = f"{prefix}{k}"
        if k == "kproxy" and not prefix:
            out[path] = val
        elif isinstance(val, dict) and val and path not in _SUPPORTED:
            out.update(_flatten(val, path + "."))
        else:
            out[path] = val
    return out


def load(path: str, warn=print) -> Config:
    """Read a KubeProxyConfiguration file; warn once per unsupported field."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return from_dict(data or {}, warn=warn, source=path)


def from_dict(data, warn=print, source="config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a KubeProxyConfiguration mapping")
    if data.get("kind", "KubeProxyConfiguration") != "KubeProxyConfiguration":
        raise ConfigError(f"kind: expected KubeProxyConfiguration, got {data.get('kind')!r}")
    if data.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(f"apiVersion: expected {API_VERSION}, got {data.get('apiVersion')!r}")
    if data.get("mode") not in (None, "", "nftables"):
        raise ConfigError(f"mode: kproxy implements the nftables mode only, got {data['mode']!r}")
    flat = _flatten(data)
    kw: dict = {}
    extra: dict = {}
    for path, val in flat.items():
        if path in _SUPPORTED or path.split(".")[0] in _OTHER_MODES:
            continue
        if path.startswith("nftables."):
            extra[path.split(".", 1)[1]] = val  # may be a plugin's (e.g. fastpathPacketThreshold)
            continue
        if val not in (None, "", [], {}, 0, False):
            warn(f"warning: {source}: field {path} is not supported by kproxy and is ignored")

    def typed(path, kind):
        val = flat.get(path)
        if val is None:
            return None
        if kind is bool and not isinstance(val, bool):
            raise ConfigError(f"{path}: must be true or false, got {val!r}")
        if kind is int and (isinstance(val, bool) or not isinstance(val, int)):
            raise ConfigError(f"{path}: must be an integer, got {val!r}")
        if kind is str and not isinstance(val, str):
            raise ConfigError(f"{path}: must be a string, got {val!r}")
        return val

    if (v := typed("hostnameOverride", str)):
        kw["node_name"] = v.strip().lower()
    if "clusterCIDR" in flat and flat["clusterCIDR"]:
        kw["cluster_cidrs"] = _cidr_list(typed("clusterCIDR", str), "clusterCIDR")
    if (v := typed("detectLocalMode", str)):
        kw["detect_local_mode"] = v
    if (v := typed("detectLocal.bridgeInterface", str)):
        kw["bridge_interface"] = v
    if (v := typed("detectLocal.interfaceNamePrefix", str)):
        kw["interface_name_prefix"] = v
    if (v := flat.get("nodePortAddresses")):
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            raise ConfigError(f"nodePortAddresses: must be a list of CIDRs or [primary], got {v!r}")
        kw["node_port_addresses"] = ("primary",) if v == ["primary"] else _cidr_list(v, "nodePortAddresses")
    if (v := typed("bindAddress", str)):
        kw["bind_address"] = v
    for path, name in (("metricsBindAddress", "metrics_bind_address"), ("healthzBindAddress", "healthz_bind_address")):
        if (v := typed(path, str)) is not None:
            kw[name] = v
    if (v := typed("clientConnection.kubeconfig", str)):
        kw["kubeconfig"] = v
    if (v := typed("nftables.masqueradeAll", bool)) is not None:
        kw["masquerade_all"] = v
    if (v := typed("nftables.masqueradeBit", int)) is not None:
        kw["masquerade_bit"] = v
    for path, name in (("nftables.syncPeriod", "sync_period"), ("nftables.minSyncPeriod", "min_sync_period")):
        if flat.get(path) is not None:
            kw[name] = parse_duration(flat[path], path)
    kp = flat.get("kproxy")
    kp = {} if kp is None else kp
    if not isinstance(kp, dict):
        raise ConfigError("kproxy: must be a mapping")
    for key in ("plugins", "disablePlugins"):
        val = kp.get(key, [])
        if not isinstance(val, list) or not all(isinstance(i, str) for i in val):
            raise ConfigError(f"kproxy.{key}: must be a list of plugin names")
    kw["plugins"] = tuple(kp.get("plugins", []))
    kw["disable_plugins"] = tuple(kp.get("disablePlugins", []))
    netlink = kp.get("netlinkElements", True)
    if not isinstance(netlink, bool):
        raise ConfigError(f"kproxy.netlinkElements: must be true or false, got {netlink!r}")
    kw["netlink_elements"] = netlink
    plugin_config = {k: val for k, val in kp.items() if k not in ("plugins", "disablePlugins", "netlinkElements")}
    for k, val in plugin_config.items():
        if not isinstance(val, dict):
            raise ConfigError(f"kproxy.{k}: plugin options must be a mapping")
    kw["plugin_config"] = plugin_config
    kw["kube_proxy_extra"] = extra
    return validate(Config(**kw))
