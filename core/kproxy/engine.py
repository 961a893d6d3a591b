"""The sync engine: turns the cluster state into one atomic nftables transaction.

One sync: every enabled plugin declares the objects it owns (``kproxy_pre_render``),
every declared chain is rendered by asking each plugin for its rules
(``kproxy_render_chain``), the whole result goes to the kernel as one transaction, and
the plugins hear the outcome (``kproxy_post_apply``). A plugin that raises, or a
transaction nft rejects, leaves the kernel exactly as it was and makes the next sync a
full one. The engine knows no datapath feature: it only knows objects, owners and
transactions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .nft import Chain, Element, Flowtable, NftError, Rule, Set, Table, Transaction
from .nft import values as v
from .pluginmanager import PluginError, call_order

log = logging.getLogger("kproxy.engine")

MAIN_TABLE = "kproxy"
TABLE_PREFIX = "kproxy-"  # tables of plugins
FAMILY_OF_VERSION = {4: "ip", 6: "ip6"}


def is_kproxy_table(name: str) -> bool:
    return name == MAIN_TABLE or name.startswith(TABLE_PREFIX)


@dataclass
class SyncResult:
    ok: bool
    full: bool
    error: str | None = None
    failed_plugin: str | None = None
    duration: float = 0.0
    transaction: Transaction | None = None
    plugin_seconds: dict[str, float] = field(default_factory=dict)


class SyncContext:
    """What a sync's hooks see: the state, the config, and the objects being declared."""

    def __init__(self, app, state, full: bool):
        self.app = app
        self.config = app.config
        self.state = state
        self.full = full
        self.plugin: str | None = None  # the plugin whose hook is running
        self.objects: dict[tuple, object] = {}  # key -> Table/Chain/Set/Flowtable, in declaration order
        self.owners: dict[tuple, str] = {}
        self.elements: dict[tuple, dict[str, Element]] = {}  # set key -> element key -> Element
        self.element_owners: dict[tuple, str] = {}
        self.rules: dict[tuple, list[Rule]] = {}  # chain key -> rules
        self.plugin_data: dict = {}  # scratch space for plugins, alive for this sync only
        self._main = {ver: Table(fam, MAIN_TABLE, "kproxy service proxy rules") for ver, fam in FAMILY_OF_VERSION.items()}

    # -- for plugins --------------------------------------------------------------------
    def table(self, version: int) -> Table:
        """kproxy's main table for IP version 4 or 6 (``ip kproxy`` / ``ip6 kproxy``)."""
        return self._main[version]

    def family(self, version: int) -> str:
        return FAMILY_OF_VERSION[version]

    def declare(self, obj: Table | Chain | Set | Flowtable):
        """Declare an object owned by the calling plugin; returns it."""
        if isinstance(obj, Table) and obj.table_key not in {t.table_key for t in self._main.values()} and not obj.name.startswith(TABLE_PREFIX):
            raise PluginError(f"plugin {self.plugin}: table name {obj.name!r} must start with {TABLE_PREFIX!r}")
        if not isinstance(obj, Table) and obj.table_key not in self._declared_tables():
            main = {t.table_key for t in self._main.values()}
            if obj.table_key not in main:
                raise PluginError(f"plugin {self.plugin}: {obj.ref()} is in a table nobody declared")
        owner = self.owners.get(obj.key)
        if owner is not None:
            if owner == self.plugin and self.objects[obj.key] == obj:
                return obj
            raise PluginError(f"plugin {self.plugin} declares {obj.ref()}, which plugin {owner} already declared")
        self.objects[obj.key] = obj
        self.owners[obj.key] = self.plugin
        return obj

    def add_element(self, s: Set, key: str, value: str | None = None, comment: str | None = None) -> None:
        """Add an element to a declared set or map (key/value rendered with ``values``)."""
        el = Element(s.family, s.table, s.name, key, value, comment)
        elems = self.elements.setdefault(s.key, {})
        old = elems.get(key)
        if old is not None and old.value != value:
            raise PluginError(f"plugin {self.plugin}: element {key} of {s.name} already maps to {old.value} "
                              f"(added by {self.element_owners.get((s.key, key))})")
        elems[key] = el
        self.element_owners[(s.key, key)] = self.plugin

    def chains(self) -> list[Chain]:
        return [o for o in self.objects.values() if isinstance(o, Chain)]

    def owner(self, obj) -> str | None:
        """The plugin that declared ``obj``."""
        return self.owners.get(obj.key)

    def owns(self, obj) -> bool:
        """Whether the calling plugin declared ``obj``."""
        return self.plugin is not None and self.owners.get(obj.key) == self.plugin

    # -- for the engine -----------------------------------------------------------------
    def _declared_tables(self):
        return {o.table_key for o in self.objects.values() if isinstance(o, Table)}

    def tables(self) -> list[Table]:
        main_used = {o.table_key for o in self.objects.values()}
        tables = [t for t in self._main.values() if t.table_key in main_used]
        return tables + [o for o in self.objects.values() if isinstance(o, Table) and o not in tables]

    def check(self) -> None:
        """Cross-plugin consistency: every element's set must have been declared."""
        for set_key, elems in self.elements.items():
            if set_key not in self.objects:
                some = next(iter(elems))
                raise PluginError(f"plugin {self.element_owners[(set_key, some)]}: element {some} added to "
                                  f"undeclared set {set_key[3]}")


def _as_rule(chain: Chain, item, owner: str) -> Rule:
    text, comment = (item, None) if isinstance(item, str) else item
    return Rule(chain.family, chain.table, chain.name, text, comment, owner=owner)


class Engine:
    """Renders and applies syncs for an ``App`` (its plugin manager, backend and state)."""

    def __init__(self, app):
        self.app = app
        self.needs_full = True
        self.last_context: SyncContext | None = None

    def render(self, state, full: bool = True) -> tuple[SyncContext, dict[str, float]]:
        """Run the render hooks; returns the context holding every object and rule."""
        pm = self.app.pm
        ctx = SyncContext(self.app, state, full)
        seconds: dict[str, float] = {}

        def call(hook, **kw):
            for name, fn in call_order(pm, hook):
                ctx.plugin = name
                t0 = time.perf_counter()
                try:
                    yield name, fn(**kw)
                except PluginError:
                    raise
                except Exception as e:
                    raise PluginError(f"plugin {name} raised in {hook}: {type(e).__name__}: {e}") from e
                finally:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                    ctx.plugin = None

        for _ in call("kproxy_pre_render", ctx=ctx):
            pass
        ctx.check()
        for chain in ctx.chains():
            rules = ctx.rules.setdefault(chain.key, [])
            for name, out in call("kproxy_render_chain", ctx=ctx, chain=chain):
                for item in out or ():
                    try:
                        rules.append(_as_rule(chain, item, name))
                    except (ValueError, TypeError) as e:
                        raise PluginError(f"plugin {name}: bad rule for chain {chain.name}: {e}") from e
        return ctx, seconds

    def transaction(self, ctx: SyncContext, stale_tables=()) -> Transaction:
        """The transaction that replaces every kproxy table with the declared content.

        Each table is added, deleted and added again within the one transaction, so the
        kernel switches from the old ruleset to the new one atomically and nothing stale
        survives.
        """
        txn = Transaction()
        for fam, name in stale_tables:
            txn.delete(Table(fam, name))
        for table in ctx.tables():
            txn.add(Table(table.family, table.name)).delete(Table(table.family, table.name)).add(table)
        kinds = (Chain, Set, Flowtable)
        for kind in kinds:
            for obj in ctx.objects.values():
                if isinstance(obj, kind):
                    txn.add(obj)
        for elems in ctx.elements.values():
            for el in elems.values():
                txn.add(el)
        for rules in ctx.rules.values():
            for r in rules:
                txn.add(r)
        return txn

    def sync(self, full: bool | None = None) -> SyncResult:
        """One sync of the current state into the kernel; never raises for plugin or nft
        failures (they are in the result, and the kernel keeps its previous rules)."""
        app = self.app
        full = True  # partial syncs are not implemented yet: every sync rewrites kproxy's tables
        t0 = time.monotonic()
        state = app.state.snapshot()
        result = SyncResult(ok=False, full=full)
        ctx = None
        try:
            ctx, result.plugin_seconds = self.render(state, full)
            stale = [t for t in app.backend.list_tables() if is_kproxy_table(t[1]) and t not in {x.table_key for x in ctx.tables()}]
            txn = self.transaction(ctx, stale)
            result.transaction = txn
            app.backend.apply(txn)
            result.ok = True
            self.needs_full = False
            self.last_context = ctx
        except PluginError as e:
            result.error = str(e)
            result.failed_plugin = str(e).split()[1] if str(e).startswith("plugin ") else None
            log.error("sync aborted, kernel rules unchanged: %s", e)
        except NftError as e:
            result.error = f"nft rejected the transaction: {e}"
            log.error("sync failed, kernel rules unchanged: %s", result.error)
        result.duration = time.monotonic() - t0
        if not result.ok:
            self.needs_full = True
        app.notify_post_apply(ctx or SyncContext(app, state, full), result)
        return result


def cleanup(backend) -> list[tuple[str, str]]:
    """Delete every kproxy table (``kproxy`` and ``kproxy-*``) and nothing else."""
    mine = [t for t in backend.list_tables() if is_kproxy_table(t[1])]
    if mine:
        txn = Transaction()
        for fam, name in mine:
            txn.delete(Table(v.family(fam), name))
        backend.apply(txn)
    return mine
