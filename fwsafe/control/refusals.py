"""What refuses an apply before anything changes (exit 3, nothing changed): a change that
writes a table iptables-save does not show exactly, one that deletes other managers' chains,
a state directory without room or that refuses writes; and a transaction still open (looked
after, or reverted first when nobody is). Used by the apply flow (fwsafe.control.flow).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from fwsafe.backends import (
    LOADS_IPTABLES,
    NFT_TABLES,
    RULES_FILE,
    FidelityError,
    FidelityProofs,
    fidelity_digests_ahead,
    first_with,
    layer_for,
    layers_with,
    lossy_tables,
)
from fwsafe.context import RUN
from fwsafe.core import transaction
from fwsafe.core.change import Change
from fwsafe.core.fidelity_proofs import read_proofs, remember_proofs
from fwsafe.core.revert import Prover
from fwsafe.core.statedir import StateDir
from fwsafe.errors import EnvironmentProblem, InvalidRulesError, PendingError
from fwsafe.guard import hatch
from fwsafe.runner import find_binary

if TYPE_CHECKING:
    from fwsafe.control.flow import ApplyOptions


def touchable_tables(change: Change, name: str) -> set[str] | None:
    """The tables of iptables layer `name` the change can write (None: any of them)."""
    if change.run is not None or first_with(LOADS_IPTABLES, change.layers):
        return None
    if name in change.layers:
        return set(layer_for(name).declared(change.layers[name]))
    nft = first_with(NFT_TABLES, change.layers)
    return None if nft and b"flush ruleset" in b" ".join(change.layers[nft].split()) else set()


def fidelity_layers(change: Change, layers: list[str]) -> dict[str, set[str] | None]:
    """The iptables-nft layers (of `layers`) whose tables the change can write, with those
    tables (None: any): the fidelity test's (`refuse_lossy_tables`)."""
    return {name: tables for name in layers_with(RULES_FILE)
            if name in layers and (tables := touchable_tables(change, name)) != set()
            and layer_for(name).in_nf_tables()}


def refuse_lossy_tables(change: Change, captured: Mapping[str, bytes],
                        generation: int | None,
                        ahead: Mapping[str, Future[tuple[int | None, dict[str, str]]]] | None
                        = None, state: StateDir | None = None) -> None:
    """A change that can write to a table of iptables-nft that iptables-save does not show
    exactly (nft's native rules, sets or base chains in it) is refused (exit 3) before
    anything happens, naming the table: its revert would load that lossy text
    (fwsafe.backends.fidelity). `captured` was read at nf_tables' `generation`; `ahead`:
    each layer's live digests read beside that reading (`digests_ahead`). `state` (its lock
    held): where the tables proven exact are remembered (fwsafe.core.fidelity_proofs), so that
    the same table is not tried again."""
    checks = fidelity_layers(change, list(captured))
    if checks and find_binary("nft") is None:   # nothing to compare with; said in the record
        change.notes.append("not checked whether iptables-save shows the tables exactly "
                            "(nft is not installed)")
        return
    remembered = read_proofs(state) if state is not None and checks else []
    proofs = FidelityProofs(known=frozenset(remembered))
    found: list[str] = []
    for name, tables in checks.items():
        try:
            found += lossy_tables(name, tables, generation=generation,  # hatch stripped: read
                                  saved=None if RUN.hatch_seen else captured[name],   # again
                                  ahead=(ahead or {}).get(name), proofs=proofs)
        except FidelityError as exc:
            raise EnvironmentProblem(
                f"cannot tell whether iptables-save shows the {name} tables exactly: {exc}",
                hint="nothing was changed") from exc
    if proofs.skipped:
        change.notes.append(f"iptables-save round trip skipped for {', '.join(proofs.skipped)}"
                            ": the same digest was proven exact before")
    if state is not None and proofs.found:
        remember_proofs(state, proofs.found, remembered)
    if found:
        raise InvalidRulesError(
            f"table {', '.join(found)} holds what iptables-nft cannot show (nft's own rules, "
            "sets or base chains): iptables-save prints it differently from the kernel, so "
            "this change could not be undone exactly; nothing was changed",
            hint="move nft's own rules and sets out of it, to a table of their own (e.g. "
                 "`table ip fw_filter`): then iptables-save shows it exactly")


def refuse_deleting_neighbours(change: Change, captured: Mapping[str, bytes],
                                options: ApplyOptions) -> None:
    """A full rules file that would delete fail2ban's, Docker's, ... chains is refused
    (exit 3) unless --force: it was most likely written before they created them."""
    # who else writes rules is looked up only for a change that could delete theirs
    from fwsafe.core.neighbours import deleted_neighbours, refusal_message

    found = deleted_neighbours(change.layers, captured, change.partial)
    if not found:
        return
    if not options.force:
        raise InvalidRulesError(
            refusal_message(found),
            hint="nothing was changed; apply only the chains the file names with "
                 "--partial, add them to the file, or delete them anyway with --force")
    change.notes.append("--force: " + refusal_message(found))


def digests_ahead(pool: ThreadPoolExecutor, change: Change, layers: list[str]
                  ) -> dict[str, Future[tuple[int | None, dict[str, str]]]]:
    """The fidelity test's live digests (fwsafe.backends.fidelity.digests_ahead), read in
    `pool` while the layers are: used only when they hold at the reading's generation."""
    if find_binary("nft") is None:
        return {}
    return {name: pool.submit(fidelity_digests_ahead, name)
            for name in fidelity_layers(change, layers)}


MIN_ROOM = 1024 * 1024   # the state directory must keep this much free, and room for the
                          # guard's capture after the change and its records, or apply refuses


def need_room(state: StateDir, snapshot_bytes: int) -> None:
    """Refuse (exit 3, nothing changed) when the state directory has no room for what the way
    back writes after the change: the capture after it and the record, a few times over."""
    try:
        info = os.statvfs(state.root)
    except OSError:
        return
    free = info.f_bavail * info.f_frsize
    needed = MIN_ROOM + 2 * snapshot_bytes
    if free < needed:
        raise EnvironmentProblem(
            f"the state directory {state.root} has {free // 1024} KiB free; fwsafe needs "
            f"{needed // 1024} KiB to record the change and its way back",
            hint="nothing was changed; free some space there (or use another --state-dir)")


@contextlib.contextmanager
def disk_refusal(state: StateDir) -> Iterator[None]:
    """What cannot be written before the change (the snapshot, the record) is a clear refusal
    (exit 3, nothing changed), not an unexpected error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES,
                         errno.EPERM):
            why = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            raise EnvironmentProblem(
                f"cannot write what the change needs in the state directory {state.root} "
                f"({why})", hint="nothing was changed; free some space there, or use another "
                "--state-dir") from exc
        raise


def refuse_if_open(state: StateDir, prover: Prover | None) -> str | None:
    """Refuse while a transaction is open and looked after (its guard lives, or someone
    is reverting it). One left open with nobody on it (its guard and backstop were killed
    together; a one-shot recover gave up) is reverted first, as its guard would have:
    nothing needs a hand. Returns what was done then, for the change's notes."""
    record = transaction.load_current(state) if state.exists() else None
    if record is None:
        return None
    if record.state in transaction.OPEN_STATES or record.state == transaction.PREPARING:
        if transaction.guard_alive(record):
            raise PendingError(
                f"transaction {record.id} is {record.state} (guard PID {record.guard_pid})",
                hint="confirm it (`fwsafe confirm`), revert it (`fwsafe revert`) "
                     "or wait for its deadline",
            )
        if state.tx_held(record.id):
            raise PendingError(
                f"transaction {record.id} is {record.state}: its guard is gone and the "
                "backstop is reverting it", hint="wait a moment, then try again")
    elif record.state != transaction.REVERT_FAILED:
        return None
    # recover is needed only when a transaction was left open without its guard
    from fwsafe.core.recover import recover

    done = recover(state, f"`fwsafe apply` found transaction {record.id} "
                   f"{record.state} with nobody looking after it: reverted it first",
                   tx_id=record.id, prover=prover, remove_hatch=hatch.removed)
    if done.state == transaction.REVERT_FAILED:
        raise PendingError(
            f"the revert of transaction {record.id} failed: the firewall is in an unknown state",
            hint="run `fwsafe recover` to retry the restore, then check `fwsafe status`",
        )
    return f"transaction {record.id} was left {record.state} without its guard: {done.state} first"


