"""The sync engine: turns the cluster state into one atomic nftables transaction.

One sync: every enabled plugin declares the objects it owns (``kproxy_pre_render``),
every declared chain is rendered by asking each plugin for its rules
(``kproxy_render_chain``), the difference to what is in the kernel goes to the kernel
as one transaction, and the plugins hear the outcome (``kproxy_post_apply``).

- A *full* sync (at start, after any failure, when the Node or ServiceCIDRs changed,
  and periodically) re-renders everything, lists kproxy's tables in the kernel (without
  their elements) and rewrites all of it: chains flushed and refilled, sets and maps
  re-created with all their elements, stale objects removed. Sets the kernel fills
  itself (``dynamic``) keep their content. Tables not in the kernel yet are named in
  the transaction (``Transaction.new_tables``): the backend may build them ahead.
- A *partial* sync re-renders only the Services that changed and writes only the
  difference of set and map elements to what the last sync committed, which is kept in
  memory: the kernel is not listed. A change of any chain, set or rule makes the sync
  full (rare in a chain-light layout). Both leave exactly the same ruleset.
- Chains no longer needed are flushed at once and deleted in a later transaction, at
  least ``STALE_CHAIN_DELAY`` later (older kernels keep a chain busy for a moment after
  a map element that referenced it was deleted).
- A plugin that raises, or a transaction nft rejects, leaves the kernel exactly as it
  was and makes the next sync a full one.

The engine knows no datapath feature: only objects, owners, scopes and transactions.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from dataclasses import dataclass, field

from .context import FAMILY_OF_VERSION, GLOBAL, SyncContext, is_kproxy_table, service_scope
from .nft import Chain, Elements, Flowtable, NftError, Rule, Set, Table, Transaction
from .nft import values as v
from .pluginmanager import PluginError, call_order
from .ruleset import Ruleset, diff, merged

log = logging.getLogger("kproxy.engine")
_JUMP = re.compile(r"\b(?:jump|goto)\s+([A-Za-z_][\w.\-]*)")
STALE_CHAIN_DELAY = 1.0


@dataclass
class SyncResult:
    ok: bool
    full: bool
    error: str | None = None
    failed_plugin: str | None = None
    duration: float = 0.0
    render_seconds: float = 0.0
    apply_seconds: float = 0.0
    transaction: Transaction | None = None  # what this sync applied (``App`` drops it when the next sync starts)
    changed_services: int = 0
    cleanup_failed: bool = False  # deleting stale chains failed (the sync then went full)
    plugin_seconds: dict[str, float] = field(default_factory=dict)


def _as_rule(chain: Chain, item, owner: str) -> Rule:
    text, comment = (item, None) if isinstance(item, str) else item
    return Rule(chain.family, chain.table, chain.name, text, comment, owner=owner)


BATCH = 2000  # elements per nft command


def _batched(txn: Transaction, verb: str, items_by_set: dict) -> None:
    """Add/delete elements grouped per set, about ``BATCH`` per command (an indexed
    run counts as its elements)."""
    for set_key, items in items_by_set.items():
        _, family, table, name = set_key
        start, size = 0, 0
        for i, item in enumerate(items):
            value = item[1]
            size += len(value) if type(value) is tuple else 1
            if size >= BATCH:
                getattr(txn, verb)(Elements(family, table, name, tuple(items[start:i + 1])))
                start, size = i + 1, 0
        if start < len(items):
            getattr(txn, verb)(Elements(family, table, name, tuple(items[start:])))


def _verdicts(value) -> str | None:
    """The text of an element value (or of an indexed run's values) that jumps to a
    chain, if it does."""
    if type(value) is tuple:
        value = " ".join(value)
    return value if value and ("goto" in value or "jump" in value) else None


@dataclass
class Plan:
    """A rendered sync: the new committed state (if applied) and the transaction."""

    txn: Transaction
    commit: callable
    ctx: SyncContext
    full: bool


class Engine:
    """Renders and applies syncs for an ``App`` (its plugin manager, backend and state)."""

    def __init__(self, app, clock=time.monotonic):
        self.app = app
        self.clock = clock
        self.needs_full = True
        self.committed = Ruleset()
        self.stale_chains: dict[tuple, tuple[Chain, float]] = {}  # flushed, to delete later
        self.last_context: SyncContext | None = None

    # -- rendering ----------------------------------------------------------------------
    def _call(self, sync_ctx, hook, seconds, **kw):
        ctx = sync_ctx
        for name, fn in call_order(self.app.pm, hook):
            ctx.plugin = name
            t0 = time.perf_counter()
            try:
                yield name, fn(**kw)
            except PluginError:
                raise
            except Exception as e:
                raise PluginError(f"plugin {name} raised in {hook}: {type(e).__name__}: {e}", plugin=name) from e
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
                ctx.plugin = None

    def render(self, state, full: bool = True, changed: set | None = None, seconds: dict | None = None) -> tuple[SyncContext, dict]:
        """Run ``kproxy_pre_render`` and merge with the carried-over scopes; returns the
        context and the object changes. Chains are rendered by ``render_rules``."""
        seconds = {} if seconds is None else seconds
        ctx = SyncContext(self.app, state, full, changed)
        ctx.plugin = "kproxy"  # the main tables belong to kproxy itself
        for version in FAMILY_OF_VERSION:
            ctx.declare(ctx.table(version))
        ctx.plugin = None
        for _ in self._call(ctx, "kproxy_pre_render", seconds, ctx=ctx):
            pass
        return ctx, seconds

    def render_rules(self, ctx: SyncContext, seconds: dict) -> dict[tuple, tuple[Rule, ...]]:
        rules = {}
        for chain in ctx.chains():
            out = []
            for name, result in self._call(ctx, "kproxy_render_chain", seconds, ctx=ctx, chain=chain):
                if isinstance(result, str):
                    result = [result]
                for item in result or ():
                    try:
                        out.append(_as_rule(chain, item, name))
                    except (ValueError, TypeError) as e:
                        raise PluginError(f"plugin {name}: bad rule for chain {chain.name}: {e}") from e
            rules[chain.key] = tuple(out)
        return rules

    # -- planning -----------------------------------------------------------------------
    def plan(self, state, full: bool, changed: set | None = None, seconds: dict | None = None) -> Plan:
        """Render a sync and compute its transaction (nothing is applied)."""
        seconds = {} if seconds is None else seconds
        if full:
            # a full sync does not read the last committed ruleset, and a failed one is
            # followed by another full one: drop it now, so that the old and the new
            # ruleset are never in memory together
            self.committed = Ruleset()
        ctx, _ = self.render(state, full, changed, seconds)
        if full:
            return self._plan_full(ctx, seconds)
        base = self.committed
        old_scopes = base.scopes
        replaced = {GLOBAL} | {service_scope(k) for k in ctx.changed} | set(ctx.decls)
        old_objs = {s: old_scopes[s][0] for s in replaced if s in old_scopes}
        new_objs = {s: d.objects for s, d in ctx.decls.items()}
        obj_changes = diff(base.objects, replaced, old_objs, new_objs)
        for ch in obj_changes:
            if ch.conflict:
                self._object_conflict(ch.after, ch.added.values())
        objects = base.object_view()
        for ch in obj_changes:
            if ch.after is None:
                objects.pop(ch.key, None)
            else:
                objects[ch.key] = ch.after
        self._set_objects(ctx, objects)
        old_els = {s: old_scopes[s][1] for s in replaced if s in old_scopes}
        new_els = {s: d.elements for s, d in ctx.decls.items()}
        el_changes = diff(base.elements, replaced, old_els, new_els)
        for ch in el_changes:
            set_key = ch.key[0]
            if set_key not in objects and ch.after is not None:
                raise PluginError(f"plugin {ch.after[3]}: element {ch.key[1]} added to undeclared set {set_key[3]}")
            if ch.conflict:
                log.warning("element %s of %s is wanted with different values; using %s",
                            ch.key[1], set_key[3], ch.after[1])
        rules = self.render_rules(ctx, seconds)
        self._check_references(ctx, rules, ((ch.key[0], (ch.after,)) for ch in el_changes if ch.after is not None))
        if self._structure_changed(obj_changes, rules):
            return self.plan(state, True, None, seconds)
        txn = self._partial_transaction(el_changes)
        scopes = {s: ctx.decls[s].keys() for s in replaced if s in ctx.decls}

        def commit():
            new = self.committed
            for s in replaced:
                if s in scopes:
                    new.scopes[s] = scopes[s]
                else:
                    new.scopes.pop(s, None)
            for ch in obj_changes:
                new.objects.apply(ch)
            for ch in el_changes:
                new.elements.apply(ch)
            new.rules = rules
            self.committed = new

        return Plan(txn, commit, ctx, False)

    def _plan_full(self, ctx: SyncContext, seconds: dict) -> Plan:
        """A full sync's transaction: everything is new (the kernel's objects are
        listed and replaced), so the declarations are merged in one pass, without
        diffing against what was committed."""
        decls = ctx.decls
        objs, conflicts = merged((s, d.objects) for s, d in decls.items())
        for key in conflicts:
            after, by_scope = objs.data[key]
            self._object_conflict(after, by_scope.values())
        objects = dict(objs.items())
        self._set_objects(ctx, objects)
        els, conflicts = merged((s, d.elements) for s, d in decls.items())
        scopes = {s: d.keys() for s, d in decls.items()}
        ctx.decls = {}  # the values live on in ``els``; the dicts per scope are no longer needed
        del decls
        by_set: dict = {}  # set key -> [element values, which are Elements items]
        for key, e in els.data.items():
            items = by_set.get(key[0])
            if items is None:
                items = by_set[key[0]] = []
            items.append(e if type(e) is tuple else e[0])
        for set_key, items in by_set.items():
            if set_key not in objects:
                val = items[0]
                raise PluginError(f"plugin {val[3]}: element {val[0]} added to undeclared set {set_key[3]}")
        for key in conflicts:
            log.warning("element %s of %s is wanted with different values; using %s",
                        key[1], key[0][3], els.data[key][0][1])
        rules = self.render_rules(ctx, seconds)
        self._check_references(ctx, rules, by_set.items())
        txn = self._full_transaction(ctx, objects, by_set, rules)
        del by_set

        def commit():
            self.committed = Ruleset(scopes=scopes, objects=objs, elements=els, rules=rules)

        return Plan(txn, commit, ctx, True)

    @staticmethod
    def _object_conflict(first_value, values) -> None:
        """Raise for an object that several scopes declare in different ways."""
        first = first_value[1]
        other = next(val[1] for val in values if val[:2] != first_value[:2])
        what = first_value[0].ref()
        if other != first:
            raise PluginError(f"plugin {other} declares {what}, which plugin {first} already declared", plugin=other)
        raise PluginError(f"plugin {first} declares {what} in two different ways", plugin=first)

    def _set_objects(self, ctx, objects) -> None:
        """Tell the context every object of this sync, and check that each is in a
        declared table."""
        ctx.objects = {k: val[0] for k, val in objects.items()}
        ctx.owners = {k: val[1] for k, val in objects.items()}
        tables = self._tables(objects)
        for obj, owner, _ in objects.values():
            if not isinstance(obj, Table) and obj.table_key not in tables:
                raise PluginError(f"plugin {owner}: {obj.ref()} is in a table nobody declared")

    def _structure_changed(self, obj_changes, rules) -> bool:
        """Whether a partial sync would add, remove or change a chain, set or rule.

        Partial syncs only change elements; anything else is done by a full sync. nft
        1.0.6 cannot add a rule that uses an existing ``typeof`` map whose value
        concatenates an address and ``th dport`` ("conflicting protocols specified"),
        while it can when the map is created in the same transaction; and the structure
        changes rarely in a chain-light layout (a new endpoint count, a config change).
        """
        if any((ch.before and ch.before[0]) != (ch.after and ch.after[0]) for ch in obj_changes):
            return True
        return rules != self.committed.rules

    @staticmethod
    def _check_references(ctx, rules, elements) -> None:
        """Every jump/goto of a rule or verdict element must name a declared chain of its
        table (the kernel may still hold an old chain of that name, so it cannot tell).
        ``elements``: (set key, element values) pairs (see ``context.Declarations``);
        only those of verdict maps are read, as only a verdict can jump."""
        checked = set()

        def check(family, table, text, owner, where):
            for target in _JUMP.findall(text):
                if ("chain", family, table, target) not in ctx.objects:
                    raise PluginError(f"plugin {owner}: {where} jumps to chain {target}, which is not declared",
                                      plugin=owner)
        for chain_rules in rules.values():
            for r in chain_rules:
                check(r.family, r.table, r.text, r.owner, f"a rule in chain {r.chain}")
        verdict_maps = {k for k, o in ctx.objects.items() if isinstance(o, Set) and o.value_type == "verdict"}
        for set_key, values in elements:
            if set_key not in verdict_maps:
                continue  # nft rejects a jump anywhere else
            _, fam, table, name = set_key
            for elem, value, _, owner, _ in values:
                text = _verdicts(value)
                if text and (fam, table, text) not in checked:  # verdicts repeat: check each once
                    check(fam, table, text, owner, f"element {elem} of {name}")
                    checked.add((fam, table, text))

    @staticmethod
    def _tables(objects) -> set:
        return {val[0].table_key for val in objects.values() if isinstance(val[0], Table)}

    def _full_transaction(self, ctx, objects, by_set, rules) -> Transaction:
        backend = self.app.backend
        wanted_tables = self._tables(objects)
        in_kernel = backend.list_tables()
        kernel = {t: backend.list_objects(*t) for t in in_kernel if is_kproxy_table(t[1])}
        txn = Transaction()
        txn.new_tables = wanted_tables - set(in_kernel)
        by_kind = {kind: [val[0] for val in objects.values() if isinstance(val[0], kind)]
                   for kind in (Table, Chain, Set, Flowtable)}
        for t in by_kind[Table]:
            txn.add(t)
        wanted = set(objects)
        for tkey, listing in kernel.items():
            if tkey not in wanted_tables:
                continue
            fam, tname = tkey
            for chain in listing.chains.values():
                txn.flush(Chain(fam, tname, chain.name))
            for chain in listing.chains.values():
                if chain.is_base:  # re-created below with the wanted type, hook and priority
                    txn.delete(Chain(fam, tname, chain.name))
                elif chain.key not in wanted:
                    self.stale_chains[chain.key] = (chain, self.clock())
            for s in listing.sets.values():
                # nft's JSON listing shows "dynamic" sets only as "timeout" ones; either
                # way the kernel fills them (affinity, meters): keep their content
                keep = bool({"dynamic", "timeout"} & set(s.flags)) and s.key in wanted
                if not keep:
                    txn.delete(Set(fam, tname, s.name, s.key_type, s.value_type))
            for ft in listing.flowtables.values():
                if ft.key not in wanted:
                    txn.delete(Flowtable(fam, tname, ft.name))
        for c in by_kind[Chain]:
            self.stale_chains.pop(c.key, None)
            txn.add(c)
        for s in by_kind[Set]:
            txn.add(s)
        for f in by_kind[Flowtable]:
            txn.add(f)
        _batched(txn, "add", by_set)
        for chain_rules in rules.values():
            for r in chain_rules:
                txn.add(r)
        for tkey in kernel:
            if tkey not in wanted_tables and tkey not in ctx.kept_tables:
                txn.delete(Table(*tkey))
        return txn

    def _partial_transaction(self, el_changes) -> Transaction:
        """The element additions and deletions of a partial sync (partial syncs change
        nothing else, see ``_structure_changed``)."""
        txn = Transaction()
        deletes: dict = {}
        adds: dict = {}
        for ch in el_changes:
            set_key, before, after = ch.key[0], ch.before, ch.after
            if before is not None and after is not None and before[1] == after[1]:
                continue
            if len(ch.key) == 3:  # an indexed run: only the indices whose value changed
                old, new = (before[1] if before else ()), (after[1] if after else ())
                for i in range(max(len(old), len(new))):
                    was, now = old[i] if i < len(old) else None, new[i] if i < len(new) else None
                    if was != now:
                        key = f"{ch.key[1]} . {i}"
                        if was is not None:
                            deletes.setdefault(set_key, []).append((key, None, None))
                        if now is not None:
                            adds.setdefault(set_key, []).append((key, now, after[2]))
                continue
            if before is not None:
                deletes.setdefault(set_key, []).append((ch.key[1], None, None))
            if after is not None:
                adds.setdefault(set_key, []).append(after)  # an element value is an Elements item
        _batched(txn, "delete", deletes)
        _batched(txn, "add", adds)
        return txn

    # -- applying -----------------------------------------------------------------------
    def delete_stale_chains(self) -> bool:
        """Delete chains flushed at least STALE_CHAIN_DELAY ago, in their own transaction;
        False when nft refused (then the next sync is full)."""
        now = self.clock()
        due = [(k, c) for k, (c, t) in self.stale_chains.items() if now - t >= STALE_CHAIN_DELAY]
        if not due:
            return True
        failed = False
        txn = Transaction()
        for _, c in due:
            txn.delete(Chain(c.family, c.table, c.name))
        try:
            self.app.backend.apply(txn)
        except NftError as e:
            log.warning("could not delete stale chains (will retry in a full sync): %s", e)
            self.needs_full = True
            failed = True
        for k, _ in due:
            self.stale_chains.pop(k, None)
        return not failed

    def sync(self, full: bool | None = None, changed: set | None = None) -> SyncResult:
        """One sync of the current state into the kernel; never raises for plugin or nft
        failures (they are in the result, and the kernel keeps its previous rules).

        Python's cyclic garbage collector is paused for the sync: a full sync makes
        hundreds of thousands of small tuples, none of them in a cycle, and each of
        the collections they would trigger walks the whole heap (a fifth of the render
        time at 10,000 Services)."""
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._sync(full, changed)
        finally:
            if gc_enabled:
                gc.enable()

    def _sync(self, full, changed) -> SyncResult:
        app = self.app
        if self.last_context is not None:
            self.last_context.release()  # its sync is over (its objects and owners stay, for inspection)
        full = bool(full or self.needs_full or changed is None)
        t0 = time.monotonic()
        state = app.state.snapshot()
        result = SyncResult(ok=False, full=full, changed_services=len(changed or ()))
        plan = None
        if self.stale_chains and not full:
            result.cleanup_failed = not self.delete_stale_chains()
            full = full or self.needs_full
            result.full = full
        try:
            plan = self.plan(state, full, changed, result.plugin_seconds)
            result.full = full = plan.full
            result.transaction = plan.txn
            t1 = time.monotonic()
            result.render_seconds = t1 - t0
            app.backend.apply(plan.txn)
            result.apply_seconds = time.monotonic() - t1
            plan.commit()
            result.ok = True
            self.needs_full = False
            self.last_context = plan.ctx
        except PluginError as e:
            result.error = str(e)
            result.failed_plugin = e.plugin
            log.error("sync aborted, kernel rules unchanged: %s", e)
        except NftError as e:
            result.error = f"nft rejected the transaction: {e}"
            log.error("sync failed, kernel rules unchanged: %s", result.error)
        result.duration = time.monotonic() - t0
        if not result.ok:
            self.needs_full = True
            if full:
                self.stale_chains.clear()
        app.notify_post_apply(plan.ctx if plan else SyncContext(app, state, full, changed), result)
        return result

    def render_script(self, state) -> tuple[Transaction, SyncContext]:
        """The complete transaction for ``state`` as a full sync into an empty namespace
        would write it (for ``kproxy render``); the kernel is not touched."""
        engine = Engine(self.app)
        engine.app = _NoKernel(self.app)
        plan = engine.plan(state, True)
        return plan.txn, plan.ctx


class _NoKernel:
    """The app seen through a backend that reports an empty kernel."""

    class _Empty:
        def list_tables(self):
            return []

    def __init__(self, app):
        self._app = app
        self.backend = self._Empty()

    def __getattr__(self, name):
        return getattr(self._app, name)


def cleanup(backend) -> list[tuple[str, str]]:
    """Delete every kproxy table (``kproxy`` and ``kproxy-*``) and nothing else."""
    mine = [t for t in backend.list_tables() if is_kproxy_table(t[1])]
    if mine:
        txn = Transaction()
        for fam, name in mine:
            txn.delete(Table(v.family(fam), name))
        backend.apply(txn)
    return mine
