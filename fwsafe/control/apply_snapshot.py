"""The snapshot an apply takes: the layers' captures collected, brought up to date right
before the guard starts (read again only what may have moved), and written into the
transaction's directory; what a preparation cut short left behind, removed. Used by the apply
flow (fwsafe.control.flow).
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ThreadPoolExecutor

from fwsafe.backends import ApplyError, layer_for, nflist
from fwsafe.core import prefetch, snapshot, transaction
from fwsafe.core.change import Change
from fwsafe.core.statedir import StateDir
from fwsafe.errors import EnvironmentProblem
from fwsafe.guard import spawn


def refresh(pool: ThreadPoolExecutor, captured: dict[str, bytes], generation: int | None,
            needed: list[str]) -> dict[str, bytes]:
    """The snapshot as of now. A layer kept in nf_tables is read again only if the ruleset's
    generation moved on since `captured` was taken (somebody changed something meanwhile, e.g.
    fail2ban banned an address during the lockout check); files and legacy tables always."""
    now = nflist.generation() if generation is not None else None
    stale = [name for name in captured
             if now is None or now != generation or not layer_for(name).in_nf_tables()]
    if not stale:
        return captured
    fresh = collect(prefetch.start_capture(pool, stale), [n for n in needed if n in stale])
    return {name: fresh.get(name, captured[name]) for name in captured
            if name in fresh or name not in stale}


def collect(captures: dict[str, Future[bytes]], needed: list[str]) -> dict[str, bytes]:
    """A layer the change gives content for must be captured; another that cannot be read
    is left out of the snapshot (and of the revert)."""
    captured = {}
    for name, future in captures.items():
        try:
            captured[name] = future.result()
        except (OSError, ApplyError, ValueError) as exc:
            if name in needed:
                raise EnvironmentProblem(f"cannot capture the {name} layer: {exc}",
                                         hint=getattr(exc, "hint", None)) from exc
    missing = [n for n in needed if n not in captured]
    if missing:
        raise EnvironmentProblem(f"cannot capture {', '.join(missing)}: tools missing")
    return captured


def remove_abandoned(state: StateDir) -> None:
    """Transactions whose preparation was cut short (the CLI was killed while it read or
    checked): a directory with the guard's pipe still in it and no record, so its guard
    never went (the record is written before that, the pipe removed after). Under the
    state directory's lock nobody else is preparing one."""
    try:
        found = [p for p in state.tx_root.iterdir()
                 if p.is_dir() and not p.is_symlink() and (p / spawn.GO_FIFO).is_fifo()
                 and not transaction.record_path(state, p.name).exists()]
    except FileNotFoundError:
        return
    for path in found:
        shutil.rmtree(path, ignore_errors=True)


def save_snapshot(state: StateDir, tx_id: str, change: Change | None, captured: dict[str, bytes],
                  written: dict[str, bytes] | None = None) -> None:
    """Write the snapshot (and the change) into the transaction's directory; with
    `written`, only what differs from what was written before (and remove a layer that is
    no longer part of it)."""
    if change is not None:
        snapshot.save(state, tx_id, snapshot.CHANGE, change.layers)
    old = written or {}
    snapshot.save(state, tx_id, snapshot.BEFORE,
                  {name: data for name, data in captured.items() if old.get(name) != data})
    for name in set(old) - set(captured):
        snapshot.remove(state, tx_id, snapshot.BEFORE, name)


