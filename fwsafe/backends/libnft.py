"""Listing an nftables table in this process, through libnftables (the library `nft` is built
on), for the `fwsafe` command's own reading of the firewall.

`nft list table` prints each token with its own write(2): 11 writes a rule, 550,000 system
calls and a third of its time for a 50,000-rule table. The library, asked to keep its output
in memory, gives the same text byte for byte without them: for that table 0.92 s of CPU instead
of 1.57 s (`nft` and the pipe's reader; `perf stat`), which matters while the validation runs
beside it on a small machine. Read only; stdlib only (ctypes).

Off unless the process asks for it (`enable()`): the library keeps nft's cache of the whole
table in this process's heap while it lists (160 MB for 50,000 rules, as `nft` itself would),
which a short-lived command can afford (and gives back once listed), but not the guard: it stays
small, and nft's library exits the process when an allocation fails.
`list_table` returns None whenever the library cannot answer (not installed, not loadable, an
unexpected error): the caller then runs `nft`, which reports errors in its own words.
"""

from __future__ import annotations

import ctypes
import re
import threading

__all__ = ["enable", "enabled", "list_table"]

_STATELESS = 1 << 2          # NFT_CTX_OUTPUT_STATELESS, as `nft -s`
_LOCK = threading.Lock()     # one caller at a time: the library has process-wide state
_STATE: dict[str, object] = {}


def enable(on: bool = True) -> None:
    """Let `list_table` use the library in this process (a short-lived command only)."""
    _STATE["enabled"] = on


def enabled() -> bool:
    return bool(_STATE.get("enabled"))


def _library() -> ctypes.CDLL | None:
    if "lib" in _STATE:
        return _STATE["lib"]  # type: ignore[return-value]
    lib: ctypes.CDLL | None
    try:
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    except (OSError, AttributeError):
        lib = None
    _STATE["lib"] = lib
    return lib


_NAME = re.compile(r"[A-Za-z_.][A-Za-z0-9_/.-]*")   # an unquoted name to nft's scanner


def list_table(family: str, name: str) -> bytes | None:
    """`nft -s list table FAMILY NAME`'s output, from the library in this process; None when
    not enabled or the library cannot answer (then run `nft`)."""
    if not enabled():
        return None
    lib = _library()
    if lib is None or not family.isalnum() or not _NAME.fullmatch(name):
        return None
    with _LOCK:
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            return None
        try:
            if lib.nft_ctx_buffer_output(ctx) != 0 or lib.nft_ctx_buffer_error(ctx) != 0:
                return None
            lib.nft_ctx_output_set_flags(ctx, _STATELESS)
            if lib.nft_run_cmd_from_buffer(ctx, f"list table {family} {name}".encode()) != 0:
                return None
            out = lib.nft_ctx_get_output_buffer(ctx)
            return bytes(out) if out is not None else None
        finally:
            lib.nft_ctx_free(ctx)
            _give_back()


def _give_back() -> None:
    """Return the freed cache to the system (glibc keeps it otherwise: 175 MB resident after
    a 50,000-rule table instead of 18 MB), so a command that then waits for a confirmation does
    not sit on it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
