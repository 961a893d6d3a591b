"""In-process libnftables, for the small element-only transactions of partial syncs.

Starting ``nft`` costs about 16 ms; calling libnftables through ctypes about 0.2 ms,
which is most of a one-endpoint partial sync. But a crash in libnftables (nft 1.0.6
aborts on some rules it cannot linearize) would take kproxy down with it, and its error
messages lose the line number. So ``HybridNft`` sends only transactions made of element
additions and deletions (which is all a partial sync writes) through the library, and
everything else — and any transaction the library rejects, to get nft's full error
message — through the ``nft`` program.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from .cli import NftCLI
from .errors import NftError
from .objects import Element, Elements
from .transaction import Transaction


class LibNft:
    """A minimal ctypes binding of libnftables (``nft_run_cmd_from_buffer``)."""

    def __init__(self):
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        lib = ctypes.CDLL(name)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, text: str) -> None:
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        if rc != 0:
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            raise NftError(err.decode(errors="replace").strip() or "libnftables failed")


def _elements_only(txn: Transaction) -> bool:
    return all(isinstance(op.obj, (Element, Elements)) and op.verb in ("add", "delete") for op in txn.ops)


class HybridNft(NftCLI):
    """``NftCLI`` that applies element-only transactions in-process when it can."""

    def __init__(self, nft: str = "nft", netlink: bool = True):
        super().__init__(nft, netlink)
        try:
            self.lib = LibNft()
        except OSError:
            self.lib = None  # no libnftables: everything goes through the program

    def apply(self, txn: Transaction | str) -> None:
        if self.lib is not None and isinstance(txn, Transaction) and txn.ops and _elements_only(txn):
            try:
                self.lib.run(txn.render())
                return
            except NftError:
                pass  # nothing was applied: let the program say precisely what is wrong
        super().apply(txn)
