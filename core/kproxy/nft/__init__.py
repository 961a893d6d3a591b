"""The nftables layer: object model, transactions, and two backends (real and fake)."""

from . import values
from .cli import NftCLI
from .errors import NftError
from .fake import FakeNft
from .objects import Chain, Counter, Element, Elements, Flowtable, Listing, Rule, Set, Table
from .transaction import Transaction

__all__ = ["values", "NftCLI", "NftError", "FakeNft", "Chain", "Counter", "Element", "Elements", "Flowtable", "Listing", "Rule", "Set", "Table", "Transaction"]
