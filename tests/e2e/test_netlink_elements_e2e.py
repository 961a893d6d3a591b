"""A new table built ahead of its transaction, its set elements loaded through netlink
(``NftCLI._build_ahead``, ``nft.netlink``), against the real kernel in the node
namespace: it must leave exactly what nft alone leaves, and nothing when it fails.

Every sync of the other e2e tests into a clean namespace goes this way too (their
tables are new), so their packets are the test that the rules work."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from objects import endpoint_slice, service, write_manifests

SCRIPT = r"""
import json, logging, subprocess, sys
from kproxy.nft import Chain, Elements, NftCLI, NftError, Rule, Set, Table, Transaction
from kproxy.nft import netlink

TABLES = (("ip", "kpnl"), ("ip6", "kpnl"))
sent = []
real_send = netlink.send
def counting_send(data, messages, **kw):
    sent.append(messages)
    return real_send(data, messages, **kw)
netlink.send = counting_send

def transaction(bad_rule=None, typeof_in_base=False):
    t = Transaction()
    for fam, name in TABLES:
        t.add(Table(fam, name, comment="netlink test"))
    t.add(Chain("ip", "kpnl", "pre", "nat", "prerouting", -100))
    t.add(Chain("ip", "kpnl", "filter-forward", "filter", "forward", 0, policy="drop"))
    t.add(Chain("ip", "kpnl", "svc"))
    t.add(Chain("ip6", "kpnl", "pre", "nat", "prerouting", -100))
    t.add(Chain("ip6", "kpnl", "svc"))
    sets = [
        Set("ip", "kpnl", "backends", "ip daddr . meta l4proto . th dport . numgen random mod 1", "ip daddr . th dport", typeof=True),
        Set("ip", "kpnl", "np-backends", "meta l4proto . th dport . numgen random mod 1", "ip daddr . th dport", typeof=True),
        Set("ip", "kpnl", "ips", "ipv4_addr", comment="active"),
        Set("ip", "kpnl", "pairs", "ipv4_addr . ipv4_addr"),
        Set("ip", "kpnl", "ports", "inet_proto . inet_service"),
        Set("ip", "kpnl", "marks", "mark", "inet_service"),
        Set("ip", "kpnl", "dispatch", "ipv4_addr . inet_proto . inet_service", "verdict"),
        Set("ip", "kpnl", "ranges", "ipv4_addr", flags=("interval",)),
        Set("ip6", "kpnl", "backends", "ip6 daddr . meta l4proto . th dport . numgen random mod 1", "ip6 daddr . th dport", typeof=True),
    ]
    for s in sets:
        t.add(s)
    runs = tuple((f"172.30.{i // 200}.{i % 200 + 1} . {('tcp', 'udp', 'sctp')[i % 3]} . {80 + i % 7}",
                  tuple(f"10.{i // 250}.{i % 250}.{e + 1} . {8000 + e}" for e in range(i % 4 + 1)),
                  f"ns-{i % 5}/svc-{i}:http" if i % 3 else None) for i in range(3000))
    t.add(Elements("ip", "kpnl", "backends", runs[:1500])).add(Elements("ip", "kpnl", "backends", runs[1500:]))
    t.add(Elements("ip", "kpnl", "np-backends", (("tcp . 30080", ("10.0.1.2 . 8080", "10.0.2.2 . 8080"), "np"),
                                                  ("udp . 30053", ("10.0.1.2 . 5353",), None))))
    t.add(Elements("ip", "kpnl", "ips", tuple((f"172.30.{i // 250}.{i % 250 + 1}", None, None) for i in range(2000))))
    t.add(Elements("ip", "kpnl", "pairs", (("10.0.1.2 . 10.0.1.2", None, "hairpin"), ("10.0.2.2 . 10.0.2.2", None, None))))
    t.add(Elements("ip", "kpnl", "ports", (("sctp . 1", None, None), ("132 . 2", None, None), ("udp . 65535", None, None))))
    t.add(Elements("ip", "kpnl", "marks", (("0x4000", "53", None), ("7", "80", None))))
    t.add(Elements("ip", "kpnl", "dispatch", (("172.30.0.1 . tcp . 80", "goto svc", None),)))
    t.add(Elements("ip", "kpnl", "ranges", (("10.0.0.0/8", None, None),)))
    t.add(Elements("ip6", "kpnl", "backends", (("fd00::1 . tcp . 80", ("fd00:1::2 . 8080", "fd00:2::2 . 8080"), "v6"),)))
    t.add(Rule("ip", "kpnl", "svc", "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @backends"))
    t.add(Rule("ip", "kpnl", "pre", "ip daddr . meta l4proto . th dport vmap @dispatch"))
    t.add(Rule("ip", "kpnl", "filter-forward", "accept"))
    t.add(Rule("ip6", "kpnl", "svc", "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 2 map @backends"))
    t.add(Rule("ip6", "kpnl", "pre", "ip6 daddr fd00::1 goto svc"))
    if typeof_in_base:  # nft cannot add this rule once the map is in the kernel: one transaction then
        t.add(Rule("ip", "kpnl", "pre", "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @backends"))
    if bad_rule:
        t.add(Rule("ip", "kpnl", "pre", bad_rule))
    t.new_tables = set(TABLES)
    return t

def listing():
    return "".join(subprocess.run(["nft", "list", "table", fam, name], capture_output=True, text=True, check=True).stdout
                   for fam, name in TABLES)

def tables():
    return [line for line in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout.splitlines()
            if "kpnl" in line]

def drop():
    for fam, name in TABLES:
        subprocess.run(["nft", "delete", "table", fam, name], check=False, capture_output=True)

out = {}
mode = sys.argv[1]
if mode == "same":
    NftCLI(netlink=False).apply(transaction())
    out["nft"] = listing()
    drop()
    NftCLI().apply(transaction())
    out["netlink"] = listing()
elif mode == "typeof-in-base":
    NftCLI(netlink=False).apply(transaction(typeof_in_base=True))
    out["nft"] = listing()
    drop()
    NftCLI().apply(transaction(typeof_in_base=True))
    out["netlink"] = listing()
elif mode == "fails":
    try:
        NftCLI().apply(transaction(bad_rule="jump nowhere"))
    except NftError as e:
        out["error"] = str(e)
    out["tables"] = tables()
elif mode == "refused":
    # the kernel refuses a batch (here: elements for a set that does not exist)
    enc = netlink.encoder(Set("ip", "kpnl", "missing", "ipv4_addr"))
    try:
        real_send(*netlink.batch([(enc, [Elements("ip", "kpnl", "missing", (("10.0.0.1", None, None),))])]))
    except NftError as e:
        out["error"] = str(e)
    # ... and when netlink fails, nft loads the elements instead
    def refuse(data, messages, **kw):
        sent.append(messages)
        raise NftError("refused on purpose")
    netlink.send = refuse
    NftCLI().apply(transaction())
    out["listing"] = listing()
    drop()
    NftCLI(netlink=False).apply(transaction())
    out["nft"] = listing()
out["sent"] = sent
drop()
print(json.dumps(out))
"""


def run(node, mode: str) -> dict:
    return json.loads(node.run([sys.executable, "-c", SCRIPT, mode], timeout=60).stdout)


def test_a_table_built_ahead_equals_the_one_nft_builds(clean):
    got = run(clean.node, "same")
    assert got["sent"] and got["sent"][0] > 1  # the elements went through netlink, in several messages
    assert got["netlink"] == got["nft"]
    text = got["netlink"]
    # what the listing shows: comments, numbers, IPv6, every kind of set (a sanity check
    # that the comparison compared something)
    assert '172.30.0.2 . udp . 81 . 1 comment "ns-1/svc-1:http" : 10.0.1.2 . 8001' in text
    assert 'fd00::1 . tcp . 80 . 1 comment "v6" : fd00:2::2 . 8080' in text
    assert "10.0.1.2 . 10.0.1.2 comment \"hairpin\"" in text
    assert "sctp . 1" in text and "0x00004000 : 53" in text
    assert text.count(" . tcp . ") > 1000


def test_a_base_chain_rule_using_a_typeof_map_keeps_the_table_in_one_transaction(clean):
    got = run(clean.node, "typeof-in-base")
    assert got["sent"] == []
    assert got["netlink"] == got["nft"]
    assert "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @backends" in got["nft"]


def test_a_failed_transaction_leaves_no_table_built_ahead(clean):
    got = run(clean.node, "fails")
    assert got["sent"]  # the table was built and filled before the transaction failed
    assert "jump nowhere" in got["error"]
    assert got["tables"] == []


def test_netlink_refusal_names_the_reason_and_nft_loads_the_elements(clean):
    got = run(clean.node, "refused")
    assert "No such file or directory" in got["error"]
    assert got["sent"]
    assert got["listing"] == got["nft"]


NFT_LOGGER = """#!/bin/sh
# records every script nft reads from stdin
if [ "$1" = "-f" ] && [ "$2" = "-" ]; then tee -a "{log}" | {nft} "$@"; else exec {nft} "$@"; fi
"""


def test_the_operator_can_let_nft_load_every_element(clean, tmp_path):
    log = tmp_path / "nft-input.log"
    (tmp_path / "nft").write_text(NFT_LOGGER.format(log=log, nft=shutil.which("nft")))
    (tmp_path / "nft").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin"}
    manifests = write_manifests(tmp_path / "web", [
        service("web", "172.30.0.10", [("http", "TCP", 80)]),
        endpoint_slice("web", ["10.0.1.2", "10.0.2.2"], [("http", "TCP", 8080)])])
    no_netlink = clean.write_config("no-netlink.yaml", kproxy={"netlinkElements": False})
    runs = {"default": ("--config", clean.config), "flag": ("--config", clean.config, "--no-netlink-elements"),
            "config": ("--config", no_netlink)}
    scripts, rulesets = {}, {}
    for name, args in runs.items():
        clean.kproxy("cleanup")
        log.write_text("")
        clean.kproxy("run", "--once", "--manifests", str(manifests), *map(str, args), env=env)
        scripts[name], rulesets[name] = log.read_text(), clean.ruleset()
    backends = "add element ip kproxy cluster-backends"
    assert "add table ip kproxy" in scripts["default"] and backends not in scripts["default"]  # through netlink
    assert backends in scripts["flag"] and backends in scripts["config"]  # nft loaded them
    assert rulesets["flag"] == rulesets["config"] == rulesets["default"]
    assert "172.30.0.10 . tcp . 80 . 1" in rulesets["default"]


@pytest.fixture(autouse=True)
def _no_tables_left(clean):
    yield
    assert "kpnl" not in clean.node.run(["nft", "list", "tables"]).stdout
