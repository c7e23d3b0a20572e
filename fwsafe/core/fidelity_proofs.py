"""The fidelity test's memory (fwsafe.backends.fidelity): the tables whose live digest was
proven to round-trip exactly through iptables-save and iptables-restore on this host, so that
the same table with the same tools is not tried again (apply, revert, apply again).

One file in the state directory, written under its lock (apply holds it)::

    fidelity-proven.json   {"format": 1, "proven": [[family, table, digest, tools], ...]}

oldest first, the newest MAX_PROOFS kept; written atomically (statedir.atomic_write: 0600,
fsync, rename). A file that is missing, a symlink, unreadable, damaged, of another format or
shape reads as empty (and is replaced at the next write): the round trip is then made, as
without the memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterable

from fwsafe.backends.base import ProofKey
from fwsafe.core.statedir import StateDir, atomic_write
from fwsafe.errors import StateError

PROOFS_FILE = "fidelity-proven.json"
PROOFS_FORMAT = 1
MAX_PROOFS = 64
MAX_FILE_BYTES = 64 * 1024   # 64 entries take some 15 KiB; anything larger is not ours


def _read_bytes(state: StateDir) -> bytes | None:
    try:
        fd = os.open(state.root / PROOFS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            return None
        return os.read(fd, MAX_FILE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_proofs(state: StateDir) -> list[ProofKey]:
    """The proven tables, oldest first ([] when the file cannot be used)."""
    data = _read_bytes(state)
    try:
        doc = json.loads(data) if data else None
    except ValueError:
        return []
    entries = doc.get("proven") if isinstance(doc, dict) \
        and doc.get("format") == PROOFS_FORMAT else None
    if not isinstance(entries, list):
        return []
    keys: list[ProofKey] = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4
                and all(isinstance(part, str) and part for part in entry)):
            return []
        keys.append((entry[0], entry[1], entry[2], entry[3]))
    return keys[-MAX_PROOFS:]


def remember_proofs(state: StateDir, found: Iterable[ProofKey],
                    known: Iterable[ProofKey] | None = None) -> None:
    """Add `found` to the proven tables (`known`: what the file held, if just read), the
    newest last, MAX_PROOFS kept. A write that fails is left (the round trip runs again)."""
    new = list(dict.fromkeys(found))
    keys = [key for key in (read_proofs(state) if known is None else known) if key not in new]
    keys = list(dict.fromkeys([*keys, *new]))[-MAX_PROOFS:]
    data = json.dumps({"format": PROOFS_FORMAT, "proven": [list(key) for key in keys]})
    with contextlib.suppress(OSError, StateError):
        atomic_write(state.root / PROOFS_FILE, data.encode())
