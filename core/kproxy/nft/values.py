"""Validation and rendering of the values that go into nft text.

Nothing from a Kubernetes object reaches nft unchecked: every address, port, protocol,
name and comment passes through one of these functions, which raise ``ValueError`` with a
message naming what is wrong. (nft resolves a malformed address as a host name, so an
unchecked value can even cause a DNS lookup.)
"""

from __future__ import annotations

import functools
import ipaddress
import re

FAMILIES = ("ip", "ip6", "inet")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,254}")  # nft names: at most 255 characters
_IFNAME = re.compile(r"[A-Za-z0-9_.\-:@]{1,15}\*?")
PROTOCOLS = ("tcp", "udp", "sctp")


def family(value: str) -> str:
    if value not in FAMILIES:
        raise ValueError(f"nft family must be one of {', '.join(FAMILIES)}, got {value!r}")
    return value


def name(value: str) -> str:
    """A table, chain, set, map or flowtable name."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"invalid nftables object name {value!r}")
    return value


_CANONICAL_V4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)")


def ip(value, version: int | None = None) -> str:
    """A single address, rendered canonically; ``version`` 4 or 6 pins the family."""
    if version != 6 and isinstance(value, str) and _CANONICAL_V4.fullmatch(value):
        return value  # the common case, checked without building an address object
    return _ip(value, version)


@functools.lru_cache(maxsize=1 << 16)
def _ip(value, version: int | None) -> str:
    try:
        if not isinstance(value, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise ValueError
        addr = ipaddress.ip_address(value)
        if getattr(addr, "scope_id", None):  # fe80::1%eth0: nft cannot parse a zone index
            raise ValueError
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None
    if version is not None and addr.version != version:
        raise ValueError(f"{value!r} is not an IPv{version} address")
    return str(addr)


def cidr(value, version: int | None = None) -> str:
    """A network in CIDR notation (host bits must be zero)."""
    try:
        net = ipaddress.ip_network(str(value).strip(), strict=True)
        if getattr(net.network_address, "scope_id", None):
            raise ValueError("a zone index is not allowed")
    except ValueError as e:
        raise ValueError(f"invalid CIDR {value!r}: {e}") from None
    if version is not None and net.version != version:
        raise ValueError(f"{value!r} is not an IPv{version} network")
    return str(net)


def port(value) -> str:
    if value.__class__ is int and 0 < value < 65536:  # the common case, in one test
        return str(value)
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
    if not isinstance(value, str) or not _IFNAME.fullmatch(value):
        raise ValueError(f"invalid interface name {value!r}")
    return value


def comment(value: str) -> str:
    """A quoted comment; nft has no escape for a double quote, so it is replaced. nft
    allows at most 128 bytes, so a longer comment is cut (at a character boundary)."""
    text = str(value).replace('"', "'").replace("\n", " ")
    if len(text.encode()) > 128:
        text = text.encode()[:125].decode(errors="ignore") + "..."
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
