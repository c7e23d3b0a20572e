"""The guard: the dead-man's switch that reverts a change unless it is confirmed.

It is a process of its own, started before the change is applied, that outlives the CLI and
the SSH session that started it:

* where systemd is PID 1 it runs as a transient unit (``systemd-run``), so that logind's
  KillUserProcesses cannot end it with the session; elsewhere it is a double-forked ``setsid``
  daemon with no controlling terminal;
* it ignores SIGHUP, SIGINT, SIGQUIT and SIGPIPE; SIGTERM makes it revert at once;
* it sets its own ``oom_score_adj`` to -1000, which the restore commands it runs inherit;
  where that is refused (no CAP_SYS_RESOURCE) it carries on and records that it is not shielded;
* it reads the snapshot and the change into memory before it applies anything, so that nothing
  a session deletes can stop the revert (held compressed: fwsafe.core.packed);
* it applies the change itself, after it is armed, so that a deadline can never pass between
  arming and applying;
* at the deadline, on ``fwsafe revert``, on SIGTERM or when a probe fails N times in a row it
  restores the snapshot, retrying while processes cannot be started for lack of memory, then
  checks that the touched layers equal the snapshot again;
* it runs in the network namespace of the CLI that started it.

Requests (``fwsafe confirm``, ``revert``, ``extend``, ``status``) arrive as one JSON line on a
Unix socket in the state directory; the guard answers with one JSON line. Its loop and those
answers are fwsafe.guard.guard_loop; what it asks of the host (a shutdown under way, the OOM
shield) fwsafe.guard.host_facts.

This module is imported by the guard process alone: it keeps its imports small (RSS).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fwsafe import failpoints
from fwsafe.backends import nflist
from fwsafe.check.proof import PROVER
from fwsafe.core import snapshot, transaction
from fwsafe.core.packed import Packed
from fwsafe.core.revert import (
    RevertResult,
    finished_revert,
    record_revert,
    recording_attempts,
    revert_change,
)
from fwsafe.core.statedir import StateDir, open_private
from fwsafe.core.transaction import Record
from fwsafe.guard import hatch
from fwsafe.guard.applying import AfterChange, change_stamp, hatch_only, run_change
from fwsafe.guard.backstop_keeper import BackstopKeeper
from fwsafe.guard.backstop_tools import quiet_std, stuck_grace, write_line
from fwsafe.guard.clock import Deadline, boottime, max_seconds, seconds_problem
from fwsafe.guard.guard_loop import Loop, Requests
from fwsafe.guard.host_facts import KEEPS_FREED, give_back_freed_memory, set_oom_shield
from fwsafe.guard.probing import ProbeWatch
from fwsafe.guard.requests import listen
from fwsafe.guard.spawn import tell_saved, wait_for_go
from fwsafe.tool_stack import raise_for_tools

LIMIT_APPLY_SLACK_S = 60.0   # systemd's first limit allows this long for the apply itself


class Guard:
    """One transaction's guard: arm, apply, wait for a confirmation, revert; then remove the
    hatch and make sure the record is written. Its loop (`run`) never ends while the
    transaction is open: every exception is logged and the step tried again with backoff."""

    def __init__(self, state: StateDir, record: Record, mode: str, log: TextIO | None) -> None:
        self.state = state
        self.record = record
        self.mode = mode
        self.logfile = log
        # Everything needed to revert is read into memory before anything is changed, held
        # compressed (fwsafe.core.packed: the waiting guard's RSS).
        self.before = Packed(snapshot.load(state, record.id, snapshot.BEFORE, record.captured))
        self.change = Packed(snapshot.load(state, record.id, snapshot.CHANGE, record.layers))
        self.wake_r, self.wake_w = os.pipe()
        self.after = AfterChange(state, record, self.before, self.log, self.wake_w)
        self.undo_began = False       # a revert was begun (an error may have cut it short)
        self.deadline = Deadline(record)
        self.backstop = BackstopKeeper(state, record, mode, self.log)
        self.hatch = hatch.Keeper(record, self.log)
        self.applied = False          # the change may be live
        self.done = False             # decided: confirmed, or reverting
        self.revert_reason: str | None = None   # a revert to do (again, after an error)
        self.unsaved = False          # the record in memory is newer than on disk
        self.quit = False             # taken over by someone else: leave it alone
        os.set_blocking(self.wake_w, False)
        self.terminate = False
        self.server: socket.socket | None = None
        self.probes: ProbeWatch | None = None
        self.loop = Loop(self)

    # -- bookkeeping ------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """The log: the guard's log file, best effort (and the journal under systemd); never
        raises. Each line is also a heartbeat for the backstop."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}"
        if self.mode == "systemd-run" or self.logfile is None:
            write_line(line)
        if self.logfile is not None:
            try:
                self.logfile.write(line + "\n")
                self.logfile.flush()
            except (OSError, ValueError):
                pass
        if hasattr(self, "backstop"):
            self.backstop.beat()

    def save(self) -> bool:
        """Write the record; when the disk refuses (ENOSPC, EIO, read-only) keep it in memory,
        answer `status` from it, and write it once the disk takes it (`run` tries again)."""
        try:
            transaction.save_record(self.state, self.record)
        except Exception as exc:  # noqa: BLE001 - the revert matters more than the record
            if not self.unsaved:
                self.log(f"cannot write the record ({exc}); kept in memory and written once "
                         "the disk takes it (`fwsafe status` asks the guard meanwhile)")
            self.unsaved = True
            return False
        if self.unsaved:
            self.log("the record is written")
        self.unsaved = False
        tell_saved(self.state.tx_dir(self.record.id))   # the CLI waiting for it reads it now
        return True

    # -- life cycle -------------------------------------------------------------------------
    def arm(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.set_wakeup_fd(self.wake_w)
        shielded, why = set_oom_shield()
        self.record.shielded = shielded
        self.record.shield_error = why
        self.record.guard_pid = os.getpid()
        self.record.guard_mode = self.mode
        self.log("oom_score_adj set to -1000: shielded from the OOM killer" if shielded else
                 f"NOT shielded from the OOM killer: {why}")
        self.server = listen(self.state.socket_path)

    def _on_term(self, signum: int, frame: object) -> None:
        self.terminate = True

    def begin(self) -> None:
        """preparing -> applying, written before anything changes (`main` holds the
        transaction's lock meanwhile). Raises when it cannot be written: nothing is applied."""
        self.record.transition(transaction.APPLYING, f"guard {os.getpid()} armed ({self.mode})")
        transaction.save_record(self.state, self.record)

    def apply(self) -> bool:
        if self.record.state == transaction.PREPARING:
            self.begin()
        self.backstop.start()
        self.save()
        failpoints.hit("guard.applying")
        what = " ".join(self.record.run) if self.record.run else ", ".join(self.record.layers)
        self.log(f"armed; applying {what}")
        timeout = self.record.timeout_s
        spec = self.hatch.arm(time.time() + timeout)
        self.backstop.deadline(boottime() + timeout)   # until the real one is known
        # systemd's limit, there before the change goes live (moved once the deadline is known)
        self.backstop.set_limit(timeout + self.limit_margin() + LIMIT_APPLY_SLACK_S)
        if self.record.run and spec is not None:   # a command makes its own transactions
            self.hatch.load(self.record.watch)
        self.applied = True
        stamp = nflist.ruleset_stamp()
        error = run_change(self.state, self.record, self.change, spec, self.before, self.log)
        failpoints.hit("guard.applied")
        if error is not None:
            self._refused(error)
            return False
        self.record.change_stamp = change_stamp(self.record, self.change, stamp)
        self.deadline.set(time.time() + timeout)
        self.backstop.deadline(self.deadline.at_boot)
        self.backstop.set_limit(self.deadline.left() + self.limit_margin())   # before pending
        self.record.transition(transaction.PENDING, f"applied; deadline in {timeout:g} s")
        self.save()  # the CLI returns now; what the change touched is worked out meanwhile
        failpoints.hit("guard.pending")
        self.log(f"applied; reverting at {time.ctime(self.record.deadline)} unless confirmed")
        if not self.after.start():   # (in a thread when a revert needs none of it)
            self.after_capture()
        if self.record.probes:
            self.probes = ProbeWatch(self.record, self.wake_w, self.log)
            self.probes.start()
        failpoints.hit("guard.waiting")
        return True

    def after_capture(self) -> None:
        """The hatch moved to the deadline now known; stamps moved past its commits; saved."""
        self.hatch.retime(self.deadline.wall())
        commits = self.hatch.load(self.record.watch)
        self.record.after_stamp = hatch_only(self.record.after_stamp, commits)
        self.record.change_stamp = hatch_only(self.record.change_stamp, commits)
        self.save()

    def limit_margin(self) -> float:
        """systemd's own limit comes this long after the deadline: after the backstop's
        (stuck_grace) and after the hatch opened (hatch_grace)."""
        grace = stuck_grace(self.record)
        plan = self.hatch.plan
        return grace + (float(plan.get("grace", 30)) if plan else grace)

    def _refused(self, error: str) -> None:
        """The tool refused the change: undo whatever part of it is live; `rejected`."""
        self.after.now()
        self.log(f"change refused: {error}")
        self.record.error = error
        self.done = True
        self.hatch.removing = self.hatch.spec is not None
        if not self.record.touched:
            self.record.reason = "the change was refused; nothing was changed"
            self.record.transition(transaction.REJECTED, error)
            self.save()
            return
        # Part of it may be live: undo that as any revert, never giving up.
        self.record.transition(transaction.REVERTING, "the change failed part-way")
        self.save()
        result = self._undo()
        self.record.reason = ("the change was refused part-way; what had been applied is "
                              "undone and verified, so nothing is changed")
        self.record.transition(transaction.REJECTED, "; ".join([error, *result.notes]))
        self.save()

    def revert(self, reason: str) -> None:
        """Revert (again, when a previous attempt was cut short by an error)."""
        self.revert_reason = reason
        self.done = True
        if self.record.state in (transaction.APPLYING, transaction.PENDING):
            if self.probes:
                self.probes.stop()
            self.log(f"reverting: {reason}")
            self.record.reason = reason
            self.record.transition(transaction.REVERTING, reason)
            self.save()
            failpoints.hit("guard.reverting")
        if self.record.state != transaction.REVERTING:
            self.revert_reason = None
            return
        result = self._undo()
        failpoints.hit("guard.reverted")
        self.record.transition(transaction.REVERTED, result.summary("guard"))
        self.hatch.removing = self.hatch.spec is not None   # whatever happens next
        self.revert_reason = None
        self.log(f"reverted: {result.summary('guard')}"
                 + (f" after {result.attempts} attempts" if result.attempts > 1 else ""))
        # the states the revert proved, with the tables it replaced whole: not read again
        replaced = {name: frozenset(unit.partition("/")[0] for unit in units)
                    for name, units in self.record.touched.items()}
        self.hatch.remove({name: (generation, state, replaced.get(name, frozenset()))
                           for name, (generation, state) in result.known.items()})
        self.save()

    def _undo(self) -> RevertResult:
        """Undo what the change touched; retry for as long as it takes (the change may be
        live: there is no giving up), saving each attempt in the record for `status`."""
        quiet = self.after.skip(self.change)   # (a revert from the snapshot reads nothing)
        self.after.now()   # an error may have come between the change and its capture
        access = PROVER.access(self.record)
        # A later attempt may find the change undone by one that died before it could say so.
        result = (finished_revert(self.record.touched, self.before, access, self.log)
                  if self.undo_began else None)
        self.undo_began = True
        if result is None:
            result = revert_change(self.record.touched, self.before, self.after.after,
                                   log=self.log,
                                   on_attempt=recording_attempts(self.record, self.save),
                                   after_stamp=self.record.after_stamp, sleep=self.pause,
                                   access=access, warm=PROVER.warm, unchanged_since=quiet)
        record_revert(self.record, result, "guard")
        return result

    def confirm(self, by: dict[str, str]) -> None:
        failpoints.hit("guard.confirming")
        self.after.now()   # what it touched, kept for the history (still being read: waited)
        self.done = True
        if self.probes:
            self.probes.stop()
        self.record.confirmed_by, detail = by, by.get("how", "confirmed")
        self.record.reason = detail
        self.record.transition(transaction.CONFIRMED, detail)
        self.hatch.removing = self.hatch.spec is not None   # whatever happens next
        self.save()
        self.log(f"confirmed: {detail}")
        failpoints.hit("guard.confirmed")
        self.hatch.remove()   # before the boot files are written (they never hold it anyway)
        # keep the state as known good and write the boot files; the confirm stands
        from fwsafe.persistence.known_good import keep_confirmed

        self.log(keep_confirmed(self.state, self.record))
        self.save()

    def pause(self, seconds: float) -> None:
        self.loop.pause(seconds)

    def run(self) -> None:
        self.loop.run()

    def on_error(self, exc: BaseException) -> None:
        self.loop.on_error(exc)

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        return Requests(self).handle(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.backstop.stop()
        if self.server is not None:
            self.server.close()
            try:
                self.state.socket_path.unlink()
            except OSError:
                pass


def _detach_signals() -> None:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE,
                signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)


def _open_log(state: StateDir, tx_id: str) -> TextIO | None:
    """The guard's log file, or None when the disk cannot give one (then stderr only)."""
    try:
        fd = open_private(state.tx_dir(tx_id) / "guard.log", os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        write_line(f"guard: cannot open its log file ({exc}); logging to stderr only")
        return None
    return os.fdopen(fd, "a")


def main(argv: Sequence[str] | None = None) -> int:
    raise_for_tools()   # started by systemd-run: its own limit (fwsafe.tool_stack)
    gives_back = give_back_freed_memory()   # before it reads any ruleset: its RSS waiting
    args = list(sys.argv[1:] if argv is None else argv)
    standing_by = args[3:] == ["--standby"]
    if standing_by:
        args = args[:3]
    if len(args) != 3 or args[0] not in ("--daemonize", "--foreground"):
        write_line("usage: python -m fwsafe.guard --daemonize|--foreground STATE_DIR TX_ID "
                   "[--standby]")
        return 2
    how, state_dir, tx_id = args
    _detach_signals()
    state = StateDir(Path(state_dir))
    # Started while the CLI still checks the change: nothing happens before it says go.
    if standing_by and not wait_for_go(state.tx_dir(tx_id)):
        with contextlib.suppress(OSError, ValueError):
            print(f"transaction {tx_id}: the change was called off before the guard was "
                  "needed; nothing to guard", flush=True)
        _abort_called_off(state, tx_id)
        return 0
    # Second fork: the session leader exits, the guard can never regain a terminal.
    if how == "--daemonize" and os.fork() > 0:
        os._exit(0)
    mode = "setsid" if how == "--daemonize" else "systemd-run"
    log = _open_log(state, tx_id)
    try:
        return _guard(state, tx_id, mode, log, gives_back)
    finally:
        if log is not None:
            with contextlib.suppress(OSError, ValueError):
                log.close()


def _abort_called_off(state: StateDir, tx_id: str) -> None:
    """The CLI that prepared the transaction is gone without saying go (killed): its record,
    if it wrote one, says aborted (nothing was applied), not preparing with nobody on it."""
    try:
        with state.tx_locked(tx_id, timeout=1.0):
            record = transaction.load_record(state, tx_id)
            if record.state == transaction.PREPARING:
                why = ("the command that prepared it stopped before the guard armed: nothing "
                       "was applied")
                record.reason = why
                record.transition(transaction.ABORTED, why)
                transaction.save_record(state, record)
    except Exception:  # noqa: BLE001 - no record (called off before it), a failing disk:
        pass           # the next command or apply sees a preparing record without a guard


def _note(log: TextIO | None, text: str) -> None:
    if log is None:
        write_line(text)
        return
    with contextlib.suppress(OSError, ValueError):
        log.write(text + "\n")
        log.flush()


def _guard(state: StateDir, tx_id: str, mode: str, log: TextIO | None,
           gives_back: bool = False) -> int:
    with contextlib.ExitStack() as held:
        try:
            # The transaction's lock, held for the guard's whole life: the CLI takes it to
            # mark the transaction aborted (a guard that starts late sees `aborted` and applies
            # nothing), and whoever takes over (backstop, recover) claims it once the guard
            # is gone.
            held.enter_context(state.tx_locked(tx_id))
            record = transaction.load_record(state, tx_id)
            if record.state != transaction.PREPARING:
                _note(log, f"transaction {tx_id} is {record.state}, not preparing: "
                      "nothing to guard")
                return 1
            problem = seconds_problem(record.timeout_s, max_seconds(record))
            if problem is not None:  # the CLI checks too; this is the second line of defence
                record.reason = f"the guard refused the timeout: {problem}; nothing was changed"
                record.transition(transaction.ABORTED, record.reason)
                transaction.save_record(state, record)
                _note(log, record.reason)
                return 1
            config = record.options.get("config")
            if isinstance(config, str) and config:
                os.environ["FWSAFE_CONFIG"] = config  # the CLI's config, read again on confirm
            guard = Guard(state, record, mode, log)
            guard.arm()
            if not gives_back:
                guard.log(KEEPS_FREED)
            guard.begin()
        except BaseException as exc:  # nothing was applied
            _note(log, f"guard error before arming: {exc!r}")
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return 1
        quiet_std()
        try:
            failpoints.hit("guard.armed")
            guard.apply()
        except BaseException as exc:  # noqa: BLE001 - the revert must happen whatever went wrong
            guard.log(f"guard error: {exc!r}")
            guard.on_error(exc)
        guard.run()
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
