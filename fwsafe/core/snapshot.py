"""Snapshots: the captured state of each firewall layer, kept as files in a transaction."""

from __future__ import annotations

from collections.abc import Iterable

from fwsafe.core.statedir import StateDir, atomic_write
from fwsafe.errors import StateError

BEFORE = "before"   # the state before the change: what a revert restores
CHANGE = "change"   # the change as given
AFTER = "after"     # the state right after the change: its own delta is BEFORE -> AFTER


def save(state: StateDir, tx_id: str, kind: str, data: dict[str, bytes]) -> None:
    for name, content in data.items():
        atomic_write(state.tx_dir(tx_id) / f"{kind}.{name}", content)


def remove(state: StateDir, tx_id: str, kind: str, name: str) -> None:
    try:
        (state.tx_dir(tx_id) / f"{kind}.{name}").unlink()
    except FileNotFoundError:
        pass


def load_optional(state: StateDir, tx_id: str, kind: str,
                  layer_names: Iterable[str]) -> dict[str, bytes]:
    """The layers of `kind` that were saved (a snapshot taken later may be missing)."""
    out = {}
    for name in layer_names:
        try:
            out[name] = (state.tx_dir(tx_id) / f"{kind}.{name}").read_bytes()
        except OSError:
            continue
    return out


def load(state: StateDir, tx_id: str, kind: str, layer_names: Iterable[str]) -> dict[str, bytes]:
    out = {}
    for name in layer_names:
        path = state.tx_dir(tx_id) / f"{kind}.{name}"
        try:
            out[name] = path.read_bytes()
        except OSError as exc:
            raise StateError(
                f"transaction {tx_id}: cannot read {path}: {exc.strerror}",
                hint="the state directory is damaged; nothing was changed",
            ) from exc
    return out
