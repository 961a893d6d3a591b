"""The node's network interfaces, as announced through ``kproxy_interface_change``."""

from __future__ import annotations

from msgspec import Struct


class Link(Struct, frozen=True, order=True):
    name: str
    index: int = 0
    kind: str = ""  # netlink link kind: "veth", "bridge", "" for plain ethernet, ...
    up: bool = False
    loopback: bool = False
