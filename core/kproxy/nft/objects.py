"""The nftables object model: tables, chains, rules, sets, maps, elements, flowtables,
named counters.

Objects are immutable values. Each knows its identity (``key``), how it is written in an
``add`` command (``spec``) and which table it lives in. They are validated when made, so
a transaction can only ever hold well-formed objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
import re

from . import values as v

_FORBIDDEN_IN_RULE = re.compile(r"[\n\r;#]")


@dataclass(frozen=True)
class Table:
    family: str
    name: str
    comment: str | None = None

    def __post_init__(self):
        v.family(self.family)
        v.name(self.name)

    @property
    def key(self):
        return ("table", self.family, self.name)

    @property
    def table_key(self):
        return (self.family, self.name)

    def ref(self) -> str:
        return f"table {self.family} {self.name}"

    def spec(self) -> str:
        body = f" {{ comment {v.comment(self.comment)} ; }}" if self.comment else ""
        return f"{self.ref()}{body}"


@dataclass(frozen=True)
class Chain:
    """A chain; a base chain when ``hook`` is given (then ``type`` and ``priority`` too)."""

    family: str
    table: str
    name: str
    type: str | None = None
    hook: str | None = None
    priority: int | str | None = None
    policy: str | None = None
    comment: str | None = None

    def __post_init__(self):
        v.family(self.family)
        v.name(self.table)
        v.name(self.name)
        if self.hook is not None:
            if self.type not in ("filter", "nat", "route"):
                raise ValueError(f"chain {self.name}: base chain type must be filter, nat or route")
            if self.hook not in ("prerouting", "input", "forward", "output", "postrouting", "ingress"):
                raise ValueError(f"chain {self.name}: unknown hook {self.hook!r}")
            if self.priority is None:
                raise ValueError(f"chain {self.name}: base chain needs a priority")
        if self.policy not in (None, "accept", "drop"):
            raise ValueError(f"chain {self.name}: policy must be accept or drop")

    @property
    def is_base(self) -> bool:
        return self.hook is not None

    @cached_property  # one tuple per object, shared by everything keyed by it
    def key(self):
        return ("chain", self.family, self.table, self.name)

    @cached_property
    def table_key(self):
        return (self.family, self.table)

    def ref(self) -> str:
        return f"chain {self.family} {self.table} {self.name}"

    def spec(self) -> str:
        parts = []
        if self.hook is not None:
            parts.append(f"type {self.type} hook {self.hook} priority {self.priority} ;")
            if self.policy:
                parts.append(f"policy {self.policy} ;")
        if self.comment:
            parts.append(f"comment {v.comment(self.comment)} ;")
        return self.ref() + (" { " + " ".join(parts) + " }" if parts else "")


@dataclass(frozen=True)
class Rule:
    """A rule: ``text`` is the rule body in nft syntax, built from ``values`` helpers.

    ``owner`` names the plugin that produced it (for ``render --annotate``); it is not
    part of the rule's identity in the kernel.
    """

    family: str
    table: str
    chain: str
    text: str
    comment: str | None = None
    owner: str | None = field(default=None, compare=False)

    def __post_init__(self):
        v.family(self.family)
        v.name(self.table)
        v.name(self.chain)
        if not self.text.strip():
            raise ValueError(f"empty rule for chain {self.chain}")
        if _FORBIDDEN_IN_RULE.search(self.text):
            raise ValueError(f"rule for chain {self.chain} contains a newline, ';' or '#': {self.text!r}")

    @property
    def table_key(self):
        return (self.family, self.table)

    def chain_ref(self) -> str:
        return f"{self.family} {self.table} {self.chain}"

    def body(self) -> str:
        return self.text + (f" comment {v.comment(self.comment)}" if self.comment else "")


@dataclass(frozen=True)
class Set:
    """A named set (``value_type`` None) or map (``value_type`` given).

    ``key_type`` / ``value_type`` are nft type expressions such as
    ``ipv4_addr . inet_proto . inet_service`` or ``verdict``; with ``typeof=True`` they are
    ``typeof`` expressions instead (needed for keys that include ``numgen``).
    """

    family: str
    table: str
    name: str
    key_type: str
    value_type: str | None = None
    typeof: bool = False
    flags: tuple[str, ...] = ()
    timeout: int | None = None
    comment: str | None = None

    def __post_init__(self):
        v.family(self.family)
        v.name(self.table)
        v.name(self.name)
        for f in self.flags:
            if f not in ("constant", "interval", "timeout", "dynamic"):
                raise ValueError(f"set {self.name}: unknown flag {f!r}")
        if self.timeout is not None:
            v.integer(self.timeout, 1)

    @property
    def is_map(self) -> bool:
        return self.value_type is not None

    @property
    def kind(self) -> str:
        return "map" if self.is_map else "set"

    @cached_property  # one tuple per object, shared by every element key of the set
    def key(self):
        return ("set", self.family, self.table, self.name)

    @cached_property
    def table_key(self):
        return (self.family, self.table)

    def ref(self) -> str:
        return f"{self.kind} {self.family} {self.table} {self.name}"

    def spec(self) -> str:
        word = "typeof" if self.typeof else "type"
        kv = self.key_type + (f" : {self.value_type}" if self.is_map else "")
        parts = [f"{word} {kv} ;"]
        if self.flags:
            parts.append(f"flags {','.join(self.flags)} ;")
        if self.timeout is not None:
            parts.append(f"timeout {self.timeout}s ;")
        if self.comment:
            parts.append(f"comment {v.comment(self.comment)} ;")
        return f"{self.ref()} {{ {' '.join(parts)} }}"


@dataclass(frozen=True)
class Element:
    """One element of a set (``value`` None) or map. ``key``/``value`` are rendered text."""

    family: str
    table: str
    set: str
    key: str
    value: str | None = None
    comment: str | None = field(default=None, compare=False)

    def __post_init__(self):
        check_element_text(self.key, self.set)
        if self.value is not None:
            check_element_text(self.value, self.set)

    @property
    def table_key(self):
        return (self.family, self.table)

    @property
    def set_key(self):
        return ("set", self.family, self.table, self.set)

    def body(self) -> str:
        c = f" comment {v.comment(self.comment)}" if self.comment else ""
        return self.key + c + (f" : {self.value}" if self.value is not None else "")


_FORBIDDEN_IN_ELEMENT = re.compile(r"[\n\r;#{},]")


def check_element_text(text: str, set_name: str) -> str:
    """Reject element keys and values that could break out of ``{ ... }``."""
    if not isinstance(text, str) or not text or _FORBIDDEN_IN_ELEMENT.search(text):
        raise ValueError(f"invalid element text {text!r} for set {set_name}")
    return text


@dataclass(frozen=True)
class Elements:
    """Several elements of one set or map, written as one command: far cheaper to build,
    render and for nft to parse than one command each. ``items`` are tuples that start
    with (key, value, comment), whose texts passed ``check_element_text`` (what follows
    is ignored: the engine passes its own element records as they are). An item whose
    value is a tuple is an *indexed run*: the elements ``key . 0`` … ``key . N-1``
    mapping to the N values in turn, expanded only when written."""

    family: str
    table: str
    set: str
    items: tuple = ()

    @property
    def table_key(self):
        return (self.family, self.table)

    def expanded(self):
        """(key, value, comment) of every element, indexed runs expanded."""
        for item in self.items:
            key, value, comment = item[0], item[1], item[2]
            if type(value) is tuple:
                for i, val in enumerate(value):
                    yield f"{key} . {i}", val, comment
            else:
                yield key, value, comment

    def body(self, keys_only: bool = False) -> str:
        if keys_only:
            return ", ".join([key for key, _, _ in self.expanded()])
        parts = []
        for key, value, comment in self.expanded():
            if comment:
                key = f"{key} comment {v.comment(comment)}"
            parts.append(key if value is None else f"{key} : {value}")
        return ", ".join(parts)

    def split(self):
        return [Element(self.family, self.table, self.set, key, value, comment)
                for key, value, comment in self.expanded()]


@dataclass(frozen=True)
class Flowtable:
    family: str
    table: str
    name: str
    hook: str = "ingress"
    priority: int | str = "filter"
    devices: tuple[str, ...] = ()

    def __post_init__(self):
        v.family(self.family)
        v.name(self.table)
        v.name(self.name)
        for d in self.devices:
            v.ifname(d)

    @property
    def key(self):
        return ("flowtable", self.family, self.table, self.name)

    @property
    def table_key(self):
        return (self.family, self.table)

    def ref(self) -> str:
        return f"flowtable {self.family} {self.table} {self.name}"

    def spec(self) -> str:
        devs = f" devices = {{ {', '.join(self.devices)} }} ;" if self.devices else ""
        return f"{self.ref()} {{ hook {self.hook} priority {self.priority} ;{devs} }}"


@dataclass(frozen=True)
class Counter:
    """A named counter (``add counter FAMILY TABLE NAME``), for rules such as
    ``counter name "c"`` or ``counter name <key> map @m`` (a map whose value type is
    ``counter``). Adding one that exists keeps its packets and bytes."""

    family: str
    table: str
    name: str
    comment: str | None = None

    def __post_init__(self):
        v.family(self.family)
        v.name(self.table)
        v.name(self.name)

    @property
    def key(self):
        return ("counter", self.family, self.table, self.name)

    @property
    def table_key(self):
        return (self.family, self.table)

    def ref(self) -> str:
        return f"counter {self.family} {self.table} {self.name}"

    def spec(self) -> str:
        return self.ref() + (f" {{ comment {v.comment(self.comment)} ; }}" if self.comment else "")


@dataclass
class Listing:
    """The objects of one table as the kernel has them (no rules, no elements)."""

    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    flowtables: dict[str, Flowtable] = field(default_factory=dict)
