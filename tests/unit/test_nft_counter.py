"""Named counters (``kproxy.nft.Counter``): rendering, and FakeNft behaving like nft."""

from __future__ import annotations

import pytest

from kproxy.nft import Chain, Counter, Element, FakeNft, NftError, Rule, Set, Table, Transaction

T = Table("ip", "kproxy-counters")
MAP = Set("ip", T.name, "service-counters", "ipv4_addr . inet_proto . inet_service", "counter")
CHAIN = Chain("ip", T.name, "prerouting", "filter", "prerouting", -150)


def test_counter_renders_add_create_delete():
    c = Counter("ip", "kproxy-counters", "p-web", comment="demo/web:http")
    txn = Transaction().add(c).create(Counter("ip6", "kproxy-counters", "n-web")).delete(c)
    assert txn.render().splitlines() == [
        'add counter ip kproxy-counters p-web { comment "demo/web:http" ; }',
        "create counter ip6 kproxy-counters n-web",
        "delete counter ip kproxy-counters p-web",
    ]
    assert c.key == ("counter", "ip", "kproxy-counters", "p-web")


def test_counter_cannot_be_flushed_and_is_validated():
    with pytest.raises(ValueError):
        Transaction().flush(Counter("ip", "t", "c"))
    with pytest.raises(ValueError):
        Counter("ip", "t", "bad name")
    with pytest.raises(ValueError):
        Counter("arp", "t", "c")


def fake_with_counter():
    nft = FakeNft()
    nft.apply(Transaction().add(T).add(Counter("ip", T.name, "p-web")).add(MAP).add(CHAIN)
              .add(Element("ip", T.name, MAP.name, "172.30.0.10 . tcp . 80", '"p-web"'))
              .add(Rule("ip", T.name, CHAIN.name, "counter name ip daddr . meta l4proto . th dport map @service-counters")))
    return nft


def test_fake_keeps_values_when_a_counter_is_added_again():
    nft = fake_with_counter()
    nft.count("ip", T.name, "p-web", 3, 180)
    nft.apply(Transaction().add(Counter("ip", T.name, "p-web")))
    assert nft.counters("ip", T.name) == {"p-web": (3, 180, None)}
    with pytest.raises(NftError, match="File exists"):
        nft.apply(Transaction().create(Counter("ip", T.name, "p-web")))
    assert "counter ip kproxy-counters p-web" in nft.dump()


def test_fake_rejects_missing_and_busy_counters():
    nft = fake_with_counter()
    with pytest.raises(NftError, match="missing counter"):
        nft.apply(Transaction().add(Element("ip", T.name, MAP.name, "172.30.0.11 . tcp . 80", '"nope"')))
    with pytest.raises(NftError, match="busy"):
        nft.apply(Transaction().delete(Counter("ip", T.name, "p-web")))
    with pytest.raises(NftError, match="does not exist"):
        nft.apply(Transaction().add(Rule("ip", T.name, CHAIN.name, 'counter name "nope"')))
    # deleting the element first frees the counter, in one transaction
    nft.apply(Transaction().delete(Element("ip", T.name, MAP.name, "172.30.0.10 . tcp . 80"))
              .delete(Counter("ip", T.name, "p-web")))
    assert nft.counters("ip", T.name) == {}
    with pytest.raises(NftError, match="does not exist"):
        nft.apply(Transaction().delete(Counter("ip", T.name, "p-web")))


def test_fake_counter_used_by_name_in_a_rule_is_busy():
    nft = fake_with_counter()
    nft.apply(Transaction().add(Rule("ip", T.name, CHAIN.name, 'ct state new counter name "p-web"')))
    with pytest.raises(NftError, match="busy"):
        nft.apply(Transaction().flush(MAP).delete(Counter("ip", T.name, "p-web")))
    assert "p-web" in nft.counters("ip", T.name)  # whole transaction rolled back
