"""The sync engine with the in-memory nft backend: ownership, failures, ordering, the built-ins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kproxy_plugins import DEFAULT_PLUGINS

from kproxy import config as configmod
from kproxy import hookimpl, model
from kproxy.app import App
from kproxy.links import Link
from kproxy.nft import Chain, FakeNft, Rule, Set, Table, Transaction
from kproxy.pluginmanager import make_manager
from kproxy.sources import manifests

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
FAM, TBL = "ip", "kproxy"


def cfg():
    return configmod.from_dict({"hostnameOverride": "node-1", "clusterCIDR": "10.0.0.0/16"})


def make_app(*named_plugins, backend=None, config=None):
    """An App whose plugins are called in the order given (like ``--plugin a --plugin b``)."""
    pm = make_manager()
    for name, plugin in reversed(named_plugins):  # pluggy calls the last registered first
        pm.register(plugin, name=name)
    return App(config or cfg(), backend or FakeNft(), pm, [n for n, _ in named_plugins])


def chain(name, **kw):
    return Chain(FAM, TBL, name, **kw)


class Declarer:
    """Declares objects and elements; contributes fixed rules to chains by name."""

    def __init__(self, objs=(), elements=(), rules=None):
        self.objs, self.elements, self.rule_map = list(objs), list(elements), dict(rules or {})

    @hookimpl
    def kproxy_pre_render(self, ctx):
        for o in self.objs:
            ctx.declare(o)
        for s, key, value in self.elements:
            ctx.add_element(s, key, value)

    @hookimpl
    def kproxy_render_chain(self, ctx, chain):
        return self.rule_map.get(chain.name)


class Boom:
    """Raises in one hook when armed."""

    def __init__(self, hook):
        self.hook, self.armed = hook, False

    @hookimpl
    def kproxy_pre_render(self, ctx):
        if self.armed and self.hook == "kproxy_pre_render":
            raise RuntimeError("kaput")

    @hookimpl
    def kproxy_render_chain(self, ctx, chain):
        if self.armed and self.hook == "kproxy_render_chain":
            raise RuntimeError("kaput")
        return None


class Recorder:
    def __init__(self):
        self.results = []

    @hookimpl
    def kproxy_post_apply(self, ctx, result):
        self.results.append((ctx, result))


# -- ownership and consistency ----------------------------------------------------------

def test_object_declared_by_two_plugins_names_both():
    app = make_app(("first", Declarer([chain("c")])), ("second", Declarer([chain("c")])))
    result = app.sync()
    assert not result.ok
    assert result.error == "plugin second declares chain ip kproxy c, which plugin first already declared"
    assert app.backend.list_tables() == []


def test_same_plugin_may_declare_an_object_twice():
    app = make_app(("p", Declarer([chain("c"), chain("c")], rules={"c": ["counter"]})))
    assert app.sync().ok
    assert app.backend.rules(FAM, TBL, "c") == ["counter"]


def test_element_into_undeclared_set():
    ghost = Set(FAM, TBL, "ghost", "ipv4_addr")
    app = make_app(("p", Declarer([chain("c")], elements=[(ghost, "10.0.0.1", None)])))
    result = app.sync()
    assert not result.ok
    assert result.error == "plugin p: element 10.0.0.1 added to undeclared set ghost"
    assert app.backend.list_tables() == []


def test_failed_plugin_is_the_plugin_name_for_every_kind_of_error():
    ghost = Set(FAM, TBL, "ghost", "ipv4_addr")
    app = make_app(("p", Declarer([chain("c")], elements=[(ghost, "10.0.0.1", None)])))
    assert app.sync().failed_plugin == "p"
    app = make_app(("q", Declarer([chain("c")], rules={"c": ["accept; drop"]})))
    assert app.sync().failed_plugin == "q"
    app = make_app(("a", Declarer([chain("c")])), ("b", Declarer([chain("c")])))
    assert app.sync().failed_plugin == "b"


def test_conflicting_element_values_name_both_plugins():
    m = Set(FAM, TBL, "m", "ipv4_addr", "verdict")
    app = make_app(("a", Declarer([chain("x"), m], elements=[(m, "10.0.0.1", "goto x")])),
                   ("b", Declarer(elements=[(m, "10.0.0.1", "accept")])))
    result = app.sync()
    assert not result.ok and result.failed_plugin == "b"
    assert result.error.startswith("plugin b: element 10.0.0.1 of m ")
    assert "plugin a" in result.error and "goto x" in result.error and "accept" in result.error


class PerService:
    """Declares, in each Service's scope, what ``declare(service)`` returns:
    (objects, elements) where elements are (set, key, value)."""

    def __init__(self, declare, rules=None):
        self.declare, self.rule_map = declare, dict(rules or {})

    @hookimpl
    def kproxy_pre_render(self, ctx):
        for svc in ctx.services():
            objs, elements = self.declare(svc)
            with ctx.scope_of(svc):
                for o in objs:
                    ctx.declare(o)
                for s, key, value in elements:
                    ctx.add_element(s, key, value)

    @hookimpl
    def kproxy_render_chain(self, ctx, chain):
        return self.rule_map.get(chain.name)


def _services(app, names):
    for i, name in enumerate(names):
        app.state.put(model.Service(namespace="ns", name=name, type="ClusterIP", cluster_ips=(f"172.30.0.{i + 1}",),
                                    ports=(model.ServicePort("p", "TCP", 80),)))


def test_scopes_that_declare_an_object_differently_fail_full_and_partial_syncs():
    app = make_app(("p", PerService(lambda svc: ([chain("shared", comment=svc.name if svc.name == "b" else None)], []))))
    _services(app, ["a"])
    assert app.sync(full=True).ok
    _services(app, ["a", "b"])
    result = app.sync()  # partial: b's scope disagrees with a's
    assert not result.ok and result.error == "plugin p declares chain ip kproxy shared in two different ways"
    result = app.sync(full=True)
    assert not result.ok and result.error == "plugin p declares chain ip kproxy shared in two different ways"


def test_scopes_that_share_an_object_and_an_element_agree(caplog):
    m = Set(FAM, TBL, "m", "ipv4_addr", "verdict")
    app = make_app(("g", Declarer([m])),
                   ("p", PerService(lambda svc: ([chain("x")], [(m, "10.0.0.1", "goto x")]), rules={"x": ["accept"]})))
    _services(app, ["a", "b", "c"])
    result = app.sync(full=True)
    assert result.ok and "wanted with different values" not in caplog.text
    assert app.backend.elements(FAM, TBL, "m") == {"10.0.0.1": "goto x"}
    app.state.remove("Service", "ns", "a")
    app.state.remove("Service", "ns", "b")
    result = app.sync()  # c still wants both
    assert result.ok and not result.full
    assert app.backend.elements(FAM, TBL, "m") == {"10.0.0.1": "goto x"}
    app.state.remove("Service", "ns", "c")
    assert app.sync().ok
    assert app.backend.elements(FAM, TBL, "m") == {}


def test_scopes_that_want_an_element_with_different_values_are_logged(caplog):
    m = Set(FAM, TBL, "m", "ipv4_addr", "verdict")
    app = make_app(("g", Declarer([m])),
                   ("p", PerService(lambda svc: ([], [(m, "10.0.0.1", "drop" if svc.name == "b" else "accept")]))))
    _services(app, ["a", "b"])
    assert app.sync(full=True).ok
    assert "element 10.0.0.1 of m is wanted with different values; using accept" in caplog.text
    assert app.backend.elements(FAM, TBL, "m") == {"10.0.0.1": "accept"}


def test_plugin_table_must_be_prefixed():
    app = make_app(("p", Declarer([Table("ip", "mine")])))
    result = app.sync()
    assert not result.ok and "plugin p: table name 'mine' must start with 'kproxy-'" in result.error


# -- failures leave the previous ruleset ------------------------------------------------

@pytest.mark.parametrize("hook", ["kproxy_pre_render", "kproxy_render_chain"])
def test_raising_plugin_aborts_the_sync_and_keeps_the_previous_rules(hook):
    boom = Boom(hook)
    recorder = Recorder()
    app = make_app(("base", Declarer([chain("c")], rules={"c": ["counter"]})), ("boom", boom), ("rec", recorder))
    first = app.sync()
    assert first.ok and first.error is None and first.failed_plugin is None
    before = app.backend.dump()
    assert "counter" in before
    applied = len(app.backend.transactions)

    boom.armed = True
    result = app.sync()
    assert not result.ok
    assert result.error == f"plugin boom raised in {hook}: RuntimeError: kaput"
    assert result.failed_plugin == "boom"
    assert app.backend.dump() == before and len(app.backend.transactions) == applied
    assert recorder.results[-1][1] is result  # post_apply hears about the failure too
    assert app.engine.needs_full

    boom.armed = False
    assert app.sync().ok and app.backend.dump() == before


def test_transaction_rejected_by_nft_keeps_the_previous_rules():
    target = Declarer([chain("c"), chain("d")], rules={"c": ["jump d"]})
    app = make_app(("p", target))
    assert app.sync().ok
    before = app.backend.dump()
    target.rule_map["c"] = ["counter", "ip daddr @nowhere counter"]  # a set that does not exist
    result = app.sync()
    assert not result.ok and result.failed_plugin is None
    assert result.error.startswith("nft rejected the transaction: No such file or directory: set nowhere does not exist")
    assert app.backend.dump() == before


def test_jump_to_undeclared_chain_fails_whatever_the_kernel_holds():
    target = Declarer([chain("c"), chain("d")], rules={"c": ["jump d"], "d": ["counter"]})
    app = make_app(("p", target))
    assert app.sync().ok
    target.objs = [chain("c")]  # d is no longer declared, c still jumps to it
    result = app.sync()
    fresh = make_app(("p", target))  # the same render into an empty kernel (e.g. after a reboot)
    assert not fresh.sync().ok
    assert not result.ok


def test_bad_rule_text_names_the_plugin():
    app = make_app(("p", Declarer([chain("c")], rules={"c": ["accept; flush ruleset"]})))
    result = app.sync()
    assert not result.ok and result.error.startswith("plugin p: bad rule for chain c:")


def test_bare_string_from_render_chain_is_not_split_into_characters():
    app = make_app(("p", Declarer([chain("c")], rules={"c": "counter"})))
    result = app.sync()
    # either the string is taken as one rule, or the sync fails naming the plugin
    if result.ok:
        assert app.backend.rules(FAM, TBL, "c") == ["counter"]
    else:
        assert result.error.startswith("plugin p")


# -- ordering, results, owners ----------------------------------------------------------

class TryFirst(Declarer):
    @hookimpl(tryfirst=True)
    def kproxy_render_chain(self, ctx, chain):
        return self.rule_map.get(chain.name)


def test_render_chain_results_concatenated_in_plugin_order():
    app = make_app(("a", Declarer([chain("c")], rules={"c": ["meta mark 1 counter", ("meta mark 2 counter", "two")]})),
                   ("b", Declarer(rules={"c": ["meta mark 3 counter"]})),
                   ("c", Declarer(rules={"c": None})),
                   ("d", TryFirst(rules={"c": ["meta mark 0 counter"]})))
    assert app.sync().ok
    assert app.backend.rules(FAM, TBL, "c") == ["meta mark 0 counter", "meta mark 1 counter",
                                               'meta mark 2 counter comment "two"', "meta mark 3 counter"]


def test_post_apply_receives_the_result_and_rules_carry_their_owner():
    recorder = Recorder()
    app = make_app(("a", Declarer([chain("c"), Set(FAM, TBL, "s", "ipv4_addr")], rules={"c": ["ip daddr @s counter"]})),
                   ("b", Declarer(rules={"c": ["accept"]})), ("rec", recorder))
    result = app.sync()
    assert result.ok and app.last_result is result
    ctx, got = recorder.results[-1]
    assert got is result
    rules = [op.obj for op in result.transaction.ops if isinstance(op.obj, Rule)]
    assert [(r.text, r.owner) for r in rules] == [("ip daddr @s counter", "a"), ("accept", "b")]
    assert ctx.owner(chain("c")) == "a" and ctx.owner(Set(FAM, TBL, "s", "ipv4_addr")) == "a"
    assert result.transaction.render() == "".join(op.render() + "\n" for op in app.backend.transactions[-1].ops)


def test_plugin_tables_come_and_go_and_other_tables_are_left_alone():
    fake = FakeNft()
    fake.apply(Transaction().add(Table("ip", "filter")).add(Chain("ip", "filter", "input")))
    extra = Declarer([Table("ip", "kproxy-extra"), Chain("ip", "kproxy-extra", "x")], rules={"x": ["counter"]})
    app = make_app(("p", Declarer([chain("c")])), ("extra", extra), backend=fake)
    assert app.sync().ok
    assert {("ip", "filter"), ("ip", "kproxy"), ("ip", "kproxy-extra")} <= set(fake.list_tables())
    assert fake.rules("ip", "kproxy-extra", "x") == ["counter"]
    extra.objs = []
    assert app.sync().ok
    assert ("ip", "kproxy-extra") not in fake.list_tables()
    assert {("ip", "filter"), ("ip", "kproxy")} <= set(fake.list_tables())
    assert fake.dump().startswith("table ip filter\n  chain ip filter input\n")


def test_a_full_sync_names_the_tables_it_creates():
    """Only tables not in the kernel: a backend may build those ahead of the transaction."""
    fake = FakeNft()
    fake.apply(Transaction().add(Table("ip", "kproxy-extra")))
    extra = Declarer([Table("ip", "kproxy-extra"), Chain("ip", "kproxy-extra", "x")])
    app = make_app(("p", Declarer([chain("c")])), ("extra", extra), backend=fake)
    first = app.sync()
    assert first.ok and first.transaction.new_tables == {("ip", "kproxy"), ("ip6", "kproxy")}
    again = app.sync(full=True)
    assert again.ok and again.transaction.new_tables == set()


def test_resync_rewrites_the_same_ruleset():
    app = make_app(("a", Declarer([chain("c"), chain("d")], rules={"c": ["jump d"], "d": ["counter"]})))
    assert app.sync().ok
    first = app.backend.dump()
    assert app.sync().ok
    assert app.backend.dump() == first


# -- the built-in plugins ---------------------------------------------------------------

@pytest.fixture
def builtin_app(monkeypatch):
    """The default plugin set on the demo config and manifests, with a fixed set of links."""
    from kproxy_plugins import interfaces

    links = (Link("eth0", 2, "", True, False), Link("lo", 1, "", True, True))
    monkeypatch.setattr(interfaces, "list_links", lambda: links)
    config = configmod.load(str(DEMO / "kproxy-config.yaml"), warn=pytest.fail)
    app = App.from_config(config, FakeNft())
    assert app.enabled == list(DEFAULT_PLUGINS)
    state, problems = manifests.load(str(DEMO / "manifests"), config.node_name)
    assert problems == []
    app.state.replace_all(state)
    return app


def dnat_target(fake, chain_name):
    """(endpoint count, backends map) of the DNAT rule of a dispatch chain."""
    rules = fake.rules(FAM, TBL, chain_name)
    found = [m for r in rules if (m := re.search(r"numgen random mod (\d+) map @([\w.-]+)", r))]
    assert len(found) == 1, rules
    return int(found[0][1]), found[0][2]


def test_demo_sync_with_builtin_plugins(builtin_app):
    result = builtin_app.sync()
    assert result.ok, result.error
    fake = builtin_app.backend
    assert fake.elements(FAM, TBL, "cluster-ips") == {"172.30.0.10": None, "172.30.0.53": None, "172.30.0.99": None}
    service_ips = fake.elements(FAM, TBL, "service-ips")
    assert set(service_ips) == {"172.30.0.10 . tcp . 80", "172.30.0.53 . udp . 53"}
    # follow web's packets: service-ips -> goto a chain that picks one of 2 endpoints -> backends
    verdict = service_ips["172.30.0.10 . tcp . 80"]
    assert verdict == service_ips["172.30.0.53 . udp . 53"]  # same endpoint count: same chain
    target = re.fullmatch(r"goto ([\w-]+)", verdict)[1]
    assert target.endswith("-2")
    count, backends_map = dnat_target(fake, target)
    backends = fake.elements(FAM, TBL, backends_map)
    assert count == 2
    assert {k: v for k, v in backends.items() if k.startswith("172.30.0.10 ")} == {
        "172.30.0.10 . tcp . 80 . 0": "10.0.1.2 . 8080", "172.30.0.10 . tcp . 80 . 1": "10.0.2.2 . 8080"}
    assert {k: v for k, v in backends.items() if k.startswith("172.30.0.53 ")} == {
        "172.30.0.53 . udp . 53 . 0": "10.0.1.2 . 5353", "172.30.0.53 . udp . 53 . 1": "10.0.2.2 . 5353"}
    # demo/empty has no endpoints: rejected
    assert fake.elements(FAM, TBL, "no-endpoint-services") == {"172.30.0.99 . tcp . 80": "goto reject-chain"}
    assert fake.rules(FAM, TBL, "reject-chain") == ["reject"]
    # hairpin: every endpoint talking to itself through its Service is masqueraded
    assert fake.elements(FAM, TBL, "hairpin") == {"10.0.1.2 . 10.0.1.2": None, "10.0.2.2 . 10.0.2.2": None}
    # off-cluster sources to ClusterIPs are marked for masquerade (clusterCIDR 10.0.0.0/16, bit 14)
    assert any("ip daddr @cluster-ips ip saddr != 10.0.0.0/16" in r and "0x4000" in r
               for r in fake.rules(FAM, TBL, "services"))
    # every object and rule is attributed to the enabled plugin that made it
    ctx = builtin_app.engine.last_context
    assert {"service-maps", "masquerade"} <= set(ctx.owners.values()) <= set(builtin_app.enabled) | {"kproxy"}
    owners = {op.obj.owner for op in result.transaction.ops if isinstance(op.obj, Rule)}
    assert {"service-maps", "masquerade"} <= owners <= set(builtin_app.enabled)


def test_builtins_resync_is_stable(builtin_app):
    assert builtin_app.sync().ok
    first = builtin_app.backend.dump()
    assert builtin_app.sync().ok
    assert builtin_app.backend.dump() == first


def services_with_endpoints(counts, node="node-1"):
    """Service i with ClusterIP 172.30.x.y and counts[i] ready endpoints."""
    objs = [model.from_api("Node", {"kind": "Node", "metadata": {"name": node}})]
    for i, n in enumerate(counts):
        name = f"svc-{i}"
        objs.append(model.from_api("Service", {
            "kind": "Service", "metadata": {"name": name, "namespace": "load"},
            "spec": {"clusterIP": f"172.30.{i // 200}.{i % 200 + 1}", "ports": [{"name": "p", "port": 80}]}}))
        objs.append(model.from_api("EndpointSlice", {
            "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": f"{name}-s", "namespace": "load", "labels": {"kubernetes.io/service-name": name}},
            "ports": [{"name": "p", "port": 8080}],
            "endpoints": [{"addresses": [f"10.{i // 200}.{i % 200}.{j + 1}"], "nodeName": node} for j in range(n)]}))
    return objs


def chain_count(monkeypatch, counts) -> tuple[int, int]:
    """(chains, elements) in the fake after one sync of the given Services."""
    from kproxy_plugins import interfaces

    monkeypatch.setattr(interfaces, "list_links", lambda: ())
    app = App.from_config(cfg(), FakeNft())
    for o in services_with_endpoints(counts):
        app.state.put(o)
    result = app.sync()
    assert result.ok, result.error
    dump = app.backend.dump().splitlines()
    return sum(1 for line in dump if line.startswith("  chain ")), sum(1 for line in dump if line.startswith("    ") and "." in line)


def test_chain_count_does_not_grow_with_services_or_endpoints(monkeypatch):
    none, _ = chain_count(monkeypatch, [])
    one, one_elements = chain_count(monkeypatch, [1])
    same_count, many_elements = chain_count(monkeypatch, [3] * 50)
    mixed, _ = chain_count(monkeypatch, [1 + i % 10 for i in range(50)])
    assert one == none + 1  # one dispatch chain for "1 endpoint"
    assert same_count == none + 1  # 50 Services, all with 3 endpoints: still one
    assert mixed == none + 10  # 1..10 endpoints: one chain per distinct count
    assert many_elements > one_elements  # the Services are there, as elements


def test_third_party_plugin_replaces_a_builtin(monkeypatch):
    """Disable the built-in masquerade, enable another plugin doing the job its own way."""
    from kproxy_plugins import interfaces

    class MyMasquerade:
        @hookimpl
        def kproxy_pre_render(self, ctx):
            for version in (4, 6):
                fam, table = ctx.family(version), ctx.table(version).name
                ctx.declare(Chain(fam, table, "my-postrouting", "nat", "postrouting", 100))

        @hookimpl
        def kproxy_render_chain(self, ctx, chain):
            if ctx.owns(chain):
                return [f"meta mark & {hex(ctx.config.masquerade_mark)} != 0 masquerade"]

    monkeypatch.setattr(interfaces, "list_links", lambda: ())
    app = App.from_config(cfg(), FakeNft(), disable=["masquerade"])
    app.pm.register(MyMasquerade(), name="my-masquerade")
    for o in services_with_endpoints([2]):
        app.state.put(o)
    result = app.sync()
    assert result.ok, result.error
    assert app.backend.rules(FAM, TBL, "my-postrouting") == ["meta mark & 0x4000 != 0 masquerade"]
    assert "masquerade" not in set(app.engine.last_context.owners.values())
    assert "hairpin" not in app.backend.dump()
    assert len(app.backend.elements(FAM, TBL, "service-ips")) == 1


def test_render_annotate_names_the_owner_of_each_line():
    from click.testing import CliRunner

    from kproxy.cli import cli

    result = CliRunner().invoke(cli, ["render", "--annotate", "--config", str(DEMO / "kproxy-config.yaml"),
                                      "--manifests", str(DEMO / "manifests"), "--disable-plugin", "interfaces"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "add rule ip kproxy reject-chain reject  # service-maps" in lines
    assert any(line.startswith("add rule ip kproxy nat-postrouting ") and line.endswith("  # masquerade") for line in lines)
    # every chain, set and rule line is attributed; table and element lines are shared
    for line in lines:
        if line.startswith(("add chain", "add rule", "add set", "add map")):
            assert re.search(r"  # (service-maps|masquerade)$", line), line


# -- indexed runs (``ctx.add_indexed``) ---------------------------------------------------

class Indexed:
    """Declares chains ``c`` and ``d`` and the map ``m`` (index : verdict or address),
    and the runs in ``runs`` ({key: values}); ``runs`` may be changed between syncs."""

    def __init__(self, runs, value_type="ipv4_addr"):
        self.runs, self.value_type = runs, value_type
        self.map = Set(FAM, TBL, "m", "ipv4_addr . inet_service", value_type)

    @hookimpl
    def kproxy_pre_render(self, ctx):
        ctx.declare(chain("c"))
        ctx.declare(chain("d"))
        ctx.declare(self.map)
        for key, values in self.runs.items():
            ctx.add_indexed(self.map, key, values)


def test_indexed_run_is_written_as_its_elements():
    app = make_app(("p", Indexed({"10.0.0.1": ("10.1.0.1", "10.1.0.2", "10.1.0.3")})))
    assert app.sync().ok
    assert app.backend.elements(FAM, TBL, "m") == {
        "10.0.0.1 . 0": "10.1.0.1", "10.0.0.1 . 1": "10.1.0.2", "10.0.0.1 . 2": "10.1.0.3"}


def test_partial_sync_writes_only_the_indices_that_changed():
    runs = {"10.0.0.1": ("10.1.0.1", "10.1.0.2", "10.1.0.3"), "10.0.0.2": ("10.2.0.1",)}
    app = make_app(("p", Indexed(runs)))
    assert app.sync().ok
    runs["10.0.0.1"] = ("10.1.0.1", "10.1.0.9")  # one value changed, one index gone
    runs["10.0.0.2"] = ("10.2.0.1", "10.2.0.2")  # one index more
    result = app.engine.sync(False, set())
    assert result.ok and not result.full
    written = {}  # verb -> elements, in any order
    for line in result.transaction.render().splitlines():
        verb, _, body = re.fullmatch(r"(add|delete) element ip kproxy m \{ (.*) \}", line).group(1, 0, 2)
        written.setdefault(verb, set()).update(body.split(", "))
    assert written == {"delete": {"10.0.0.1 . 1", "10.0.0.1 . 2"},
                       "add": {"10.0.0.1 . 1 : 10.1.0.9", "10.0.0.2 . 1 : 10.2.0.2"}}
    assert app.backend.elements(FAM, TBL, "m") == {
        "10.0.0.1 . 0": "10.1.0.1", "10.0.0.1 . 1": "10.1.0.9", "10.0.0.2 . 0": "10.2.0.1", "10.0.0.2 . 1": "10.2.0.2"}
    del runs["10.0.0.2"]
    assert app.engine.sync(False, set()).ok
    assert app.backend.elements(FAM, TBL, "m") == {"10.0.0.1 . 0": "10.1.0.1", "10.0.0.1 . 1": "10.1.0.9"}


def test_indexed_runs_that_disagree_name_both_plugins():
    app = make_app(("a", Indexed({"10.0.0.1": ("10.1.0.1",)})), ("b", _RunOnly({"10.0.0.1": ("10.1.0.2",)})))
    result = app.sync()
    assert not result.ok and result.failed_plugin == "b"
    assert result.error == ("plugin b: elements 10.0.0.1 . 0-0 of m map to 10.1.0.2, "
                            "but plugin a already mapped them to 10.1.0.1")


def test_indexed_run_with_unsafe_text_names_the_map():
    app = make_app(("p", Indexed({"10.0.0.1": ("10.1.0.1", "10.1.0.2 } ; flush ruleset")})))
    result = app.sync()
    assert not result.ok and result.failed_plugin == "p"
    assert "invalid element text" in result.error and "for set m" in result.error


def test_indexed_run_of_verdicts_must_jump_to_declared_chains():
    app = make_app(("p", Indexed({"10.0.0.1": ("goto c", "goto nowhere")}, value_type="verdict")))
    result = app.sync()
    assert not result.ok
    assert result.error == "plugin p: element 10.0.0.1 of m jumps to chain nowhere, which is not declared"
    app = make_app(("p", Indexed({"10.0.0.1": ("goto c", "goto d")}, value_type="verdict")))
    assert app.sync().ok


def test_partial_sync_checks_the_jumps_of_the_verdicts_it_writes():
    plugin = Indexed({"10.0.0.1": ("goto c", "goto d")}, value_type="verdict")
    app = make_app(("p", plugin))
    assert app.sync().ok
    plugin.runs = {"10.0.0.1": ("goto c", "goto nowhere")}
    result = app.sync()
    assert not result.ok and not result.full
    assert result.error == "plugin p: element 10.0.0.1 of m jumps to chain nowhere, which is not declared"


class _RunOnly:
    def __init__(self, runs):
        self.runs = runs

    @hookimpl
    def kproxy_pre_render(self, ctx):
        for key, values in self.runs.items():
            ctx.add_indexed(Set(FAM, TBL, "m", "ipv4_addr . inet_service", "ipv4_addr"), key, values)
