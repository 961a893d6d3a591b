"""What kproxy knows is in the kernel, kept in memory between syncs.

Objects and elements are reference-counted by scope (see ``context``): an element two
Services both need stays until neither needs it. Nothing here talks to the kernel; the
engine lists the kernel only on full syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .context import GLOBAL


class RefMap:
    """key -> value contributed by one or more scopes.

    Values are tuples that name their scope last (see ``context.Declarations``). The
    value that counts is the one of the scope that contributed first (scopes that
    disagree are a plugin conflict, logged by the engine). Stored compactly: the value
    itself in the common case of one scope, else [value, {scope: value}], so that a
    chain declared by 10,000 Services costs O(1) per change, not O(10,000).
    """

    def __init__(self):
        self.data: dict = {}

    def __len__(self):
        return len(self.data)

    def get(self, key):
        e = self.data.get(key)
        if e is None:
            return None
        return e[0] if isinstance(e, list) else e

    def items(self):
        for key, e in self.data.items():
            yield key, (e[0] if isinstance(e, list) else e)

    def apply(self, change: "Change") -> None:
        key, e = change.key, self.data.get(change.key)
        scopes = {} if e is None else (e[1] if isinstance(e, list) else {e[-1]: e})
        for s in change.removed:
            scopes.pop(s, None)
        scopes.update(change.added)
        if not scopes:
            self.data.pop(key, None)
        elif len(scopes) == 1:
            self.data[key] = next(iter(scopes.values()))
        else:
            self.data[key] = [change.after, scopes]


@dataclass(slots=True)
class Change:
    key: tuple
    before: object  # value before (None: absent)
    after: object  # value after (None: absent)
    removed: tuple  # scopes that no longer contribute
    added: dict  # scope -> value contributed now
    conflict: bool = False  # scopes disagree about the value


def diff(refmap: RefMap, replaced: set, old: dict[tuple, dict], new: dict[tuple, dict]) -> list[Change]:
    """Changes to ``refmap`` when the scopes in ``replaced`` (whose old contributions are
    ``old[scope]``) are replaced by ``new[scope]``; ``refmap`` itself is not modified.
    Costs O(size of the old and new contributions of the replaced scopes)."""
    added_by_key: dict = {}
    for scope in replaced:
        for key, val in new.get(scope, {}).items():
            added_by_key.setdefault(key, {})[scope] = val
    removed_by_key: dict = {}
    for scope in replaced:
        for key in old.get(scope, ()):
            removed_by_key.setdefault(key, []).append(scope)
    changes = []
    for key in set(added_by_key) | set(removed_by_key):
        e = refmap.data.get(key)
        removed = tuple(removed_by_key.get(key, ()))
        added = added_by_key.get(key, {})
        if e is None:
            before, remaining = None, None
        elif isinstance(e, list):
            before = e[0]
            remaining = next((val for s, val in e[1].items() if s not in removed), None) if removed else before
        else:
            before = e
            remaining = None if e[-1] in removed else before
        if remaining is not None:
            after = before if (before is not None and _agree(remaining, before)) else remaining
        else:
            after = next(iter(added.values()), None)
        conflict = bool(added) and any(not _agree(val, after) for val in added.values())
        changes.append(Change(key, before, after, removed, added, conflict))
    return changes


def merged(contributions) -> tuple[RefMap, list]:
    """The RefMap of everything ``contributions`` ((scope, {key: value}) pairs) add to
    an empty one, built in one pass (a full sync), and the keys whose scopes disagree
    about the value (the first scope's value counts, as in ``diff``)."""
    refmap, conflicts = RefMap(), []
    data = refmap.data
    put = data.setdefault
    for scope, items in contributions:
        if data.keys().isdisjoint(items):
            data.update(items)  # the common case: nothing shared with another scope
            continue
        for key, val in items.items():
            e = put(key, val)
            if e is val:
                continue  # the common case: one scope, stored as its value itself
            if isinstance(e, tuple):
                e = data[key] = [e, {e[-1]: e}]
            e[1][scope] = val
            if not _agree(val, e[0]):
                conflicts.append(key)
    return refmap, list(dict.fromkeys(conflicts))  # each key once, however many scopes disagree


def _agree(a, b) -> bool:
    """Whether two scopes' values agree: an element's value (elements are (key, value,
    comment, owner, scope)); an object and its owner (objects are (obj, owner, scope)).
    Kept cheap: an object that every Service declares, such as a load-balancing chain,
    is compared 10,000 times."""
    if len(a) == 5:
        return a[1] == b[1]
    return (a[0] is b[0] or a[0] == b[0]) and a[1] == b[1]


@dataclass
class Ruleset:
    """What the last successful sync committed: per scope the keys it contributes
    (object keys, element keys), and the reference-counted objects, elements and rules."""

    scopes: dict[tuple, tuple[tuple, tuple]] = field(default_factory=dict)
    objects: RefMap = field(default_factory=RefMap)  # key -> (obj, owner, scope)
    elements: RefMap = field(default_factory=RefMap)  # (set key, element key) -> (element key, value, comment, owner, scope)
    rules: dict = field(default_factory=dict)  # chain key -> tuple of Rule

    def object_view(self) -> dict:
        return dict(self.objects.items())


__all__ = ["GLOBAL", "RefMap", "Ruleset", "Change", "diff", "merged"]
