"""The transaction manager: what `apply`, `confirm`, `revert`, `extend`, `status` and `recover`
do, independent of the command line and of any one firewall backend. `apply` is
fwsafe.control.flow, `recover` fwsafe.core.recover; this module ties them to the rest.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from fwsafe import failpoints
from fwsafe.backends import ALL_LAYERS, RULES_FILE, ApplyError, layer_for, layers_with
from fwsafe.control.flow import ApplyFlow, ApplyOptions
from fwsafe.core import transaction
from fwsafe.core.change import Change
from fwsafe.core.recover import RECOVER_GIVE_UP_S
from fwsafe.core.recover import recover as recover_transaction
from fwsafe.core.revert import Prover
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.errors import (
    ChangeMayBeLiveError,
    GuardError,
    NoTransactionError,
    PendingError,
    RevertedError,
    RevertFailedError,
    StateError,
)
from fwsafe.guard import hatch, spawn
from fwsafe.guard.takeover import remove_left_hatch


def same_ssh_connection(a: dict[str, str], b: dict[str, str]) -> bool:
    return bool(a.get("SSH_CONNECTION")) and a.get("SSH_CONNECTION") == b.get("SSH_CONNECTION")


def describe_confirmer(who: dict[str, str], applied_by: dict[str, str]) -> str:
    conn = who.get("SSH_CONNECTION")
    if not conn:
        return "confirmed by `fwsafe confirm` outside SSH (local console or script)"
    client = " ".join(conn.split()[:2])
    if same_ssh_connection(who, applied_by):
        return (f"confirmed from the SAME SSH connection that applied the change ({client}): "
                "this proves only that established connections survive")
    return f"confirmed by `fwsafe confirm` from a new SSH connection ({client})"



# Against a guard that is reverting, stuck, gone or taken over, confirm, revert and extend
# answer from the record once it settles: 4 reverted, 5 may still be live, 0 confirmed; never 3
# ("nothing changed") once a change was live.
HATCH_WAIT_S = 15.0  # how long a confirm waits for a failing guard to remove its hatch or exit
STUCK_D_S = 1.0  # how long a guard must stay blocked in the kernel (D) to count as stuck
CONFIRM_TIMEOUT = 30.0   # a guard answers a confirmation at once (it removes its hatch)
REVERT_TIMEOUT = 600.0   # a revert may take long (it never gives up)


def guard_stopped(record: Record) -> bool:
    """The guard is stopped (SIGSTOP) or blocked in the kernel for longer than a moment: it
    cannot answer. A working guard is in D for an instant too (its record synced to disk, a
    netlink call): one look at D alone would take it for stuck, and a confirm would not ask it
    or a revert would kill it (STUCK_D_S)."""
    # the backstop's module: loaded only when a guard's process state is asked
    from fwsafe.guard.watcher import process_state

    pid = record.guard_pid
    if not pid:
        return False
    end = time.monotonic() + STUCK_D_S
    while True:
        state = process_state(pid)
        if state in ("T", "t"):
            return True
        if state != "D":
            return False
        if time.monotonic() >= end:
            return True
        time.sleep(0.05)


def stop_stuck_guard(record: Record) -> bool:
    """A guard that does not answer because it is stopped (SIGSTOP) or blocked in the kernel
    is killed (SIGKILL), so that its backstop, or this command, takes over. False when it
    seems to be working (it answers later, or reverts)."""
    # the backstop's module: loaded only when a stuck guard is stopped
    from fwsafe.guard.backstop_tools import pidfd_of

    pid = record.guard_pid
    if not pid or not guard_stopped(record) or not transaction.guard_alive(record):
        return False
    fd = pidfd_of(pid)
    try:
        if fd is not None:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        return False
    else:
        if fd is not None:
            select.select([fd], [], [], 5.0)   # gone, once the pidfd is readable
    finally:
        if fd is not None:
            os.close(fd)
    return True


LATE_CONFIRM = ("its deadline passed with its guard gone: a confirm after the deadline proves "
                "nothing (the kernel's escape hatch lets any new login in)")

# Fields of the record that `status` shows as they are recorded (in this order).
STATUS_AS_RECORDED = (
    "reason", "error", "who", "confirmed_by", "probes", "run",
    "captured", "touched", "notes", "backstop", "reverted_by",
    "revert_attempts", "revert_last_error", "revert_notes", "revert_proofs", "revert_verified",
)


class Manager:
    """confirm / revert / extend / status, apply and recover. Steps from above core:
    `on_confirmed` (fwsafe.steps) for a confirm without the guard, `prover` (the access proof,
    fwsafe.check.proof.PROVER) for recover."""

    def __init__(self, state: StateDir, *, prover: Prover | None = None,
                 on_confirmed: Callable[[StateDir, Record], object] | None = None) -> None:
        self.state, self.prover, self.on_confirmed = state, prover, on_confirmed

    # -- reading ------------------------------------------------------------------------------
    def current(self) -> Record | None:
        if not self.state.exists():
            return None
        return transaction.load_current(self.state)

    def _pending(self, tx_id: str | None) -> Record:
        record = self.current()
        if record is None:
            raise NoTransactionError("no transaction: nothing has been applied with fwsafe here")
        if tx_id and tx_id != record.id:
            raise NoTransactionError(
                f"transaction {tx_id} is not the current one (the current one is {record.id})")
        return record

    def view(self, tx_id: str) -> Record:
        """Transaction `tx_id` as it stands: its living guard's view (the truth even while
        the disk refuses the record), else the record on disk."""
        return spawn.view(self.state, transaction.load_record(self.state, tx_id), timeout=1.0)

    # -- apply / recover ------------------------------------------------------------------------
    def apply(self, change: Change, options: ApplyOptions) -> Record:
        """Apply `change` under a guard; return the record once the change is live (pending)."""
        return ApplyFlow(self.state).run(change, options)

    def recover(self, reason: str = "recovered by `fwsafe recover`: the guard was gone", *,
                by: str = "recover", tx_id: str | None = None,
                give_up_after: float | None = RECOVER_GIVE_UP_S) -> Record:
        """Undo a transaction still open without a guard (fwsafe.core.recover)."""
        return recover_transaction(self.state, reason, by=by, tx_id=tx_id,
                                   give_up_after=give_up_after, prover=self.prover,
                                   remove_hatch=hatch.removed)

    # -- confirm / revert / extend (exit codes in races: see CONFIRM_TIMEOUT) -------------------
    def confirm(self, tx_id: str | None = None) -> Record:
        record = self._pending(tx_id)
        if record.state == transaction.CONFIRMED:
            return record  # confirming twice is not an error: scripts may retry
        self._raise_if_final(record, "confirm")
        who = transaction.who_am_i()
        how = describe_confirmer(who, record.who)
        if transaction.guard_alive(record):
            failpoints.hit("confirm.asking")
            try:   # a stopped guard cannot take it: its backstop decides
                answer = {} if guard_stopped(record) else spawn.request(
                    self.state, "confirm", by={**who, "how": how}, timeout=CONFIRM_TIMEOUT)
            except GuardError:
                answer = {}
            failpoints.hit("confirm.answered")
            record = spawn.settle(self.state, record, limit=0 if answer.get("ok") else
                                  spawn.SETTLE_S)
            if record.state == transaction.CONFIRMED:
                return hatch_left(self.state, record)
            self._raise_if_final(record, "confirm")
            raise ChangeMayBeLiveError(
                f"transaction {record.id} is still {record.state} and its guard does not "
                f"answer: {answer.get('error') or 'no answer'}; the change may be live",
                hint="run `fwsafe status`; `fwsafe revert` stops a stuck guard")
        if record.deadline is not None and time.time() >= record.deadline:
            # Past the deadline the kernel's hatch lets any new login in: a confirm proves
            # nothing now, and the change is reverted as its guard would have done.
            self._raise_if_final(self.revert(record.id, reason=LATE_CONFIRM), "confirm")
        try:
            with self.state.locked(wait=True), self.state.tx_claimed(record.id):
                return confirm_without_guard(self, record.id, who, how)
        except PendingError:   # the backstop is reverting it
            self.settled_or_live(spawn.settle(self.state, record), "confirm")
            raise

    def revert(self, tx_id: str | None = None, reason: str = "reverted by `fwsafe revert`") -> Record:
        record = self._pending(tx_id)
        self._raise_if_final(record, "revert")
        # A stopped guard cannot revert: it is killed, and its backstop or this command does.
        if transaction.guard_alive(record) and not stop_stuck_guard(record):
            failpoints.hit("revert.asking")
            with contextlib.suppress(GuardError):
                spawn.request(self.state, "revert", timeout=REVERT_TIMEOUT, reason=reason)
            failpoints.hit("revert.answered")
            record = spawn.settle(self.state, record)
        if record.state in transaction.OPEN_STATES and not transaction.guard_alive(record):
            try:
                record = self.recover(reason=reason + " (guard was gone)")
            except PendingError:   # the backstop is reverting it
                record = spawn.settle(self.state, record)
            except NoTransactionError:   # it ended meanwhile: its guard wrote it and exited
                record = transaction.load_record(self.state, record.id)
        if record.state == transaction.REVERT_FAILED:
            raise RevertFailedError(f"the revert FAILED: {record.error}",
                                    hint="the firewall may hold the new rules; run `fwsafe recover`")
        self.settled_or_live(record, "revert", final_ok=True)
        return record

    def extend(self, seconds: float, tx_id: str | None = None) -> Record:
        record = self._pending(tx_id)
        self._raise_if_final(record, "extend")
        if not transaction.guard_alive(record):
            self.settled_or_live(spawn.settle(self.state, record), "extend")
            raise ChangeMayBeLiveError(
                f"the guard of transaction {record.id} is gone and nobody reverts it: the "
                "change may be live; nothing to extend",
                hint="run `fwsafe recover` (revert it) or `fwsafe confirm` (keep it)")
        try:
            if guard_stopped(record):
                raise GuardError("the guard is stopped (SIGSTOP?)")
            answer = spawn.request(self.state, "extend", seconds=seconds,
                                   by=transaction.who_am_i().get("SSH_CONNECTION", "local"))
        except GuardError as exc:
            answer = {"ok": False, "error": f"the guard does not answer: {exc.message}"}
        record = spawn.view(self.state, record)
        if not answer.get("ok"):
            if record.state == transaction.PENDING and "seconds must" in str(answer.get("error")):
                raise GuardError(f"the guard refused to extend: {answer.get('error')}")
            self.settled_or_live(spawn.settle(self.state, record), "extend")
        return record

    def settled_or_live(self, record: Record, verb: str, *, final_ok: bool = False) -> None:
        """Raise what `record`, as settled, means for `verb`: 4 reverted, 5 revert failed or
        still open (may be live); return only for a final state `final_ok` accepts."""
        if record.state == transaction.REVERTED and final_ok:
            return
        self._raise_if_final(record, verb)
        if record.state in transaction.OPEN_STATES:
            raise ChangeMayBeLiveError(
                f"transaction {record.id} is still {record.state}: the change may be live",
                hint="run `fwsafe status`; if nobody is reverting it, `fwsafe recover`")

    def _raise_if_final(self, record: Record, verb: str) -> None:
        if record.state == transaction.REVERTED:
            raise RevertedError(
                f"too late to {verb}: transaction {record.id} was reverted: {record.reason}")
        if record.state == transaction.REVERT_FAILED:
            raise RevertFailedError(
                f"transaction {record.id}: the revert FAILED: {record.error}",
                hint="run `fwsafe recover` to retry the restore")
        if record.state == transaction.CONFIRMED and verb != "confirm":
            raise NoTransactionError(f"transaction {record.id} is already confirmed")
        if record.state in (transaction.ABORTED, transaction.REJECTED):
            raise NoTransactionError(
                f"transaction {record.id} was {record.state}: nothing was changed")

    # -- layers -------------------------------------------------------------------------------
    @staticmethod
    def layers_report() -> dict[str, Any]:
        """Which firewall layers this system has, which hold rules, and what deserves a warning
        (legacy and nf_tables iptables tables both in use: both filter packets)."""
        entries = []
        in_use: dict[str, bool] = {}
        for name in ALL_LAYERS:
            layer = layer_for(name)
            entry: dict[str, Any] = {"layer": name, "label": layer.label,
                                     "available": layer.available(), "in_use": False, "units": 0}
            if entry["available"]:
                try:
                    units = layer.units(layer.capture())
                except (ApplyError, OSError, ValueError) as exc:
                    entry["error"] = str(exc)
                else:
                    entry["units"] = len(units)
                    entry["in_use"] = bool(units)
            in_use[name] = bool(entry["in_use"])
            entries.append(entry)
        warnings = []
        for family in layers_with(RULES_FILE):
            if in_use.get(f"{family}-legacy") and in_use.get(family):
                warnings.append(
                    f"{family}: both iptables-legacy and iptables-nf_tables tables hold rules; "
                    "both filter packets (see `iptables-legacy-save` and `iptables-save`)")
            elif in_use.get(f"{family}-legacy"):
                warnings.append(f"{family}: iptables-legacy tables hold rules while `iptables` "
                                "is nf_tables: `iptables -L` does not show them")
        return {"layers": entries, "warnings": warnings}

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        record = self.current()
        if record is None:
            return {"state": "none", "id": None, "deadline": None, "remaining_s": None,
                    "guard_pid": None, "reason": None, "shielded": None}
        alive = transaction.guard_alive(record)
        remaining = record.remaining_s()
        remaining_from = "record" if remaining is not None else None
        unsaved = False
        if alive:   # its own view: the truth even while the disk refuses the record
            record, remaining, remaining_from, unsaved = self._ask_guard(
                record, remaining, remaining_from)
        open_ = record.state in transaction.OPEN_STATES or record.state == transaction.PREPARING
        taken_over = open_ and not alive and self.state.tx_held(record.id)
        kept = spawn.ask_record(self.state, record, 1.0) if taken_over else None  # disk full
        record, unsaved = (kept, True) if kept is not None else (record, unsaved)
        if taken_over and record.state in (transaction.APPLYING, transaction.PENDING):
            # Its guard is gone and the backstop holds it: reverting, or reverted and waiting
            # for the disk to take the record. Never "pending" with nobody to revert.
            record.state = transaction.REVERTING
            record.reason = "its guard is gone: the backstop took the transaction over"
            remaining, remaining_from = None, None
        # the backstop's module: loaded only when a guard's process state is asked
        from fwsafe.guard.watcher import process_state

        return {
            "state": record.state,
            "id": record.id,
            "layers": record.layers,
            "created": record.created,
            "timeout_s": record.timeout_s,
            "deadline": record.deadline,
            "remaining_s": round(remaining, 1) if remaining is not None else None,
            "remaining_from": remaining_from,
            "guard_pid": record.guard_pid if open_ else None,
            "guard_alive": alive if open_ else None,
            "guard_stopped": (process_state(record.guard_pid) in ("T", "t")
                              if open_ and alive and record.guard_pid else None),
            "taken_over": taken_over if open_ else None,
            "unsaved": unsaved,
            "hatch": record.hatch,
            "lock_holder": xtables_lock_holder(record),
            "guard_mode": record.guard_mode,
            "shielded": record.shielded,
            "shield_error": record.shield_error,
            **{name: getattr(record, name) for name in STATUS_AS_RECORDED},
            "events": [{"t": e.t, "event": e.event, "detail": e.detail} for e in record.events],
            "log": str(self.state.tx_dir(record.id) / "guard.log"),
        }

    def _ask_guard(self, record: Record, remaining: float | None, source: str | None
                   ) -> tuple[Record, float | None, str | None, bool]:
        """The living guard's own view: its record, and the time left as it counts it
        (CLOCK_BOOTTIME: suspend counts, wall-clock steps do not). Falls back to the record on
        disk when the guard does not answer at once (busy reverting, or not ours to ask)."""
        try:
            answer = spawn.request(self.state, "status", timeout=2.0)
            live = Record.from_json(dict(answer["record"]))
        except (GuardError, StateError, KeyError, TypeError, ValueError):
            return record, remaining, source, False
        left = answer.get("remaining_s")
        unsaved = answer.get("unsaved") is True
        if live.id != record.id:
            return record, remaining, source, False
        if isinstance(left, (int, float)) and not isinstance(left, bool) and math.isfinite(left):
            return live, max(0.0, float(left)), "guard", unsaved
        return (live, live.remaining_s(), "record" if live.remaining_s() is not None else None,
                unsaved)


def xtables_lock_holder(record: Record) -> str | None:
    """When a revert of iptables-legacy's tables waits for the xtables lock: who holds it
    (PID and command, from /proc/locks), so that `status` can name it."""
    legacy = any(name.endswith("-legacy") for name in record.touched)
    if record.state != transaction.REVERTING or not legacy:
        return None
    try:
        inode = os.stat("/run/xtables.lock").st_ino
        with open("/proc/locks") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 5 and fields[5].endswith(f":{inode}"):
                    pid = fields[4]
                    with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                        command = cmd.read().replace(b"\0", b" ").decode(errors="replace")
                    if "tables-legacy-restore" in command.split(" ", 1)[0]:
                        return None   # the revert's own tool at work
                    return f"PID {pid} ({command.strip()[:80]})"
    except (OSError, ValueError):
        return None
    return None


def confirm_without_guard(manager: Manager, tx_id: str, who: dict[str, str], how: str) -> Record:
    """Confirm a transaction whose guard is gone (the caller holds the state lock and has
    claimed the transaction)."""
    if manager.on_confirmed is None:
        raise TypeError("Manager(on_confirmed=...) is needed to confirm without the guard "
                        "(fwsafe.steps.on_confirmed)")
    record = transaction.load_record(manager.state, tx_id)
    if record.state == transaction.CONFIRMED:
        return record
    if record.state != transaction.PENDING:
        manager.settled_or_live(record, "confirm")
    record.confirmed_by = {**who, "how": how + " (guard was gone)"}
    record.reason = record.confirmed_by["how"]
    record.transition(transaction.CONFIRMED, record.reason)
    transaction.save_record(manager.state, record)
    hatch.removed(record)
    # keep the state as known good and write the boot files; the confirm stands
    manager.on_confirmed(manager.state, record)
    transaction.save_record(manager.state, record)
    return record


def hatch_left(state: StateDir, record: Record) -> Record:
    """A confirmed transaction whose guard died before removing its hatch: remove it. A guard
    that failed while answering may still be on its way out: it is given HATCH_WAIT_S to remove
    the hatch or to exit (a stopped one is left to its backstop)."""
    end = time.monotonic() + HATCH_WAIT_S
    while hatch.may_be_loaded(record.hatch) and transaction.guard_alive(record):
        if guard_stopped(record) or time.monotonic() > end:
            return record
        time.sleep(0.05)
        record = transaction.load_record(state, record.id)
    if not hatch.may_be_loaded(record.hatch):
        return record
    # the claim gets its own moment: the guard may have taken most of the wait to die
    return remove_left_hatch(state, record, until=max(end, time.monotonic() + 2.0))
