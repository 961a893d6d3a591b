"""NftCLI against the real nft in the node namespace of the e2e cluster."""

from __future__ import annotations

import json
import sys

import pytest

FAMILY, TABLE, OTHER, EMPTY = "inet", "kplist", "kplist-other", "kplist-empty"

# the table listed: a base chain, a regular chain, a set with the interval flag, a verdict
# map with a concatenated key, a map declared with typeof and a dynamic timeout map (as
# affinity's) with elements; beside it an empty table and a table of the same family (and
# one of the same name in another family) with objects of the same names, which must not
# leak into the listing
RULESET = f"""
table {FAMILY} {EMPTY} {{ }}
table {FAMILY} {TABLE} {{
  set cidrs {{ type ipv4_addr; flags interval; elements = {{ 10.0.0.0/8, 192.168.7.0/24 }} }}
  map svcs {{ type ipv4_addr . inet_proto . inet_service : verdict; }}
  map pick {{ typeof numgen inc mod 2 : ip daddr; elements = {{ 0 : 10.0.1.2, 1 : 10.0.2.2 }} }}
  map aff {{ type ipv4_addr : ipv4_addr; flags dynamic,timeout; timeout 3h;
            elements = {{ 10.0.3.2 : 10.0.1.2, 10.0.3.3 : 10.0.2.2 }} }}
  chain svc {{ dnat ip to numgen inc mod 2 map @pick; }}
  chain pre {{ type nat hook prerouting priority -100; policy accept;
              ip daddr . meta l4proto . th dport vmap @svcs; }}
}}
add element {FAMILY} {TABLE} svcs {{ 172.30.0.10 . tcp . 80 : goto svc }}
table {FAMILY} {OTHER} {{
  set cidrs {{ type ipv6_addr; flags interval; }}
  map leak {{ type ipv4_addr : verdict; }}
  chain svc {{ type filter hook output priority 0; }}
  chain stray {{ }}
}}
table ip {TABLE} {{
  set cidrs {{ type ipv4_addr; }}
  chain stray {{ }}
}}
"""

# both listings as JSON: NftCLI.list_objects and the former implementation, which read
# ``nft -j -t list table`` (the reference: what the sync engine was given before)
LISTINGS = r"""
import dataclasses, json, subprocess, sys
from kproxy.nft import NftCLI, NftError
from kproxy.nft.cli import _SET_FLAGS
from kproxy.nft.objects import Chain, Flowtable, Listing, Set

def by_list_table(family, table):
    proc = subprocess.run(["nft", "-j", "-t", "list", "table", family, table], capture_output=True, text=True, check=True)
    out = Listing()
    for item in json.loads(proc.stdout)["nftables"]:
        if "chain" in item:
            c = item["chain"]
            out.chains[c["name"]] = Chain(family, table, c["name"], c.get("type"), c.get("hook"), c.get("prio"))
        elif "set" in item or "map" in item:
            s = item.get("set") or item.get("map")
            flags = tuple(f for f in s.get("flags", ()) if f in _SET_FLAGS)
            out.sets[s["name"]] = Set(family, table, s["name"], str(s.get("type")),
                                      str(s["map"]) if "map" in s else None, flags=flags)
        elif "flowtable" in item:
            f = item["flowtable"]
            devs = f.get("dev", ())
            out.flowtables[f["name"]] = Flowtable(family, table, f["name"],
                                                  devices=tuple([devs] if isinstance(devs, str) else devs))
    return out

def as_json(listing):
    return {kind: [[name, dataclasses.asdict(o)] for name, o in getattr(listing, kind).items()]
            for kind in ("chains", "sets", "flowtables")}

family, table, empty = sys.argv[1:4]
try:
    missing = None
    NftCLI().list_objects(family, "kplist-missing")
except NftError as e:
    missing = str(e)
print(json.dumps({"new": as_json(NftCLI().list_objects(family, table)), "old": as_json(by_list_table(family, table)),
                  "empty": as_json(NftCLI().list_objects(family, empty)), "missing": missing}))
"""


def listings(node, family, table, empty) -> dict:
    return json.loads(node.run([sys.executable, "-c", LISTINGS, family, table, empty]).stdout)


@pytest.mark.parametrize("flowtable", [False, True], ids=["", "flowtable"])
def test_list_objects_matches_list_table_without_the_other_tables(clean, flowtable):
    node = clean.node
    try:
        node.run(["nft", "-f", "-"], input=RULESET)
        if flowtable:
            proc = node.run(["nft", "add", "flowtable", FAMILY, TABLE, "fast",
                             "{ hook ingress priority 0; devices = { lo }; }"], check=False)
            if proc.returncode:
                pytest.skip(f"this kernel has no flowtables: {proc.stderr.strip()}")
            node.run(["nft", "add", "flowtable", FAMILY, OTHER, "fast2",
                      "{ hook ingress priority 0; devices = { lo }; }"])
        got = listings(node, FAMILY, TABLE, EMPTY)
    finally:
        for fam, name in ((FAMILY, TABLE), (FAMILY, OTHER), (FAMILY, EMPTY), ("ip", TABLE)):
            node.run(["nft", "delete", "table", fam, name], check=False)

    assert got["new"] == got["old"]  # the same objects, in the same order
    new = {kind: dict(items) for kind, items in got["new"].items()}
    assert list(new["chains"]) == ["svc", "pre"]
    assert {k: new["chains"]["pre"][k] for k in ("type", "hook", "priority")} == {
        "type": "nat", "hook": "prerouting", "priority": -100}
    assert new["chains"]["svc"]["hook"] is None
    assert list(new["sets"]) == ["cidrs", "svcs", "pick", "aff"]
    sets = {name: (s["table"], s["key_type"], s["value_type"], tuple(s["flags"])) for name, s in new["sets"].items()}
    assert sets == {
        "cidrs": (TABLE, "ipv4_addr", None, ("interval",)),
        "svcs": (TABLE, "['ipv4_addr', 'inet_proto', 'inet_service']", "verdict", ()),
        "pick": (TABLE, "integer", "ipv4_addr", ()),
        # nft's JSON shows a dynamic timeout set as "timeout" only; the engine keeps its
        # elements over a full sync on either flag
        "aff": (TABLE, "ipv4_addr", "ipv4_addr", ("timeout",)),
    }
    if flowtable:
        assert list(new["flowtables"]) == ["fast"]
        assert (new["flowtables"]["fast"]["table"], new["flowtables"]["fast"]["devices"]) == (TABLE, ["lo"])
    else:
        assert new["flowtables"] == {}
    assert got["empty"] == {"chains": [], "sets": [], "flowtables": []}
    assert got["missing"].startswith(f"nft list table {FAMILY} kplist-missing failed: ")
    assert "No such file or directory" in got["missing"]


TABLES = r"""
import json, subprocess
from kproxy.nft import NftCLI
old = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout)
print(json.dumps({"new": NftCLI().list_tables(),
                  "old": [[i["table"]["family"], i["table"]["name"]] for i in old["nftables"] if "table" in i]}))
"""


def test_list_tables_matches_nft_list_tables(clean):
    node = clean.node
    try:
        node.run(["nft", "-f", "-"], input=RULESET)
        got = json.loads(node.run([sys.executable, "-c", TABLES]).stdout)
    finally:
        for fam, name in ((FAMILY, TABLE), (FAMILY, OTHER), (FAMILY, EMPTY), ("ip", TABLE)):
            node.run(["nft", "delete", "table", fam, name], check=False)
    assert got["new"] == got["old"]  # the same tables, in the same order
    assert {(FAMILY, TABLE), (FAMILY, OTHER), (FAMILY, EMPTY), ("ip", TABLE)} <= {tuple(t) for t in got["new"]}
