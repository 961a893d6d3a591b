"""What a sync's hooks see and fill in: the state, and the objects being declared.

Declarations are grouped in *scopes*. Everything a plugin declares for one Service
(inside ``with ctx.scope_of(service):``) belongs to that Service's scope; everything
else to the global scope. On a partial sync plugins render only ``ctx.services()`` (the
Services that changed) and the engine carries the scopes of all other Services over
from the last sync, so a sync costs what changed, not what exists. A plugin that
ignores scopes still works: its objects are global and re-declared on every sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .nft import Chain, Flowtable, Set, Table
from .nft.objects import _FORBIDDEN_IN_ELEMENT as _UNSAFE, check_element_text
from .pluginmanager import PluginError

MAIN_TABLE = "kproxy"
TABLE_PREFIX = "kproxy-"  # tables of plugins
FAMILY_OF_VERSION = {4: "ip", 6: "ip6"}
GLOBAL = ()  # the scope of objects that belong to no Service
INDEXED = "indexed"  # the third part of an indexed run's element key (see ``add_indexed``)


def is_kproxy_table(name: str) -> bool:
    return name == MAIN_TABLE or name.startswith(TABLE_PREFIX)


def service_scope(key: tuple[str, str]) -> tuple:
    return ("service", *key)


@dataclass(slots=True)
class Declarations:
    """What one scope declared: objects by key, and elements by (set key, element key).

    Each value names its scope last, so that the ruleset's reference maps can hold the
    very same tuple, and an element's value is a ready ``Elements`` item."""

    objects: dict = field(default_factory=dict)  # key -> (obj, owner, scope)
    elements: dict = field(default_factory=dict)  # (set key, element key) -> (element key, value, comment, owner, scope)
    # an indexed run: (set key, key, INDEXED) -> (key, tuple of values, comment, owner, scope)

    def keys(self) -> tuple[tuple, tuple]:
        """(object keys, element keys): all a committed scope must remember, which is
        what it contributes (the values are in the ruleset's reference maps)."""
        return tuple(self.objects), tuple(self.elements)


class _InScope:
    """The context manager of ``SyncContext.scope_of`` (a class: entered once per
    Service and family, so it is kept cheaper than a generator-based one)."""

    __slots__ = ("ctx", "scope", "prev")

    def __init__(self, ctx, scope):
        self.ctx, self.scope = ctx, scope

    def __enter__(self):
        ctx = self.ctx
        self.prev = ctx._scope
        ctx._enter(self.scope)

    def __exit__(self, *exc):
        self.ctx._enter(self.prev)


class SyncContext:
    def __init__(self, app, state, full: bool, changed: set | None = None):
        self.app = app
        self.config = app.config
        self.state = state
        self.full = full
        self.changed = None if full else set(changed or ())  # Service keys re-rendered in a partial sync
        self.plugin: str | None = None  # the plugin whose hook is running
        self.plugin_data: dict = {}  # scratch space for plugins, alive for this sync only
        self.decls: dict[tuple, Declarations] = {GLOBAL: Declarations()}
        self.kept_tables: set[tuple[str, str]] = set()
        self.owners: dict = {}  # object key -> owner, for every object of this sync (set by the engine)
        self.objects: dict = {}  # object key -> object, every object of this sync (set by the engine)
        self._scope = GLOBAL
        self._elements = self.decls[GLOBAL].elements  # those of the current scope
        self._declared_here: dict = {}  # object key -> owner, for objects declared in this sync
        self._main = {ver: Table(fam, MAIN_TABLE, "kproxy service proxy rules") for ver, fam in FAMILY_OF_VERSION.items()}
        self._main_keys = {t.table_key for t in self._main.values()}

    # -- for plugins --------------------------------------------------------------------
    def table(self, version: int) -> Table:
        """kproxy's main table for IP version 4 or 6 (``ip kproxy`` / ``ip6 kproxy``)."""
        return self._main[version]

    def family(self, version: int) -> str:
        return FAMILY_OF_VERSION[version]

    def services(self):
        """The Services to render in this sync: all of them on a full sync, the changed
        ones (that still exist) on a partial sync."""
        if self.changed is None:
            return list(self.state.services.values())
        return [self.state.services[k] for k in sorted(self.changed) if k in self.state.services]

    def scope_of(self, service):
        """Attribute what is declared inside ``with ctx.scope_of(service):`` to
        ``service`` (a model.Service)."""
        return _InScope(self, service_scope(service.key))

    def _enter(self, scope) -> None:
        decls = self.decls.get(scope)
        if decls is None:
            decls = self.decls[scope] = Declarations()
        self._scope, self._elements = scope, decls.elements

    def declare(self, obj: Table | Chain | Set | Flowtable):
        """Declare an object owned by the calling plugin; returns it."""
        main = self._main_keys
        if isinstance(obj, Table):
            if obj.table_key not in main and not obj.name.startswith(TABLE_PREFIX):
                raise PluginError(f"plugin {self.plugin}: table name {obj.name!r} must start with {TABLE_PREFIX!r}")
        elif obj.table_key not in main and not obj.table.startswith(TABLE_PREFIX):
            raise PluginError(f"plugin {self.plugin}: {obj.ref()} is not in a kproxy table")
        owner = self._declared_here.get(obj.key)
        if owner is not None and owner != self.plugin:
            raise PluginError(f"plugin {self.plugin} declares {obj.ref()}, which plugin {owner} already declared")
        self._declared_here[obj.key] = self.plugin
        self.decls[self._scope].objects[obj.key] = (obj, self.plugin, self._scope)
        return obj

    def add_element(self, s: Set, key: str, value: str | None = None, comment: str | None = None) -> None:
        """Add an element to a set or map (key and value rendered with ``nft.values``)."""
        if not key or _UNSAFE.search(key) or (value is not None and _UNSAFE.search(value)):
            check_element_text(key, s.name)  # raises, naming the set
            check_element_text(value, s.name)
        elems, k, new = self._elements, (s.key, key), (key, value, comment, self.plugin, self._scope)
        old = elems.setdefault(k, new)
        if old is not new:
            if old[1] != value:
                raise PluginError(f"plugin {self.plugin}: element {key} of {s.name} maps to {value}, but plugin "
                                  f"{old[3]} already mapped it to {old[1]}", plugin=self.plugin)
            elems[k] = new

    def add_indexed(self, s: Set, key: str, values: tuple[str, ...], comment: str | None = None) -> None:
        """Add the map elements ``key . 0`` … ``key . N-1`` mapping to the N ``values``
        in turn (a map looked up with an index, such as ``numgen random mod N``).

        They are declared, compared and kept as one unit (an *indexed run*): at ten
        endpoints per Service that is a tenth of the records a sync makes and keeps. A
        run owns its indices: do not also add single elements ``key . i`` to the map."""
        if type(values) is not tuple:
            values = tuple(values)
        if not values:
            return
        if not key or _UNSAFE.search(key) or _UNSAFE.search(" ".join(values)) or not all(values):
            check_element_text(key, s.name)
            for value in values:
                check_element_text(value, s.name)
        elems, k, new = self._elements, (s.key, key, INDEXED), (key, values, comment, self.plugin, self._scope)
        old = elems.setdefault(k, new)
        if old is not new:
            if old[1] != values:
                raise PluginError(f"plugin {self.plugin}: elements {key} . 0-{len(values) - 1} of {s.name} map to "
                                  f"{', '.join(values)}, but plugin {old[3]} already mapped them to "
                                  f"{', '.join(old[1])}", plugin=self.plugin)
            elems[k] = new

    def keep_table(self, table: Table) -> None:
        """Tell the engine the calling plugin programs ``table`` itself (in its own
        transactions), so a full sync must not remove it as stale."""
        self.kept_tables.add(table.table_key)

    def owner(self, obj) -> str | None:
        """The plugin that declared ``obj``."""
        return self.owners.get(obj.key)

    def owns(self, obj) -> bool:
        """Whether the calling plugin declared ``obj``."""
        return self.plugin is not None and self.owners.get(obj.key) == self.plugin

    def declared(self, kind=None) -> list:
        """Every object of this sync (of one class, e.g. ``Set``), carried-over scopes included."""
        return [o for o in self.objects.values() if kind is None or isinstance(o, kind)]

    def release(self) -> None:
        """Drop what this context holds only for its own sync, once the sync is over
        (the engine calls it when the next sync starts): plugins' scratch data (which
        may refer back to the context, so it is freed at once rather than by a later
        garbage collection) and the state's memoised endpoint joins."""
        self.plugin_data = {}
        self.decls = {}
        forget = getattr(self.state, "forget_memo", None)
        if forget is not None:
            forget()

    def chains(self) -> list[Chain]:
        return self.declared(Chain)
