"""`fwsafe recover`, the backstop and the boot unit: undo a transaction that is still open but
has no guard (the guard died, the machine rebooted, or the CLI was killed before the guard
armed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

from fwsafe import failpoints
from fwsafe.backends import FILES, layer_for, layer_has
from fwsafe.core import snapshot, transaction
from fwsafe.core.change import require_root
from fwsafe.core.revert import (
    Prover,
    compute_touched,
    finished_revert,
    record_revert,
    recording_attempts,
    revert_change,
)
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.errors import NoTransactionError, PendingError

RECOVER_GIVE_UP_S = 120.0    # a one-shot recover retries this long before it says revert-failed
LATE_REASON = ("its deadline passed with nobody looking after it (its guard and backstop were "
               "gone)")


def orphaned(state: StateDir, record: Record, now: float | None = None) -> bool:
    """Transaction `record` is open, nobody looks after it (its guard is gone and no process
    holds it: the backstop, systemd's ExecStopPost= take-over, a recover), and it is past its
    deadline (or was being reverted, or never got one): it must be reverted now, by whoever
    sees it first. Before the deadline a guardless change is left alone (`confirm` may still
    keep it)."""
    if record.state not in transaction.OPEN_STATES or not record.guard_pid:
        return False   # (a record never armed by a guard: nothing was applied by one)
    if transaction.guard_alive(record) or state.tx_held(record.id):
        return False
    if record.state == transaction.REVERTING or record.deadline is None:
        return True
    return (now if now is not None else time.time()) >= record.deadline


def recover(state: StateDir, reason: str = "recovered by `fwsafe recover`: the guard was gone", *,
            by: str = "recover", tx_id: str | None = None,
            give_up_after: float | None = RECOVER_GIVE_UP_S,
            save: Callable[[StateDir, Record], None] = transaction.save_record,
            claimed: bool = False, prover: Prover | None,
            remove_hatch: Callable[[Record], object]) -> Record:
    """Undo a transaction that is still open but has no guard (the guard died, the machine
    rebooted, or the CLI was killed before the guard armed).

    After a reboot (another boot id; see `rebooted`) nothing is merged against the empty
    kernel: the boot files hold the old rules (they are written only on confirm), so only the
    files the change touched (ufw's) are put back, and the usual loaders bring the rules in.

    The transaction is claimed first (PendingError while its guard or another reverter holds
    it). Without `give_up_after` (the backstop, which never gives up) the state lock is let go
    while reverting, so that other commands answer meanwhile (the record says reverting).
    `save` writes the record (the backstop's keeps it in memory when the disk refuses).
    `prover`: the revert's access proof (fwsafe.check.proof.PROVER; given by every caller).
    `remove_hatch`: takes the kernel escape hatch out of every layer once the revert worked,
    and says so in `record.hatch` (fwsafe.guard.hatch.removed; given by every caller)."""
    if prover is None:
        raise TypeError("recover(prover=...) is needed: the revert's access proof "
                        "(fwsafe.check.proof.PROVER)")
    require_root()
    if not state.exists():
        raise NoTransactionError("nothing to recover: fwsafe has no state here")
    with state.locked(wait=True), contextlib.ExitStack() as claim:
        record = transaction.load_current(state)
        if record is not None and tx_id and record.id != tx_id:
            raise NoTransactionError(f"transaction {tx_id} is not the current one")
        if record is not None and record.state == transaction.PREPARING \
                and not transaction.guard_alive(record):
            # Under the transaction's lock: a guard arming right now wins.
            latest = transaction.abort_preparing(
                state, record, "the command that prepared it stopped before the guard armed: nothing was "
                        "applied")
            if latest.state == transaction.ABORTED:
                return latest
            record = latest
        if record is None or record.state not in (
                transaction.APPLYING, transaction.PENDING, transaction.REVERTING,
                transaction.REVERT_FAILED):
            raise NoTransactionError("nothing to recover: no transaction is pending")
        if transaction.guard_alive(record):
            raise PendingError(
                f"transaction {record.id} still has its guard (PID {record.guard_pid})",
                hint="use `fwsafe revert` or `fwsafe confirm`")
        if not claimed:   # else the caller holds it (the backstop, until the record is written)
            claim.enter_context(state.tx_claimed(record.id))
        leftovers = prover.remove_dead()   # the dead guard's proof sandbox, if it died proving
        before = snapshot.load(state, record.id, snapshot.BEFORE, record.captured)
        after = snapshot.load_optional(state, record.id, snapshot.AFTER, record.watch)
        resumed = record.state == transaction.REVERTING   # someone began; may have finished
        if record.state != transaction.REVERTING:
            record.transition(transaction.REVERTING, reason)
        record.reason = reason
        after_reboot = rebooted(record, before)
        touched = dict(record.touched)
        if not touched:
            # The guard died before it recorded what the change touched: compare now
            # (whatever differs from the snapshot is undone whole).
            watch = [n for n in record.watch if not after_reboot or layer_has(n, FILES)]
            now = {name: layer_for(name).capture() for name in watch}
            touched = compute_touched(before, now)
            record.touched = touched
            after = {}
        if after_reboot:
            touched = {n: u for n, u in touched.items() if layer_has(n, FILES)}
            by = "boot"
            record.reason = reason = (
                "reboot: the change was still pending when the machine went down; the "
                "kernel starts from the boot files, which hold the old rules"
                + (f"; put back {', '.join(u for us in touched.values() for u in us)}"
                   if touched else ""))

        save(state, record)   # reverting, said before the lock is let go
        failpoints.hit("recover.claimed")
        with state.released() if give_up_after is None else contextlib.nullcontext():
            access = None if after_reboot else prover.access(record)
            # A revert that ended before it could say so is found, with its proofs, not
            # done twice.
            result = (finished_revert(touched, before, access, lambda _message: None)
                      if resumed else None)
            if result is None:
                result = revert_change(touched, before, after or None,
                                       on_attempt=recording_attempts(
                                           record, lambda: save(state, record)),
                                       give_up_after=give_up_after,
                                       after_stamp=record.after_stamp, access=access,
                                       unchanged_since=record.change_stamp, warm=prover.warm)
            if not result.problems:
                remove_hatch(record)
        failpoints.hit("recover.reverted")
        record_revert(record, result, by, leftovers)
        if result.problems:
            record.error = "; ".join(result.problems)
            record.transition(transaction.REVERT_FAILED, record.error)
        else:
            record.transition(transaction.REVERTED, result.summary(by))
        save(state, record)
    return record


def rebooted(record: Record, before: Mapping[str, bytes]) -> bool:
    """The machine rebooted since the change: the boot id decides. On the same boot an empty
    kernel is not a reboot (a change that emptied the firewall, then its guard died): the
    revert is a full one. Only where no boot id can be read (a record without one, no /proc)
    does a kernel with no rules in any layer while the snapshot had some count as a reboot."""
    now_id = transaction.current_boot_id()
    if record.boot_id and now_id:
        return record.boot_id != now_id
    kernel = [n for n in record.captured if not layer_has(n, FILES) and n in before]
    if not any(layer_for(n).units(before[n]) for n in kernel):
        return False
    try:
        return not any(layer_for(n).units(layer_for(n).capture()) for n in kernel)
    except Exception:  # noqa: BLE001 - cannot tell: not a reboot, merge as usual
        return False
