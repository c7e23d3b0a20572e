"""The backstop's take-over: the guard is gone (dead, killed stuck, its unit stopped, or
systemd's limit reached), so its open transaction is claimed and reverted from disk, never
given up while open; a record the disk refuses is kept in memory and answered from there
(`Unsaved`). Also the late take-over (`--take-over`, `--converge`) and systemd's limit
(`--limit`).

Run in the backstop process: it keeps its imports small.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from fwsafe import failpoints
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir
from fwsafe.guard.backstop_tools import (
    BACKOFF_MAX,
    KILL_WAIT_S,
    log,
    run_tool,
    unit_name,
)
from fwsafe.guard.clock import boottime


def unsaved_address(state: StateDir, tx_id: str) -> bytes:
    """The abstract Unix socket (no file: nothing on a full disk) on which a take-over that
    cannot write the record answers it from memory."""
    key = f"{os.path.realpath(state.root)}\0{tx_id}".encode()
    return b"\0fwsafe-unsaved-" + hashlib.sha256(key).hexdigest()[:32].encode()


def ask_unsaved(state: StateDir, tx_id: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The record a take-over keeps in memory because the disk refuses it, or None (nobody
    does: the record on disk is the truth)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(unsaved_address(state, tx_id))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        answer = json.loads(data)
    except (OSError, ValueError):
        return None
    record = answer.get("record") if isinstance(answer, dict) else None
    return record if isinstance(record, dict) else None


class Unsaved:
    """The record as last meant to be written, when the disk refused it (kept in memory,
    written again until it works, and answered meanwhile on `unsaved_address` to root, so
    that `status` and `confirm` tell the truth at once)."""

    def __init__(self) -> None:
        self.record: transaction.Record | None = None
        self.said = False
        self.server: socket.socket | None = None

    def save(self, state: StateDir, record: transaction.Record) -> None:
        try:
            transaction.save_record(state, record)
            self.record = None
        except Exception as exc:  # noqa: BLE001 - ENOSPC, EIO, read-only, no temp file
            self.record = record
            self._serve(state, record.id)
            if not self.said:
                self.said = True
                log(f"cannot write the record ({exc}); it is kept in memory and written once "
                     "the disk takes it")

    def _serve(self, state: StateDir, tx_id: str) -> None:
        if self.server is not None:
            return
        try:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(unsaved_address(state, tx_id))
            server.listen(8)
        except OSError as exc:   # another take-over answers already; or no sockets at all
            log(f"cannot answer the record from memory: {exc}")
            return
        self.server = server
        threading.Thread(target=self._answer, args=(server,), daemon=True).start()

    def _answer(self, server: socket.socket) -> None:
        own = os.geteuid()
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(2.0)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
                record = self.record
                if uid in (0, own) and record is not None:
                    conn.sendall(json.dumps({"ok": True, "record": record.to_json()}).encode())

    def flush(self, state: StateDir) -> None:
        """Write the record kept in memory until the disk takes it."""
        delay = 0.2
        while self.record is not None:
            self.save(state, self.record)
            if self.record is None:
                log("the record is written")
                return
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)


def take_over(state: StateDir, tx_id: str, why: str, by: str = "backstop") -> int:
    """The guard is gone: undo the change if its transaction is still open. Never gives up
    while it is; exit status 0 once nothing is left to do."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.check.proof import PROVER
    from fwsafe.core.recover import recover
    from fwsafe.errors import FwsafeError, PendingError
    from fwsafe.guard.hatch import removed

    unsaved = Unsaved()
    delay = 0.1
    announced = False
    while True:
        try:
            if not transaction.record_path(state, tx_id).exists():
                # Its guard stood by and was never told to go (fwsafe.guard.spawn.Standby): the
                # record is written before that, so without one nothing was ever applied.
                log(f"transaction {tx_id} was called off before it was prepared: nothing to do")
                return 0
            record = transaction.load_record(state, tx_id)
            if not (record.state in transaction.OPEN_STATES
                    or record.state == transaction.PREPARING):
                if left_loaded(record):
                    remove_left_hatch(state, record, until=time.monotonic() + 5.0, wait=False,
                                      say=log)
                return 0   # confirmed, reverted or aborted: the guard finished its job
            if not announced:
                log(f"{why}; transaction {tx_id} is {record.state}: reverting it")
                announced = True
            failpoints.hit("backstop.taking-over")
            with state.tx_claimed(tx_id):   # held until the record is written
                done = recover(state, reason=f"{why}; the {by} reverted the change",
                               by=by, tx_id=tx_id, give_up_after=None,
                               save=unsaved.save, claimed=True, prover=PROVER,
                               remove_hatch=removed)
                unsaved.flush(state)
            log(f"transaction {tx_id} is {done.state}: {done.reason}")
            return 0
        except PendingError as exc:   # the guard still holds it, or another reverter does
            log(f"not yet: {exc.message}")
        except FwsafeError as exc:
            try:
                current = transaction.load_record(state, tx_id)
            except Exception:  # noqa: BLE001 - try again below
                current = None
            if current is not None and not (current.state in transaction.OPEN_STATES
                                            or current.state == transaction.PREPARING):
                log(f"nothing left to do ({exc.message})")
                return 0
            log(f"recover refused ({exc.message}); trying again")
        except BaseException as exc:  # noqa: BLE001 - the backstop must not die of anything
            log(f"recover failed ({type(exc).__name__}: {exc}); trying again")
        time.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def left_loaded(record: transaction.Record) -> bool:
    """Transaction `record` ended while its hatch may still be loaded (its guard died cleaning
    up): whoever sees it removes the hatch (`remove_left_hatch`). Not after a failed revert:
    the change may be live, and the hatch is the way in."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.guard import hatch

    return record.state in transaction.FINAL_STATES - {transaction.REVERT_FAILED} \
        and hatch.may_be_loaded(record.hatch)


def remove_left_hatch(state: StateDir, record: transaction.Record, *, until: float,
                      wait: bool = True,
                      say: Callable[[str], None] | None = None) -> transaction.Record:
    """Remove the hatch a transaction that ended left loaded (`left_loaded`; its guard gone),
    under the state lock (`wait`: wait for it) and the transaction's claim, proved by reading
    (fwsafe.guard.hatch.removed); the record says how it went. A guard seen gone holds its
    lock a moment longer (a dying process's files are closed after its memory is released),
    so a claim refused is tried again until the monotonic `until`. Only while the transaction
    is the current one: once another began, its apply removed what was left, and the hatch
    loaded now is the new transaction's. `say`: where to log (the backstop's log; a command
    says nothing). Returns the record as it stands (the hatch maybe still loaded: every fwsafe
    command and the next apply try again)."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.errors import PendingError
    from fwsafe.guard import hatch

    while True:
        try:
            with state.locked(wait=wait), state.tx_claimed(record.id):
                record = transaction.load_record(state, record.id)
                if not left_loaded(record) or transaction.guard_alive(record) \
                        or state.current_id() != record.id:
                    return record
                done = hatch.removed(record, say)
                if say is not None:
                    say(f"hatch left by transaction {record.id}: "
                        f"{'removed' if done else 'NOT removed'} {record.hatch}")
                try:
                    transaction.save_record(state, record)
                except Exception as exc:  # noqa: BLE001 - the kernel is what counts; the
                    if say is not None:   # next command writes it
                        say(f"the record is not written ({exc})")
                return record
        except PendingError:
            if time.monotonic() >= until:
                return record
            time.sleep(0.05)


def late(state: StateDir, tx_id: str | None) -> int:
    """``--take-over`` (started by a command that found the transaction orphaned: see
    fwsafe.guard.spawn.converge) and ``--converge`` (the login hook, systemd's limit timer):
    take over the transaction (`tx_id`, else the current one) if it is orphaned: open, past
    its deadline, its guard gone and nobody holding it; if it ended with its hatch left
    loaded, remove the hatch."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.core.recover import LATE_REASON, orphaned

    try:
        record = transaction.load_record(state, tx_id) if tx_id else \
            transaction.load_current(state)
    except Exception as exc:  # noqa: BLE001 - no state, a damaged record: nothing to do here
        log(f"nothing to take over ({exc})")
        return 0
    if record is None:
        return 0
    if left_loaded(record) and not (transaction.guard_alive(record)
                                    or state.tx_held(record.id)):
        try:
            remove_left_hatch(state, record, until=time.monotonic() + 5.0, wait=False, say=log)
        except Exception as exc:  # noqa: BLE001 - the next command tries again
            log(f"the hatch left by transaction {record.id} is not removed ({exc})")
        return 0
    if not orphaned(state, record):
        return 0
    return take_over(state, record.id, LATE_REASON, by="late take-over")


def limit(state: StateDir, tx_id: str) -> int:
    """``--limit``: systemd's own limit (a transient timer the guard set to the deadline +
    hatch_grace + stuck_grace; see BackstopKeeper.set_limit), a line of its own, independent
    of the guard's unit: kill the unit (its ExecStopPost= takes over), then see the
    transaction settle, and take it over if nobody does (ExecStopPost= killed as well)."""
    with contextlib.suppress(Exception):   # unreadable: kill, take_over decides
        if transaction.load_record(state, tx_id).state not in transaction.OPEN_STATES:
            return 0   # decided meanwhile (its guard stops the timer; a race left this)
    worked, said = run_tool(["systemctl", "kill", "--signal=SIGKILL", unit_name(tx_id)],
                            tries=1)
    log(f"systemd's limit: systemctl kill {unit_name(tx_id)}: {'done' if worked else said}")
    end = boottime() + KILL_WAIT_S
    while boottime() < end:
        try:
            record = transaction.load_record(state, tx_id)
        except Exception:  # noqa: BLE001 - gone or unreadable: take_over decides
            break
        if record.state not in transaction.OPEN_STATES or not transaction.guard_alive(record):
            break
        time.sleep(0.2)
    return take_over(state, tx_id, "systemd's limit (the deadline + hatch_grace + "
                                   "stuck_grace) killed the guard's unit")


