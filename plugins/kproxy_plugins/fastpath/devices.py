"""Which network interfaces go into the fastpath flowtable.

A flowtable registers a netdev *ingress* hook on each of its devices; an offloaded
connection only takes the fast path when the devices it enters through in **both**
directions are in the flowtable. For pod <-> remote traffic that means the pod's veth
and the node's uplink (or the overlay/tunnel device); for pod <-> pod traffic on the
node, both veths. Hence every interface that can carry forwarded traffic is wanted.

What the kernel accepts (checked in the test VM, Debian 6.1): an ingress hook on every
kind tried, including ``lo``, ``dummy``, ``ifb``, ``bridge``, ``vlan``, ``bond``,
``macvlan``, ``ipvlan``, ``vxlan``, ``ipip``, ``gre`` and ``wireguard``, whether up or
down. So the choice below is about *usefulness and harm*, not acceptance:

- **eligible** (``ELIGIBLE_KINDS``): physical NICs (no netlink kind, ``""``), ``veth``
  (pods), the stacked devices a node's uplink can be (``vlan``, ``bond``, ``team``,
  ``macvlan``, ``ipvlan``), overlay and tunnel devices CNIs route pod traffic through
  (``vxlan``, ``geneve``, ``ipip``, ``sit``, ``ip6tnl``, ``gre``/``gretap``,
  ``ip6gre``/``ip6gretap``, ``wireguard``, ``tun``), and ``bridge`` on kernels >= 5.13
  (older kernels reject a bridge in a flowtable; openwrt #9854 — not re-checked here,
  only 6.1 was available);
- **excluded**: links that are down (they carry nothing; they join when they come up),
  loopback (forwarded traffic never enters through ``lo``), ``dummy`` (never receives a
  packet), ``ifb`` (only sees packets tc redirected to it), ``vrf`` (an L3 master: the
  forward path sees the enslaved devices), ``openvswitch`` (the datapath's internal
  device), ``nlmon``/``vcan`` and every kind not listed (an allowlist: an unknown
  virtual device is left alone rather than risked);
- names nft 1.0.6 cannot parse unquoted in ``devices = { ... }`` (a leading digit, ``@``)
  are skipped with a warning.

The kernel takes at most 256 devices per flowtable message (more fails with "File too
large", checked in the VM), so device lists are sent in chunks of ``CHUNK``; re-adding a
flowtable adds devices and ignores those it already has.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("kproxy.fastpath")

ELIGIBLE_KINDS = frozenset({
    "", "veth", "vlan", "bond", "team", "macvlan", "ipvlan",
    "vxlan", "geneve", "ipip", "sit", "ip6tnl", "gre", "gretap", "ip6gre", "ip6gretap",
    "wireguard", "tun",
})
BRIDGE_MIN_KERNEL = (5, 13)
CHUNK = 128  # devices per flowtable operation (the kernel's limit is 256)
_NFT_SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,14}")
_warned: set[str] = set()


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel (or of ``release``), (0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def eligible(link, kernel: tuple[int, int] | None = None) -> bool:
    """Whether one ``kproxy.links.Link`` belongs in the flowtable."""
    if not link.up or link.loopback:
        return False
    kind = link.kind or ""
    if kind == "bridge":
        ok = (kernel or kernel_version()) >= BRIDGE_MIN_KERNEL
    else:
        ok = kind in ELIGIBLE_KINDS
    if ok and not _NFT_SAFE_NAME.fullmatch(link.name or ""):
        if link.name not in _warned:
            _warned.add(link.name)
            log.warning("fastpath: interface %r is left out of the flowtable: nft cannot take its name unquoted", link.name)
        return False
    return ok


def eligible_devices(links, kernel: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The sorted names of the eligible links."""
    kernel = kernel or kernel_version()
    return tuple(sorted({link.name for link in links if eligible(link, kernel)}))


def chunks(names, size: int = CHUNK):
    """``names`` in lists of at most ``size`` (at least one list, possibly empty)."""
    names = list(names)
    if not names:
        yield []
    for i in range(0, len(names), size):
        yield names[i:i + size]
