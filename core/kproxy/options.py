"""Plugin options: typed settings a plugin declares through ``kproxy_add_options``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ConfigError

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass(frozen=True)
class Option:
    plugin: str
    name: str  # key under kproxy.<plugin> in the config file
    type: str  # int, float, bool or str
    default: Any
    help: str
    flag: str  # command-line flag, e.g. --fastpath-packet-threshold
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    kube_proxy_field: str | None = None  # a KubeProxyConfiguration nftables.* field that also sets it

    def parse(self, value):
        """Convert and check a value from a flag or the config file."""
        where = f"plugin {self.plugin}: option {self.name}"
        want = _TYPES[self.type]
        if self.type == "bool" and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where}: must be true or false, got {value!r}")
            value = value.lower() in ("true", "1", "yes")
        elif isinstance(value, str) and want in (int, float):
            try:
                value = want(value)
            except ValueError:
                raise ConfigError(f"{where}: must be {'an integer' if want is int else 'a number'}, got {value!r}") from None
        if isinstance(value, bool) and want is not bool or not isinstance(value, want if want is not float else (int, float)):
            raise ConfigError(f"{where}: must be of type {self.type}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{where}: must be at least {self.minimum}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{where}: must be one of {', '.join(self.choices)}, got {value!r}")
        return value


class OptionRegistry:
    """Collects the options of one plugin (passed to ``kproxy_add_options``)."""

    def __init__(self, plugin: str, sink: list[Option]):
        self.plugin = plugin
        self._sink = sink

    def add(self, name: str, *, type: str = "str", default=None, help: str = "", flag: str | None = None,
            minimum=None, choices=None, kube_proxy_field: str | None = None) -> Option:
        if type not in _TYPES:
            raise ValueError(f"plugin {self.plugin}: option {name}: type must be one of {', '.join(_TYPES)}")
        opt = Option(self.plugin, name, type, default, help, flag or f"--{self.plugin}-{name}", minimum,
                     tuple(choices) if choices else None, kube_proxy_field)
        if default is not None:
            opt.parse(default)
        self._sink.append(opt)
        return opt
