"""A transaction: an ordered list of operations that nft applies atomically.

Each operation renders to one line of ``nft -f`` input (``add``, ``create``, ``flush``,
``delete``, ``insert``, ``replace``). One object per line keeps nft's parser out of
trouble (a rule starting with ``ct`` inside a ``chain { }`` block is misparsed) and makes
nft's error line point at exactly one operation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .objects import Chain, Counter, Element, Elements, Flowtable, Rule, Set, Table

Obj = Table | Chain | Rule | Set | Element | Elements | Flowtable | Counter


@dataclass(frozen=True)
class Op:
    verb: str
    obj: Obj
    handle: int | None = None

    def render(self) -> str:
        o, verb = self.obj, self.verb
        if isinstance(o, Rule):
            if verb in ("add", "create"):
                return f"add rule {o.chain_ref()} {o.body()}"
            if verb == "insert":
                pos = f" position {self.handle}" if self.handle is not None else ""
                return f"insert rule {o.chain_ref()}{pos} {o.body()}"
            if verb in ("replace", "delete") and self.handle is None:
                raise ValueError(f"cannot {verb} a rule without its handle")
            if verb == "replace":
                return f"replace rule {o.chain_ref()} handle {self.handle} {o.body()}"
            if verb == "delete":
                return f"delete rule {o.chain_ref()} handle {self.handle}"
            raise ValueError(f"cannot {verb} a rule")
        if isinstance(o, Elements):
            if verb not in ("add", "delete"):
                raise ValueError(f"cannot {verb} elements")
            return f"{verb} element {o.family} {o.table} {o.set} {{ {o.body(keys_only=verb == 'delete')} }}"
        if isinstance(o, Element):
            if verb not in ("add", "create", "delete"):
                raise ValueError(f"cannot {verb} an element")
            body = o.key if verb == "delete" else o.body()
            return f"{verb} element {o.family} {o.table} {o.set} {{ {body} }}"
        if verb in ("add", "create"):
            return f"{verb} {o.spec()}"
        if verb == "flush":
            if isinstance(o, (Flowtable, Counter)):
                raise ValueError(f"cannot flush a {type(o).__name__.lower()}")
            return f"flush {o.ref()}"
        if verb == "delete":
            return f"delete {o.ref()}"
        raise ValueError(f"cannot {verb} a {type(o).__name__.lower()}")


class Transaction:
    """Builder of one atomic nft transaction.

    ``new_tables``: (family, name) of the tables the transaction creates, which the
    builder knows are not in the kernel. While its base chains have no rules, a table
    changes no packet, so a backend may build such a table ahead of the transaction,
    all but the rules of its base chains, and add those in the transaction; it must
    remove the table again if the transaction fails (``NftCLI`` does this).
    """

    def __init__(self):
        self.ops: list[Op] = []
        self.new_tables: set[tuple[str, str]] = set()

    def __len__(self):
        return len(self.ops)

    def _op(self, verb, obj, handle=None):
        op = Op(verb, obj, handle)
        # reject impossible operations when they are added, not at apply time (without
        # rendering thousands of elements just to learn that adding them is possible)
        if isinstance(obj, Elements):
            if verb not in ("add", "delete"):
                raise ValueError(f"cannot {verb} elements")
        else:
            op.render()
        self.ops.append(op)
        return self

    def add(self, obj: Obj):
        """Add an object; adding one that exists is not an error (except map elements
        whose value differs)."""
        return self._op("add", obj)

    def create(self, obj: Obj):
        """Add an object that must not exist yet."""
        return self._op("create", obj)

    def flush(self, obj: Table | Chain | Set):
        """Remove a chain's rules, a set's elements, or every rule of a table (like nft,
        flushing a table keeps its chains, sets and set elements)."""
        return self._op("flush", obj)

    def delete(self, obj: Obj, handle: int | None = None):
        """Delete an object (a rule by its kernel handle)."""
        return self._op("delete", obj, handle)

    def insert(self, rule: Rule, position: int | None = None):
        """Insert a rule at the start of its chain (or before the rule with handle ``position``)."""
        return self._op("insert", rule, position)

    def replace(self, rule: Rule, handle: int):
        return self._op("replace", rule, handle)

    def extend(self, other: "Transaction"):
        self.ops.extend(other.ops)
        self.new_tables |= other.new_tables
        return self

    def render(self) -> str:
        return "".join(op.render() + "\n" for op in self.ops)
