"""Validation and rendering of the values that go into nft text.

Nothing from a Kubernetes object reaches nft unchecked: every address, port, protocol,
name and comment passes through one of these functions, which raise ``ValueError`` with a
message naming what is wrong. (nft resolves a malformed address as a host name, so an
unchecked value can even cause a DNS lookup.)
"""

from __future__ import annotations

import ipaddress
import re

FAMILIES = ("ip", "ip6", "inet")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,255}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-:@]{1,15}\*?$")
PROTOCOLS = ("tcp", "udp", "sctp")


def family(value: str) -> str:
    if value not in FAMILIES:
        raise ValueError(f"nft family must be one of {', '.join(FAMILIES)}, got {value!r}")
    return value


def name(value: str) -> str:
    """A table, chain, set, map or flowtable name."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"invalid nftables object name {value!r}")
    return value


def ip(value, version: int | None = None) -> str:
    """A single address, rendered canonically; ``version`` 4 or 6 pins the family."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None
    if version is not None and addr.version != version:
        raise ValueError(f"{value!r} is not an IPv{version} address")
    return str(addr)


def cidr(value, version: int | None = None) -> str:
    """A network in CIDR notation (host bits must be zero)."""
    try:
        net = ipaddress.ip_network(str(value).strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"invalid CIDR {value!r}: {e}") from None
    if version is not None and net.version != version:
        raise ValueError(f"{value!r} is not an IPv{version} network")
    return str(net)


def port(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"invalid port {value!r}: must be an integer 1..65535")
    return str(value)


def proto(value: str) -> str:
    """A layer-4 protocol name as nft writes it (lower case)."""
    p = str(value).lower()
    if p not in PROTOCOLS:
        raise ValueError(f"unsupported protocol {value!r}: must be TCP, UDP or SCTP")
    return p


def ifname(value: str) -> str:
    """An interface name, optionally ending in ``*`` (a prefix match)."""
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ValueError(f"invalid interface name {value!r}")
    return value


def comment(value: str) -> str:
    """A quoted comment; nft has no escape for a double quote, so it is replaced."""
    text = str(value).replace('"', "'").replace("\n", " ")
    if len(text) > 128:
        text = text[:125] + "..."
    return f'"{text}"'


def integer(value, low: int = 0, high: int = 2**32 - 1) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"invalid integer {value!r}: must be {low}..{high}")
    return str(value)


def ip_family_of(version: int) -> str:
    """The nft table family that carries IP version 4 or 6."""
    return {4: "ip", 6: "ip6"}[version]


def addr_keyword(fam: str) -> str:
    """The address expression keyword of a family: ``ip`` or ``ip6``."""
    return "ip6" if fam == "ip6" else "ip"


def addr_type(fam: str) -> str:
    return "ipv6_addr" if fam == "ip6" else "ipv4_addr"
