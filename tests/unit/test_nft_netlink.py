"""Set elements as nfnetlink messages (``nft.netlink``) and how ``NftCLI`` builds a new
table ahead of its transaction. The kernel's side is in
tests/e2e/test_netlink_elements_e2e.py."""

from __future__ import annotations

import socket
import struct

import pytest

from kproxy.nft import Chain, Elements, FakeNft, NftCLI, NftError, Rule, Set, Table, Transaction
from kproxy.nft import netlink
from kproxy.nft.transaction import Op

BACKENDS = Set("ip", "t", "backends", "ip daddr . meta l4proto . th dport . numgen random mod 1",
               "ip daddr . th dport", typeof=True)


def elements(s: Set, *items) -> bytes:
    return b"".join(netlink.encoder(s).items(Elements(s.family, s.table, s.name, tuple(items))))


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type without the nested flag, payload) of consecutive netlink attributes."""
    out, off = [], 0
    while off < len(data):
        size, kind = struct.unpack_from("=HH", data, off)
        out.append((kind & ~netlink.NLA_F_NESTED, data[off + 4:off + size]))
        off += (size + 3) & ~3
    return out


class TestEncoder:
    @pytest.mark.parametrize("s", [
        Set("ip", "t", "m", "ipv4_addr . inet_proto . inet_service", "verdict"),  # verdicts name chains
        Set("ip", "t", "s", "ipv4_addr", flags=("interval",)),
        Set("ip", "t", "s", "ipv4_addr", timeout=60),
        Set("ip", "t", "s", "ether_addr"),
        Set("ip", "t", "m", "ip daddr . ct state", "ip daddr", typeof=True),
    ], ids=["verdict", "interval", "timeout", "unknown type", "unknown typeof"])
    def test_sets_nft_must_load_have_no_encoder(self, s):
        assert netlink.encoder(s) is None

    def test_an_element_in_kernel_layout(self):
        (elem,) = attrs(elements(BACKENDS, ("172.30.0.1 . udp . 53 . 1", "10.0.1.2 . 5353", "dns")))
        assert elem[0] == 1  # NFTA_LIST_ELEM
        key, data, udata = attrs(elem[1])
        assert key[0] == 1 and data[0] == 2 and udata[0] == 6
        # concatenated fields fill whole 32-bit registers: address, protocol, port (network
        # order), then numgen's host-order integer
        assert attrs(key[1]) == [(1, socket.inet_aton("172.30.0.1") + bytes((17, 0, 0, 0)) + b"\x00\x35\0\0"
                                  + struct.pack("=I", 1))]
        assert attrs(data[1]) == [(1, socket.inet_aton("10.0.1.2") + b"\x14\xe9\0\0")]
        assert udata[1] == bytes((0, 4)) + b"dns\0"  # the comment, as nft stores it

    def test_an_indexed_run_is_its_elements(self):
        run = elements(BACKENDS, ("172.30.0.1 . tcp . 80", ("10.0.1.2 . 8080", "10.0.2.2 . 8080"), "web"))
        one_by_one = elements(BACKENDS, ("172.30.0.1 . tcp . 80 . 0", "10.0.1.2 . 8080", "web"),
                              ("172.30.0.1 . tcp . 80 . 1", "10.0.2.2 . 8080", "web"))
        assert run == one_by_one

    def test_a_single_field_is_not_padded(self):
        (elem,) = attrs(elements(Set("ip", "t", "ports", "inet_service"), ("8080", None, None)))
        (key,) = attrs(elem[1])
        assert attrs(key[1]) == [(1, b"\x1f\x90")]

    def test_ipv6_and_protocol_numbers(self):
        s = Set("ip6", "t", "s", "ipv6_addr . inet_proto")
        assert elements(s, ("fd00::1 . 6", None, None)) == elements(s, ("fd00::1 . tcp", None, None))

    @pytest.mark.parametrize("item", [
        ("300.1.1.1 . tcp . 80 . 0", "10.0.0.1 . 80", None),
        ("10.0.0.1 . tcp . 70000 . 0", "10.0.0.1 . 80", None),
        ("10.0.0.1 . tcp . 80", "10.0.0.1 . 80", None),  # a field missing
        ("10.0.0.1 . gre . 80 . 0", "10.0.0.1 . 80", None),  # a protocol name nft may know, this does not
        ("10.0.0.1 . tcp . 80 . 0", None, None),  # a map element without a value
        ("10.0.0.1 . tcp . 80 . 0", "10.0.0.1 . 80", "x" * 300),
    ], ids=["address", "port", "fields", "protocol", "no value", "long comment"])
    def test_what_it_cannot_encode_is_a_value_error(self, item):
        with pytest.raises(ValueError):
            elements(BACKENDS, item)

    def test_a_batch_splits_messages_below_64_kib(self):
        runs = tuple((f"172.30.{i // 250}.{i % 250} . tcp . 80", ("10.0.0.1 . 80",) * 10, None) for i in range(1000))
        data, messages = netlink.batch([(netlink.encoder(BACKENDS), [Elements("ip", "t", "backends", runs)])])
        assert messages > 1
        off, sizes = 0, []
        while off < len(data):
            size = struct.unpack_from("=I", data, off)[0]
            sizes.append(size)
            off += size
        assert len(sizes) == messages + 2  # batch begin and end around the element messages
        assert max(sizes) < 65536


class Recorder(NftCLI):
    """NftCLI whose nft runs are recorded (and can fail) instead of run."""

    def __init__(self, fail_on=None):
        super().__init__()
        self.scripts, self.fail_on = [], fail_on

    def _feed(self, txn, meanwhile=None):
        text = txn.render()
        self.scripts.append(text)
        result = meanwhile() if meanwhile else None
        if self.fail_on and self.fail_on in text:
            raise NftError("refused")
        return result


@pytest.fixture
def sent(monkeypatch):
    batches = []
    monkeypatch.setattr(netlink, "send", lambda data, messages: batches.append(messages))
    return batches


def first_sync(*extra_rules, policy=None):
    t = Transaction()
    t.add(Table("ip", "t"))
    t.add(Chain("ip", "t", "pre", "nat", "prerouting", -100, policy=policy))
    t.add(Chain("ip", "t", "svc"))
    t.add(BACKENDS)
    t.add(Set("ip", "t", "dispatch", "ipv4_addr . inet_proto . inet_service", "verdict"))
    t.add(Elements("ip", "t", "backends", (("172.30.0.1 . tcp . 80", ("10.0.1.2 . 8080",), None),)))
    t.add(Elements("ip", "t", "dispatch", (("172.30.0.1 . tcp . 80", "goto svc", None),)))
    t.add(Rule("ip", "t", "svc", "dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @backends"))
    t.add(Rule("ip", "t", "pre", "ip daddr . meta l4proto . th dport vmap @dispatch"))
    for text in extra_rules:
        t.add(Rule("ip", "t", "pre", text))
    t.new_tables = {("ip", "t")}
    return t


class TestBuildAhead:
    def test_everything_but_the_base_chain_rules_goes_first_and_elements_through_netlink(self, sent):
        nft = Recorder()
        nft.apply(first_sync())
        build, rest = nft.scripts
        assert sent == [1]
        assert "add chain ip t pre { type nat hook prerouting priority -100 ; }" in build
        assert "add rule ip t svc dnat" in build and "add element ip t dispatch" in build
        assert "backends {" not in build.split("add map ip t backends")[1]  # declared, no elements
        assert "10.0.1.2" not in build + rest
        assert rest == "add rule ip t pre ip daddr . meta l4proto . th dport vmap @dispatch\n"

    def test_a_drop_policy_comes_with_the_rules(self, sent):
        nft = Recorder()
        nft.apply(first_sync(policy="drop"))
        build, rest = nft.scripts
        assert "add chain ip t pre { type nat hook prerouting priority -100 ; }" in build
        assert rest.startswith("add chain ip t pre { type nat hook prerouting priority -100 ; policy drop ; }\n")

    def test_a_base_chain_rule_using_a_typeof_map_keeps_one_transaction(self, sent):
        nft = Recorder()
        txn = first_sync("dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 1 map @backends")
        nft.apply(txn)
        assert sent == [] and nft.scripts == [txn.render()]

    def test_a_failed_transaction_removes_the_table_built(self, sent):
        nft = Recorder(fail_on="jump nowhere")
        with pytest.raises(NftError):
            nft.apply(first_sync("jump nowhere"))
        assert nft.scripts[-1] == "delete table ip t\n"

    def test_elements_netlink_cannot_encode_go_to_nft_in_one_transaction(self, sent, caplog):
        nft = Recorder()
        txn = first_sync()
        txn.ops.insert(6, Op("add", Elements("ip", "t", "backends", (("172.30.0.2 . tcp . 99999", ("10.0.1.2 . 80",), None),))))
        nft.apply(txn)
        build, undo, whole = nft.scripts
        assert sent == [] and undo == "delete table ip t\n" and whole == txn.render()
        assert "99999" in caplog.text and "nft loads them instead" in caplog.text

    def test_a_table_already_in_the_kernel_is_one_transaction(self, sent):
        nft = Recorder()
        txn = first_sync()
        txn.new_tables = set()
        nft.apply(txn)
        assert sent == [] and nft.scripts == [txn.render()]


def test_the_fake_rejects_a_new_table_that_exists():
    fake = FakeNft()
    fake.apply(Transaction().add(Table("ip", "t")))
    txn = Transaction().add(Table("ip", "t"))
    txn.new_tables = {("ip", "t")}
    with pytest.raises(NftError, match="says table ip t is new"):
        fake.apply(txn)
