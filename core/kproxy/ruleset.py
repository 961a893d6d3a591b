"""What kproxy knows is in the kernel, kept in memory between syncs.

Objects and elements are reference-counted by scope (see ``context``): an element two
Services both need stays until neither needs it. Nothing here talks to the kernel; the
engine lists the kernel only on full syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .context import GLOBAL, Declarations


def _effective(entries):
    """The value that counts when several scopes contribute one key (the first scope)."""
    if entries is None:
        return None
    if isinstance(entries, dict):
        return entries[min(entries)]
    return entries[1]


class RefMap:
    """key -> value contributed by one or more scopes. Stored compactly: a (scope, value)
    pair in the common case of one scope, a dict when there are several."""

    def __init__(self):
        self.data: dict = {}

    def __len__(self):
        return len(self.data)

    def get(self, key):
        return _effective(self.data.get(key))

    def items(self):
        for key, entries in self.data.items():
            yield key, _effective(entries)

    def entries(self, key) -> dict:
        e = self.data.get(key)
        if e is None:
            return {}
        return dict(e) if isinstance(e, dict) else {e[0]: e[1]}

    def set_entries(self, key, entries: dict) -> None:
        if not entries:
            self.data.pop(key, None)
        elif len(entries) == 1:
            self.data[key] = next(iter(entries.items()))
        else:
            self.data[key] = entries


@dataclass
class Change:
    key: tuple
    before: object  # effective value before (None: absent)
    after: object  # effective value after (None: absent)
    entries: dict  # the scopes' values after
    conflict: bool = False  # scopes disagree about the value


def diff(refmap: RefMap, replaced: set, old: dict[tuple, dict], new: dict[tuple, dict]) -> list[Change]:
    """Changes to ``refmap`` when the scopes in ``replaced`` (whose old contributions are
    ``old[scope]``) are replaced by ``new[scope]``; ``refmap`` itself is not modified."""
    touched = set()
    for scope in replaced:
        touched.update(old.get(scope, ()))
        touched.update(new.get(scope, ()))
    changes = []
    for key in touched:
        before_entries = refmap.entries(key)
        entries = {s: val for s, val in before_entries.items() if s not in replaced}
        for scope in replaced:
            contrib = new.get(scope)
            if contrib is not None and key in contrib:
                entries[scope] = contrib[key]
        before = _effective(before_entries) if before_entries else None
        after = entries[min(entries)] if entries else None
        conflict = len({_ident(v) for v in entries.values()}) > 1
        changes.append(Change(key, before, after, entries, conflict))
    return changes


def _ident(value):
    # elements: (value, comment, owner) -> value; objects: (obj, owner) -> (obj, owner)
    return value[0] if len(value) == 3 else value


@dataclass
class Ruleset:
    scopes: dict[tuple, Declarations] = field(default_factory=dict)
    objects: RefMap = field(default_factory=RefMap)  # key -> (obj, owner)
    elements: RefMap = field(default_factory=RefMap)  # (set key, element key) -> (value, comment, owner)
    rules: dict = field(default_factory=dict)  # chain key -> tuple of Rule

    def object_view(self) -> dict:
        return {k: v for k, v in self.objects.items()}

    def elements_of(self, set_key) -> list[tuple[str, tuple]]:
        """Every element of one set (a scan: only for rare cases such as a set re-created)."""
        return [(k[1], v) for k, v in self.elements.items() if k[0] == set_key]


__all__ = ["GLOBAL", "RefMap", "Ruleset", "Change", "diff"]
