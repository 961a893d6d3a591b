"""The nftables layer: values, objects, transaction rendering, the fake backend, nft errors."""

from __future__ import annotations

import pytest

from kproxy.nft import Chain, Element, Elements, FakeNft, Flowtable, NftError, Rule, Set, Table, Transaction
from kproxy.nft import values as v
from kproxy.nft.cli import parse_error

T = Table("ip", "t")


def chain(name, **kw):
    return Chain("ip", "t", name, **kw)


def rule(chain_name, text, **kw):
    return Rule("ip", "t", chain_name, text, **kw)


def applied(*objs, fake=None):
    """A FakeNft holding table ``t`` and ``objs`` (added in order)."""
    fake = fake or FakeNft()
    txn = Transaction().add(T)
    for o in objs:
        txn.add(o)
    fake.apply(txn)
    return fake


# -- values -----------------------------------------------------------------------------

class TestValues:
    @pytest.mark.parametrize("given, want", [
        ("10.0.0.1", "10.0.0.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),  # canonical form
    ])
    def test_ip_renders_canonically(self, given, want):
        assert v.ip(given) == want

    @pytest.mark.parametrize("bad", [
        "10.0.0.256", "10.0.0", "evil.example.com", "10.0.0.1 ", "1.2.3.4; flush ruleset", "",
        "fe80::1%eth0",  # a zone index: nft cannot parse it
        "010.0.0.1",  # leading zero (octal ambiguity)
        None, 167772161, True,  # not text
    ])
    def test_bad_ip_rejected(self, bad):
        with pytest.raises(ValueError, match="invalid IP address"):
            v.ip(bad)

    def test_ip_family_pinned(self):
        assert v.ip("10.0.0.1", 4) == "10.0.0.1"
        with pytest.raises(ValueError, match="not an IPv6 address"):
            v.ip("10.0.0.1", 6)
        with pytest.raises(ValueError, match="not an IPv4 address"):
            v.ip("::1", 4)

    def test_cidr(self):
        assert v.cidr("10.0.0.0/8") == "10.0.0.0/8"
        assert v.cidr("fd00::/64", 6) == "fd00::/64"
        for bad in ("10.0.0.1/8", "10.0.0.0/33", "example.com/8", "fe80::%eth0/64", "10.0.0.0/8; x"):
            with pytest.raises(ValueError, match="invalid CIDR"):
                v.cidr(bad)
        with pytest.raises(ValueError, match="not an IPv4 network"):
            v.cidr("fd00::/64", 4)

    @pytest.mark.parametrize("good", [1, 80, 65535])
    def test_port(self, good):
        assert v.port(good) == str(good)

    @pytest.mark.parametrize("bad", [0, 65536, -1, "80", 80.0, True, None])
    def test_bad_port_rejected(self, bad):
        with pytest.raises(ValueError, match="invalid port"):
            v.port(bad)

    def test_proto(self):
        assert [v.proto(p) for p in ("TCP", "udp", "SCTP")] == ["tcp", "udp", "sctp"]
        with pytest.raises(ValueError, match="unsupported protocol 'ICMP'"):
            v.proto("ICMP")

    @pytest.mark.parametrize("good", ["kproxy", "endpoints-2", "_x", "a.b", "a" * 255])
    def test_name(self, good):
        assert v.name(good) == good

    @pytest.mark.parametrize("bad", [
        "", "2chains", "-x", "has space", "a;b", "a{", 'a"', "a" * 256,
        "chain\n", "chain\nflush ruleset",  # a newline would end the nft command
        None, 5,
    ])
    def test_bad_name_rejected(self, bad):
        with pytest.raises(ValueError, match="invalid nftables object name"):
            v.name(bad)

    def test_ifname(self):
        assert v.ifname("eth0") == "eth0"
        assert v.ifname("veth*") == "veth*"
        for bad in ("", "a" * 16, "eth 0", 'eth0"', "eth0\n", "*eth"):
            with pytest.raises(ValueError, match="invalid interface name"):
                v.ifname(bad)

    def test_family(self):
        assert v.family("ip6") == "ip6"
        with pytest.raises(ValueError, match="nft family must be one of"):
            v.family("arp")

    def test_comment_is_quoted_and_safe(self):
        assert v.comment("demo/web:http") == '"demo/web:http"'
        # nft has no escape for a double quote and a newline would end the command
        assert v.comment('say "hi"\nthere') == "\"say 'hi' there\""

    @pytest.mark.parametrize("text", ["a" * 300, "é" * 100, "ü" * 70 + "a"], ids=["ascii", "two-byte", "mixed"])
    def test_long_comment_fits_nft_limit(self, text):
        # nft rejects comments longer than 128 bytes ("comment too long")
        out = v.comment(text)
        inner = out[1:-1]
        assert len(inner.encode()) <= 128
        assert inner.endswith("...") and text.startswith(inner[:-3])

    def test_integer(self):
        assert v.integer(7, 1, 10) == "7"
        for bad in (0, 11, "7", True):
            with pytest.raises(ValueError, match="invalid integer"):
                v.integer(bad, 1, 10)


# -- objects ----------------------------------------------------------------------------

class TestObjects:
    def test_invalid_objects_rejected_when_made(self):
        with pytest.raises(ValueError, match="family"):
            Table("bridge", "t")
        with pytest.raises(ValueError, match="name"):
            Table("ip", "bad name")
        with pytest.raises(ValueError, match="name"):
            Chain("ip", "t", "c\nflush ruleset")
        with pytest.raises(ValueError, match="base chain type"):
            chain("c", type="mangle", hook="input", priority=0)
        with pytest.raises(ValueError, match="unknown hook"):
            chain("c", type="filter", hook="inpt", priority=0)
        with pytest.raises(ValueError, match="needs a priority"):
            chain("c", type="filter", hook="input")
        with pytest.raises(ValueError, match="policy"):
            chain("c", type="filter", hook="input", priority=0, policy="reject")
        with pytest.raises(ValueError, match="empty rule"):
            rule("c", "  ")
        for text in ("accept; flush ruleset", "accept\nflush ruleset", "accept # hidden"):
            with pytest.raises(ValueError, match="newline, ';' or '#'"):
                rule("c", text)
        with pytest.raises(ValueError, match="unknown flag"):
            Set("ip", "t", "s", "ipv4_addr", flags=("bogus",))
        with pytest.raises(ValueError, match="invalid integer"):
            Set("ip", "t", "s", "ipv4_addr", timeout=0)
        for key in ("1.2.3.4 } ; flush ruleset", "1.2.3.4, 5.6.7.8", "1.2.3.4\n"):
            with pytest.raises(ValueError, match="invalid element text"):
                Element("ip", "t", "s", key)
        with pytest.raises(ValueError, match="invalid interface name"):
            Flowtable("ip", "t", "f", devices=("bad name",))

    def test_rule_owner_is_not_identity(self):
        assert rule("c", "accept", owner="a") == rule("c", "accept", owner="b")


# -- transaction rendering --------------------------------------------------------------

class TestTransaction:
    def test_one_line_per_operation(self):
        base = chain("pre", type="nat", hook="prerouting", priority=-100, policy="accept")
        s = Set("ip", "t", "s", "ipv4_addr", flags=("interval",), timeout=60, comment="some ips")
        m = Set("ip", "t", "m", "ipv4_addr . inet_proto . inet_service", "verdict")
        tf = Set("ip", "t", "b", "ip daddr . numgen random mod 1", "ip daddr", typeof=True)
        ft = Flowtable("ip", "t", "f", devices=("eth0", "eth1"))
        txn = (Transaction()
               .add(Table("ip", "t", comment="mine")).create(chain("c")).add(base)
               .add(s).add(m).add(tf).add(ft)
               .add(rule("c", "ip daddr @s accept", comment="c1"))
               .insert(rule("c", "counter")).insert(rule("c", "counter"), 4)
               .replace(rule("c", "drop"), 5)
               .add(Element("ip", "t", "m", "1.2.3.4 . tcp . 80", "goto c", comment="demo/web:http"))
               .create(Element("ip", "t", "s", "10.0.0.0/8"))
               .delete(Element("ip", "t", "m", "1.2.3.4 . tcp . 80", "goto c"))
               .delete(rule("c", "drop"), 5)
               .flush(chain("c")).flush(s).flush(T)
               .delete(ft).delete(m).delete(chain("c")).delete(T))
        assert txn.render().splitlines() == [
            'add table ip t { comment "mine" ; }',
            "create chain ip t c",
            "add chain ip t pre { type nat hook prerouting priority -100 ; policy accept ; }",
            'add set ip t s { type ipv4_addr ; flags interval ; timeout 60s ; comment "some ips" ; }',
            "add map ip t m { type ipv4_addr . inet_proto . inet_service : verdict ; }",
            "add map ip t b { typeof ip daddr . numgen random mod 1 : ip daddr ; }",
            "add flowtable ip t f { hook ingress priority filter ; devices = { eth0, eth1 } ; }",
            'add rule ip t c ip daddr @s accept comment "c1"',
            "insert rule ip t c counter",
            "insert rule ip t c position 4 counter",
            "replace rule ip t c handle 5 drop",
            'add element ip t m { 1.2.3.4 . tcp . 80 comment "demo/web:http" : goto c }',
            "create element ip t s { 10.0.0.0/8 }",
            "delete element ip t m { 1.2.3.4 . tcp . 80 }",
            "delete rule ip t c handle 5",
            "flush chain ip t c",
            "flush set ip t s",
            "flush table ip t",
            "delete flowtable ip t f",
            "delete map ip t m",
            "delete chain ip t c",
            "delete table ip t",
        ]
        assert len(txn) == 22

    def test_create_and_the_other_kinds(self):
        m = Set("ip", "t", "m", "ipv4_addr", "verdict")
        txn = (Transaction().create(T).create(Set("ip", "t", "s", "ipv4_addr")).create(m)
               .create(Flowtable("ip", "t", "f", priority=-5)).create(rule("c", "counter"))
               .flush(m).delete(Set("ip", "t", "s", "ipv4_addr")).delete(Element("ip", "t", "s", "1.2.3.4")))
        assert txn.render().splitlines() == [
            "create table ip t",
            "create set ip t s { type ipv4_addr ; }",
            "create map ip t m { type ipv4_addr : verdict ; }",
            "create flowtable ip t f { hook ingress priority -5 ; }",
            "add rule ip t c counter",  # nft has no "create rule"
            "flush map ip t m",
            "delete set ip t s",
            "delete element ip t s { 1.2.3.4 }",
        ]

    def test_impossible_operations_rejected_when_added(self):
        with pytest.raises(ValueError, match="cannot flush an element"):
            Transaction().flush(Element("ip", "t", "s", "1.2.3.4"))
        with pytest.raises(ValueError, match="cannot flush a flowtable"):
            Transaction().flush(Flowtable("ip", "t", "f"))
        with pytest.raises(ValueError, match="cannot insert a chain"):
            Transaction().insert(chain("c"))
        # a rule is deleted or replaced by its kernel handle: without one, nft gets garbage
        with pytest.raises(ValueError, match="handle"):
            Transaction().delete(rule("c", "accept"))
        with pytest.raises(ValueError, match="handle"):
            Transaction().replace(rule("c", "accept"), None)

    def test_extend_and_empty(self):
        a = Transaction().add(T)
        b = Transaction().add(chain("c"))
        assert a.extend(b).render() == "add table ip t\nadd chain ip t c\n"
        assert Transaction().render() == ""


# -- the fake backend -------------------------------------------------------------------

def rejected(fake, *ops, match):
    """Apply ops (verb, obj[, handle]) as one transaction; it must fail and change nothing."""
    before = fake.dump()
    n_applied = len(fake.transactions)
    txn = Transaction()
    for verb, *args in ops:
        getattr(txn, verb)(*args)
    with pytest.raises(NftError, match=match) as exc:
        fake.apply(txn)
    assert fake.dump() == before
    assert len(fake.transactions) == n_applied
    return exc.value


class TestFakeNft:
    def test_keeps_state(self):
        m = Set("ip", "t", "m", "ipv4_addr", "verdict")
        fake = applied(chain("c"), chain("d"), m, Element("ip", "t", "m", "1.2.3.4", "goto d"),
                       rule("c", "ip daddr vmap @m"), rule("c", "counter"))
        assert fake.list_tables() == [("ip", "t")]
        assert fake.rules("ip", "t", "c") == ["ip daddr vmap @m", "counter"]
        assert fake.elements("ip", "t", "m") == {"1.2.3.4": "goto d"}
        fake.apply(Transaction().add(rule("d", "accept")).add(Element("ip", "t", "m", "5.6.7.8", "accept")))
        assert fake.rules("ip", "t", "d") == ["accept"]
        assert fake.elements("ip", "t", "m") == {"1.2.3.4": "goto d", "5.6.7.8": "accept"}
        assert len(fake.transactions) == 2

    def test_add_is_idempotent_create_is_not(self):
        s = Set("ip", "t", "s", "ipv4_addr")
        e = Element("ip", "t", "s", "1.2.3.4")
        fake = applied(chain("c"), s, e)
        fake.apply(Transaction().add(T).add(chain("c")).add(s).add(e))
        assert fake.elements("ip", "t", "s") == {"1.2.3.4": None}
        rejected(fake, ("create", T), match="File exists")
        rejected(fake, ("create", chain("c")), match="File exists: chain c")
        rejected(fake, ("create", s), match="File exists: set s")
        rejected(fake, ("create", e), match="File exists: element 1.2.3.4")
        ft = Flowtable("ip", "t", "f")
        fake.apply(Transaction().add(ft))
        rejected(fake, ("create", ft), match="File exists: flowtable f")

    def test_redefining_with_other_type_rejected(self):
        fake = applied(chain("c", type="filter", hook="input", priority=0), Set("ip", "t", "s", "ipv4_addr"))
        rejected(fake, ("add", chain("c", type="filter", hook="output", priority=0)), match="another type")
        rejected(fake, ("add", Set("ip", "t", "s", "ipv6_addr")), match="another type")

    def test_missing_table_or_chain(self):
        fake = FakeNft()
        err = rejected(fake, ("add", chain("c")), match="No such file or directory: table ip t")
        assert err.line == 1 and err.text == "add chain ip t c"
        fake = applied(chain("c"))
        err = rejected(fake, ("add", rule("c", "counter")), ("add", rule("nope", "counter")),
                       match="chain nope does not exist")
        assert err.line == 2 and err.text == "add rule ip t nope counter"
        rejected(fake, ("add", Set("ip6", "t", "s", "ipv6_addr")), match="table ip6 t does not exist")

    @pytest.mark.parametrize("text", ["jump nope", "ip daddr 1.2.3.4 goto nope", "ip daddr vmap { 1.2.3.4 : jump nope }"])
    def test_jump_to_missing_chain(self, text):
        fake = applied(chain("c"))
        rejected(fake, ("add", rule("c", text)), match="missing chain nope")

    def test_element_verdict_to_missing_chain(self):
        fake = applied(chain("c"), Set("ip", "t", "m", "ipv4_addr", "verdict"))
        rejected(fake, ("add", Element("ip", "t", "m", "1.2.3.4", "goto nope")), match="missing chain nope")

    def test_reference_to_missing_set_or_flowtable(self):
        fake = applied(chain("c"), Set("ip", "t", "s", "ipv4_addr"))
        fake.apply(Transaction().add(rule("c", "ip daddr @s accept")))
        rejected(fake, ("add", rule("c", "ip daddr @nope accept")), match="set nope does not exist")
        rejected(fake, ("add", rule("c", "ip saddr . ip daddr @nope accept")), match="set nope does not exist")
        rejected(fake, ("add", rule("c", "flow add @ft")), match="flowtable ft does not exist")
        rejected(fake, ("add", Element("ip", "t", "nope", "1.2.3.4")), match="set nope does not exist")

    def test_deleting_missing_objects(self):
        fake = applied(chain("c"), Set("ip", "t", "s", "ipv4_addr"))
        rejected(fake, ("delete", Table("ip", "other")), match="No such file or directory")
        rejected(fake, ("delete", chain("nope")), match="chain nope does not exist")
        rejected(fake, ("delete", Set("ip", "t", "nope", "ipv4_addr")), match="set nope does not exist")
        rejected(fake, ("delete", Element("ip", "t", "s", "1.2.3.4")), match="element 1.2.3.4 not in s")
        rejected(fake, ("delete", Flowtable("ip", "t", "f")), match="flowtable f does not exist")
        rejected(fake, ("delete", rule("c", "counter"), 999), match="no rule with handle 999")

    def test_deleting_referenced_objects(self):
        m = Set("ip", "t", "m", "ipv4_addr", "verdict")
        s = Set("ip", "t", "s", "ipv4_addr")
        ft = Flowtable("ip", "t", "f")
        fake = applied(chain("c"), chain("d"), chain("e"), m, s, ft,
                       rule("c", "jump d"), rule("c", "ip daddr @s flow add @f"),
                       Element("ip", "t", "m", "1.2.3.4", "goto e"))
        rejected(fake, ("delete", chain("d")), match="Device or resource busy: chain d is referenced by a rule in c")
        rejected(fake, ("delete", chain("e")), match="chain e is referenced by an element of m")
        rejected(fake, ("delete", s), match="Device or resource busy: set s is used by a rule in c")
        rejected(fake, ("delete", ft), match="flowtable f is used by a rule in c")
        # once the references are gone, the objects can go too (a chain with rules goes with them)
        fake.apply(Transaction().delete(Element("ip", "t", "m", "1.2.3.4")).delete(chain("c"))
                   .delete(chain("d")).delete(chain("e")).delete(s).delete(ft))
        assert fake.dump() == (
            "table ip t\n"
            "  map ip t m { type ipv4_addr : verdict ; }\n"
        )

    def test_map_element_conflicts(self):
        m = Set("ip", "t", "m", "ipv4_addr", "verdict")
        fake = applied(chain("a"), chain("b"), m, Element("ip", "t", "m", "1.2.3.4", "goto a"))
        fake.apply(Transaction().add(Element("ip", "t", "m", "1.2.3.4", "goto a")))  # same value: fine
        rejected(fake, ("add", Element("ip", "t", "m", "1.2.3.4", "goto b")), match="File exists: element 1.2.3.4 in m")
        rejected(fake, ("add", Element("ip", "t", "m", "5.6.7.8")), match="needs a value in map m")
        fake.apply(Transaction().add(Set("ip", "t", "s", "ipv4_addr")))
        rejected(fake, ("add", Element("ip", "t", "s", "5.6.7.8", "accept")), match="cannot have a value in set s")
        assert fake.elements("ip", "t", "m") == {"1.2.3.4": "goto a"}

    def test_rule_handles(self):
        fake = applied(chain("c"), rule("c", "counter"), rule("c", "accept"))  # handles 1 and 2
        fake.apply(Transaction().insert(rule("c", "first")).insert(rule("c", "before-accept"), 2))
        assert fake.rules("ip", "t", "c") == ["first", "counter", "before-accept", "accept"]
        fake.apply(Transaction().replace(rule("c", "drop"), 1).delete(rule("c", "accept"), 2))
        assert fake.rules("ip", "t", "c") == ["first", "drop", "before-accept"]
        rejected(fake, ("replace", rule("c", "drop"), 2), match="no rule with handle 2")
        rejected(fake, ("insert", rule("c", "x"), 2), match="no rule with handle 2")

    def test_flush(self):
        s = Set("ip", "t", "s", "ipv4_addr")
        fake = applied(chain("c"), s, Element("ip", "t", "s", "1.2.3.4"), rule("c", "ip daddr @s accept"))
        fake.apply(Transaction().flush(chain("c")))
        assert fake.rules("ip", "t", "c") == []
        fake.apply(Transaction().add(rule("c", "counter")).flush(s))
        assert fake.elements("ip", "t", "s") == {}
        rejected(fake, ("flush", chain("nope")), match="chain nope does not exist")
        rejected(fake, ("flush", Set("ip", "t", "nope", "ipv4_addr")), match="set nope does not exist")

    def test_flush_table_removes_rules_but_keeps_chains_sets_and_elements(self):
        # what nft does: "flush table" empties the chains; sets keep their elements
        s = Set("ip", "t", "s", "ipv4_addr")
        fake = applied(chain("c"), s, Element("ip", "t", "s", "1.2.3.4"), rule("c", "ip daddr @s accept"))
        fake.apply(Transaction().flush(T))
        assert fake.rules("ip", "t", "c") == []
        assert fake.elements("ip", "t", "s") == {"1.2.3.4": None}

    def test_delete_table_takes_everything(self):
        fake = applied(chain("c"), Set("ip", "t", "s", "ipv4_addr"), rule("c", "ip daddr @s accept"))
        fake.apply(Transaction().delete(T))
        assert fake.list_tables() == [] and fake.dump() == ""

    def test_failed_transaction_is_atomic(self):
        m = Set("ip", "t", "m", "ipv4_addr", "verdict")
        fake = applied(chain("c"), chain("d"), m, Element("ip", "t", "m", "1.2.3.4", "goto d"), rule("c", "counter"))
        before = fake.dump()
        # everything before the bad op was valid and would have changed the state
        err = rejected(fake,
                       ("add", Table("ip6", "t6")), ("delete", Element("ip", "t", "m", "1.2.3.4")),
                       ("flush", chain("c")), ("add", chain("new")), ("add", rule("new", "accept")),
                       ("delete", chain("d")), ("add", rule("c", "jump nope")),
                       match="missing chain nope")
        assert err.line == 7 and "line 7: add rule ip t c jump nope" in str(err)
        assert fake.dump() == before
        assert fake.list_tables() == [("ip", "t")]
        # and the next transaction sees the old state: handle numbering goes on as before
        fake.apply(Transaction().replace(rule("c", "accept"), 1))
        assert fake.rules("ip", "t", "c") == ["accept"]

    def test_check_validates_without_applying(self):
        fake = applied(chain("c"))
        before = fake.dump()
        fake.check(Transaction().add(chain("d")).add(rule("c", "jump d")))
        assert fake.dump() == before
        assert len(fake.transactions) == 1  # check() applied nothing
        with pytest.raises(NftError, match="missing chain"):
            fake.check(Transaction().add(rule("c", "jump d")))
        assert fake.dump() == before

    def test_dump_is_normalised(self):
        objs = [chain("b"), chain("a", type="filter", hook="input", priority=0), Set("ip", "t", "s", "ipv4_addr"),
                Element("ip", "t", "s", "10.0.0.2"), Element("ip", "t", "s", "10.0.0.1"),
                rule("a", "ip daddr @s jump b"), rule("a", "counter", comment="count")]
        one = applied(*objs)
        other = applied(*(objs[2:3] + objs[4:2:-1] + objs[1::-1] + objs[5:]))  # another declaration order
        assert one.dump() == other.dump() == (
            "table ip t\n"
            "  chain ip t a { type filter hook input priority 0 ; }\n"
            "    ip daddr @s jump b\n"
            '    counter comment "count"\n'
            "  chain ip t b\n"
            "  set ip t s { type ipv4_addr ; }\n"
            "    10.0.0.1\n"
            "    10.0.0.2\n"
        )
        reordered_rules = applied(*objs[:5], objs[6], objs[5])
        assert reordered_rules.dump() != one.dump()  # rule order matters


# -- nft's error messages ---------------------------------------------------------------

def test_parse_error_names_the_offending_line():
    text = "add table ip t\nadd chain ip t c\nadd rule ip t c ip daddr 1.2.3.4 jump nope\n"
    stderr = ("/dev/stdin:3:39-42: Error: Could not process rule: No such file or directory\n"
              "add rule ip t c ip daddr 1.2.3.4 jump nope\n"
              "                                      ^^^^\n")
    err = parse_error(stderr, text)
    assert isinstance(err, NftError)
    assert err.line == 3
    assert err.text == "add rule ip t c ip daddr 1.2.3.4 jump nope"
    assert err.message == "Could not process rule: No such file or directory"
    assert str(err) == ("Could not process rule: No such file or directory "
                        "(line 3: add rule ip t c ip daddr 1.2.3.4 jump nope)")


def test_parse_error_without_location():
    err = parse_error("Error: Could not process rule: Operation not permitted\n", "add table ip t\n")
    assert err.line is None
    assert str(err) == "Error: Could not process rule: Operation not permitted"
    assert str(parse_error("", "add table ip t\n")) == "nft failed without a message"


def test_list_elements_reads_nfts_json(monkeypatch):
    """NftCLI.list_elements on nft 1.0.6's JSON for a timeout map and a concatenated set."""
    import subprocess

    from kproxy.nft import NftCLI, Set

    outputs = {
        "aff": '{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip", "name": "aff", '
               '"table": "t", "type": "ipv4_addr", "map": "ipv4_addr", "flags": ["timeout"], "elem": ['
               '[{"elem": {"val": "10.0.24.2", "timeout": 10800, "expires": 10793}}, "10.0.21.2"], '
               '["10.0.24.3", "10.0.22.2"]]}}]}',
        "eps": '{"nftables": [{"set": {"family": "ip", "name": "eps", "table": "t", "type": ["ipv4_addr", '
               '"inet_service"], "elem": [{"concat": ["10.1.1.1", 80]}]}}]}',
        "v": '{"nftables": [{"map": {"family": "ip", "name": "v", "table": "t", "type": "inet_service", '
             '"map": "verdict", "elem": [[80, {"goto": {"target": "c-2"}}], [81, {"drop": null}]]}}]}',
    }
    calls = []

    def run(self, args, input_text=None):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, outputs[args[-1]], "")

    monkeypatch.setattr(NftCLI, "_run", run)
    nft = NftCLI()
    assert nft.list_elements(Set("ip", "t", "aff", "ipv4_addr", "ipv4_addr")) == {
        "10.0.24.2": "10.0.21.2", "10.0.24.3": "10.0.22.2"}
    assert nft.list_elements(Set("ip", "t", "eps", "ipv4_addr . inet_service")) == {"10.1.1.1 . 80": None}
    assert nft.list_elements(Set("ip", "t", "v", "inet_service", "verdict")) == {"80": "goto c-2", "81": "drop"}
    assert calls[0] == ["-j", "list", "map", "ip", "t", "aff"] and calls[1][2] == "set"


def test_elements_expand_indexed_runs():
    els = Elements("ip", "kproxy", "m", (("10.0.0.1 . tcp . 80", ("10.1.0.1 . 8080", "10.1.0.2 . 8080"), "ns/a:http"),
                                          ("10.0.0.2 . tcp . 80", "goto x", None)))
    assert Transaction().add(els).render() == (
        'add element ip kproxy m { 10.0.0.1 . tcp . 80 . 0 comment "ns/a:http" : 10.1.0.1 . 8080, '
        '10.0.0.1 . tcp . 80 . 1 comment "ns/a:http" : 10.1.0.2 . 8080, 10.0.0.2 . tcp . 80 : goto x }\n')
    assert Transaction().delete(els).render() == (
        "delete element ip kproxy m { 10.0.0.1 . tcp . 80 . 0, 10.0.0.1 . tcp . 80 . 1, 10.0.0.2 . tcp . 80 }\n")
    assert [(e.key, e.value) for e in els.split()] == [
        ("10.0.0.1 . tcp . 80 . 0", "10.1.0.1 . 8080"), ("10.0.0.1 . tcp . 80 . 1", "10.1.0.2 . 8080"),
        ("10.0.0.2 . tcp . 80", "goto x")]


# nft 1.0.6's answers to list_objects' command file for table t of family ip: the
# family's chains, sets (all of them: "list sets table" only checks the table is there),
# maps and flowtables. In t two base chains and one regular, sets and maps (dynamic ones
# show only "timeout"), a flowtable; in table other a chain, a set and a flowtable of the
# same names
_LIST_IP = "\n".join([
    '{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, '
    '{"chain": {"family": "ip", "table": "t", "name": "svc", "handle": 1}}, '
    '{"chain": {"family": "ip", "table": "t", "name": "pre", "handle": 2, "type": "nat", "hook": "prerouting", '
    '"prio": -100, "policy": "accept"}}, {"chain": {"family": "ip", "table": "t", "name": "out", "handle": 3, '
    '"type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}, '
    '{"chain": {"family": "ip", "table": "other", "name": "svc", "handle": 1, "type": "filter", "hook": "input", "prio": 0}}]}',
    '{"nftables": [{"set": {"family": "ip", "name": "cidrs", "table": "t", "type": "ipv4_addr", "handle": 4, '
    '"flags": ["interval"]}}, {"set": {"family": "ip", "name": "eps", "table": "t", "type": ["ipv4_addr", '
    '"inet_service"], "handle": 5}}, {"set": {"family": "ip", "name": "ts", "table": "t", "type": "ipv4_addr", '
    '"handle": 10, "flags": ["timeout"]}}, {"set": {"family": "ip", "name": "cidrs", "table": "other", '
    '"type": "ipv6_addr", "handle": 2}}]}',
    '{"nftables": [{"map": {"family": "ip", "name": "vm", "table": "t", "type": ["ipv4_addr", "inet_proto", '
    '"inet_service"], "handle": 6, "map": "verdict"}}, {"map": {"family": "ip", "name": "nmap", "table": "t", '
    '"type": "integer", "handle": 7, "map": "ipv4_addr"}}, {"map": {"family": "ip", "name": "aff", "table": "t", '
    '"type": "ipv4_addr", "handle": 8, "map": "ipv4_addr", "flags": ["timeout"], "timeout": 10800}}]}',
    '{"nftables": [{"flowtable": {"family": "ip", "name": "ft", "table": "t", "handle": 12, "hook": "ingress", '
    '"prio": 0, "dev": "eth0"}}, {"flowtable": {"family": "ip", "name": "ft", "table": "other", "handle": 4, '
    '"hook": "ingress", "prio": 0, "dev": ["eth0", "eth1"]}}]}',
]) + "\n"


def _fake_nft_run(monkeypatch, stdout, returncode=0, stderr=""):
    """NftCLI._run answering ``stdout``; returns the list of (args, command file text)."""
    import subprocess

    from kproxy.nft import NftCLI

    calls = []

    def run(self, args, input_text=None):
        calls.append((args, open(args[-1]).read() if args[-2] == "-f" else None))
        return subprocess.CompletedProcess(args, returncode, stdout, stderr)

    monkeypatch.setattr(NftCLI, "_run", run)
    return calls


def test_list_objects_reads_one_table_from_the_family_listings(monkeypatch):
    """list_objects asks for the family's chains, terse sets and maps and flowtables in
    one nft run (not ``list table``, which fetches every element) and keeps one table's."""
    from kproxy.nft import NftCLI

    calls = _fake_nft_run(monkeypatch, _LIST_IP)
    got = NftCLI().list_objects("ip", "t")
    assert calls == [(["-j", "-t", "-f", calls[0][0][-1]],
                      "list chains ip\nlist sets table ip t\nlist maps ip\nlist flowtables ip\n")]
    assert got.chains == {"svc": chain("svc"), "pre": chain("pre", type="nat", hook="prerouting", priority=-100),
                          "out": chain("out", type="filter", hook="output", priority=0)}
    assert list(got.chains) == ["svc", "pre", "out"]
    assert got.sets == {
        "cidrs": Set("ip", "t", "cidrs", "ipv4_addr", flags=("interval",)),
        "eps": Set("ip", "t", "eps", "['ipv4_addr', 'inet_service']"),
        "vm": Set("ip", "t", "vm", "['ipv4_addr', 'inet_proto', 'inet_service']", "verdict"),
        "nmap": Set("ip", "t", "nmap", "integer", "ipv4_addr"),
        "aff": Set("ip", "t", "aff", "ipv4_addr", "ipv4_addr", flags=("timeout",)),
        "ts": Set("ip", "t", "ts", "ipv4_addr", flags=("timeout",)),
    }
    assert list(got.sets) == ["cidrs", "eps", "vm", "nmap", "aff", "ts"]  # kernel order, as ``list table`` has it
    assert got.flowtables == {"ft": Flowtable("ip", "t", "ft", devices=("eth0",))}
    other = NftCLI().list_objects("ip", "other")
    assert other.chains == {"svc": Chain("ip", "other", "svc", type="filter", hook="input", priority=0)}
    assert other.sets == {"cidrs": Set("ip", "other", "cidrs", "ipv6_addr")}
    assert other.flowtables["ft"].devices == ("eth0", "eth1")


def test_list_objects_errors_name_the_table(monkeypatch):
    from kproxy.nft import NftCLI

    calls = _fake_nft_run(monkeypatch, "", 1, "/tmp/kproxy-list-x.nft:2:20-23: Error: No such file or directory\n"
                                              "list sets table ip gone\n                   ^^^^\n")
    with pytest.raises(NftError, match=r"^nft list table ip gone failed: /tmp/kproxy-list-x.nft:2:20-23: Error: No such"):
        NftCLI().list_objects("ip", "gone")
    assert calls[0][1].splitlines()[1] == "list sets table ip gone"
    _fake_nft_run(monkeypatch, "", 1)
    with pytest.raises(NftError, match=r"^nft list table ip t failed: exit status 1$"):
        NftCLI().list_objects("ip", "t")
    for family, table in (("nope", "t"), ("ip", "t\nflush ruleset"), ("ip", "t u")):
        with pytest.raises(NftError, match=r"failed: not a family and table name nft reads$"):
            NftCLI().list_objects(family, table)
    _fake_nft_run(monkeypatch, _LIST_IP.split("\n", 1)[1])  # an answer missing
    with pytest.raises(NftError, match=r"^nft list table ip t failed: 3 answers to 4 commands$"):
        NftCLI().list_objects("ip", "t")
    _fake_nft_run(monkeypatch, _LIST_IP[:-40])
    with pytest.raises(NftError, match=r"^nft list table ip t failed: unreadable output"):
        NftCLI().list_objects("ip", "t")


def test_list_tables_reads_the_terse_ruleset(monkeypatch):
    """list_tables takes the tables from ``-t list ruleset`` (``list tables`` fetches every
    element with nft 1.0.6)."""
    from kproxy.nft import NftCLI

    calls = _fake_nft_run(monkeypatch, '{"nftables": [{"metainfo": {"version": "1.0.6"}}, '
                                       '{"table": {"family": "ip", "name": "kproxy", "handle": 1}}, '
                                       '{"chain": {"family": "ip", "table": "kproxy", "name": "c", "handle": 1}}, '
                                       '{"set": {"family": "ip", "name": "s", "table": "kproxy", "type": "ipv4_addr"}}, '
                                       '{"table": {"family": "inet", "name": "filter", "handle": 2}}]}\n')
    assert NftCLI().list_tables() == [("ip", "kproxy"), ("inet", "filter")]
    assert calls == [(["-j", "-t", "list", "ruleset"], None)]
    _fake_nft_run(monkeypatch, "", 1, "Error: Could not process rule: Operation not permitted\n")
    with pytest.raises(NftError, match=r"^nft list tables failed: Error: Could not process rule"):
        NftCLI().list_tables()
