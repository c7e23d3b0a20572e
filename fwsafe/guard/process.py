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
  a session deletes can stop the revert;
* it applies the change itself, after it is armed, so that a deadline can never pass between
  arming and applying;
* at the deadline, on ``fwsafe revert``, on SIGTERM or when a probe fails N times in a row it
  restores the snapshot, retrying while processes cannot be started for lack of memory, then
  checks that the touched layers equal the snapshot again;
* it runs in the network namespace of the CLI that started it.

Requests (``fwsafe confirm``, ``revert``, ``extend``, ``status``) arrive as one JSON line on a
Unix socket in the state directory; the guard answers with one JSON line.

This module is imported by the guard process alone: it keeps its imports small (RSS).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fwsafe.core import snapshot, transaction
from fwsafe.core.revert import RevertResult, revert_change
from fwsafe.core.statedir import StateDir, open_private
from fwsafe.core.transaction import Record
from fwsafe.guard.applying import capture_after, run_change
from fwsafe.guard.backstop import BackstopKeeper
from fwsafe.guard.clock import Deadline, max_seconds, seconds_problem
from fwsafe.guard.probing import ProbeWatch
from fwsafe.guard.requests import listen, serve_one
from fwsafe.guard.spawn import systemd_is_init, wait_for_go

OOM_SHIELD = -1000


SHUTDOWN_TARGETS = ("shutdown.target", "reboot.target", "poweroff.target", "halt.target",
                    "kexec.target", "final.target")


def _systemctl(*args: str) -> str:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def system_stopping() -> bool:
    """True while systemd is shutting the machine down (or rebooting it): the manager says
    `stopping`, or a shutdown target is queued or starting."""
    if not systemd_is_init():
        return False
    if _systemctl("is-system-running").strip() == "stopping":
        return True
    jobs = _systemctl("list-jobs", "--no-legend", "--no-pager")
    return any(target in jobs for target in SHUTDOWN_TARGETS)


def set_oom_shield(value: int = OOM_SHIELD) -> tuple[bool, str | None]:
    """Lower our oom_score_adj; children inherit it. Returns (shielded, why not)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(value))
    except OSError as exc:
        return False, f"cannot set oom_score_adj to {value}: {exc.strerror} (needs CAP_SYS_RESOURCE)"
    try:
        current = int(Path("/proc/self/oom_score_adj").read_text().strip())
    except (OSError, ValueError) as exc:
        return False, f"cannot read oom_score_adj back: {exc}"
    if current != value:
        return False, f"oom_score_adj is {current}, not {value}"
    return True, None


class Guard:
    """One transaction's guard: arm, apply, wait for a confirmation, revert."""

    def __init__(self, state: StateDir, record: Record, mode: str, log: TextIO) -> None:
        self.state = state
        self.record = record
        self.mode = mode
        self.logfile = log
        # Everything needed to revert is read into memory before anything is changed.
        self.before = snapshot.load(state, record.id, snapshot.BEFORE, record.captured)
        self.change = snapshot.load(state, record.id, snapshot.CHANGE, record.layers)
        self.after: dict[str, bytes] | None = None   # captured right after the change
        self.deadline = Deadline(record)
        self.backstop = BackstopKeeper(state, record, mode, self.log)
        self.applied = False
        self.done = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.terminate = False
        self.server: socket.socket | None = None
        self.probes: ProbeWatch | None = None

    # -- bookkeeping ------------------------------------------------------------------------
    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.logfile.write(f"{stamp} [{os.getpid()}] {message}\n")
            self.logfile.flush()
        except (OSError, ValueError):
            pass

    def save(self) -> None:
        """Write the record; keep going when the disk refuses (the revert matters more)."""
        for attempt in range(5):
            try:
                transaction.save_record(self.state, self.record)
                return
            except (OSError, MemoryError) as exc:
                self.log(f"cannot write the record (attempt {attempt + 1}): {exc}")
                time.sleep(0.1)

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
        what = " ".join(self.record.run) if self.record.run else ", ".join(self.record.layers)
        self.log(f"armed; applying {what}")
        self.applied = True
        error = run_change(self.state, self.record, self.change)
        if error is not None:
            self._refused(error)
            return False
        self.deadline.set(time.time() + self.record.timeout_s)
        self.record.transition(
            transaction.PENDING, f"applied; deadline in {self.record.timeout_s:g} s")
        self.save()  # the CLI returns now; what the change touched is worked out meanwhile
        self.log(f"applied; reverting at {time.ctime(self.record.deadline)} unless confirmed")
        self.after = capture_after(self.state, self.record, self.before, self.log)
        self.save()
        if self.record.probes:
            self.probes = ProbeWatch(self.record, self.wake_w, self.log)
            self.probes.start()
        return True

    def _refused(self, error: str) -> None:
        """The tool refused the change: undo whatever part of it is live; `rejected`."""
        self.after = capture_after(self.state, self.record, self.before, self.log)
        self.log(f"change refused: {error}")
        self.record.error = error
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
        if self.done:
            return
        self.done = True
        if self.probes:
            self.probes.stop()
        self.log(f"reverting: {reason}")
        self.record.reason = reason
        self.record.transition(transaction.REVERTING, reason)
        self.save()
        result = self._undo()
        self.record.transition(transaction.REVERTED, "; ".join(
            ["the change undone and verified", *result.notes]))
        self.log("reverted; the change's own delta is undone and verified"
                 + (f" after {result.attempts} attempts" if result.attempts > 1 else ""))
        self.save()

    def _undo(self) -> RevertResult:
        """Undo what the change touched; retry for as long as it takes (the change may be
        live: there is no giving up), saving each attempt in the record for `status`."""
        def attempt(number: int, why: str) -> None:
            self.record.revert_attempts = number
            self.record.revert_last_error = why
            self.save()

        result = revert_change(self.record.touched, self.before, self.after, log=self.log,
                               on_attempt=attempt, after_stamp=self.record.after_stamp)
        self.record.reverted_by = "guard"
        self.record.revert_attempts = result.attempts
        self.record.revert_last_error = None
        self.record.revert_notes = result.notes
        return result

    def confirm(self, by: dict[str, str]) -> None:
        self.done = True
        if self.probes:
            self.probes.stop()
        self.record.confirmed_by = by
        detail = by.get("how", "confirmed")
        self.record.reason = detail
        self.record.transition(transaction.CONFIRMED, detail)
        self.save()
        self.log(f"confirmed: {detail}")
        try:  # keep the state as known good and write the boot files; the confirm stands
            from fwsafe.persistence.history import on_confirmed

            on_confirmed(self.state, self.record)
            self.log(self.record.events[-1].detail)
        except Exception as exc:  # noqa: BLE001 - visible in the log and the record
            self.log(f"history/persist FAILED: {exc}")
            self.record.log("persist-failed", str(exc))
            self.save()

    # -- requests -----------------------------------------------------------------------------
    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "status":
            left = self.deadline.remaining() if self.record.state == transaction.PENDING else None
            return {"ok": True, "record": self.record.to_json(),
                    "remaining_s": round(left, 1) if left is not None else None,
                    "clock": "boottime"}
        if self.record.state != transaction.PENDING:
            return {"ok": False, "state": self.record.state,
                    "error": f"transaction is {self.record.state}"}
        if op == "confirm":
            by = message.get("by") or {}
            self.confirm({str(k): str(v) for k, v in dict(by).items()})
            return {"ok": True, "state": self.record.state}
        if op == "revert":
            self.revert(str(message.get("reason") or "reverted on request"))
            return {"ok": self.record.state == transaction.REVERTED, "state": self.record.state,
                    "error": self.record.error}
        if op == "extend":
            seconds = message.get("seconds")
            problem = seconds_problem(seconds, max_seconds(self.record))
            if problem is not None:  # the CLI checks too; this is the second line of defence
                return {"ok": False, "state": self.record.state, "error": problem}
            assert isinstance(seconds, (int, float))
            self.deadline.extend(float(seconds))
            self.record.log("extended", f"+{seconds:g} s by {message.get('by', '?')}")
            self.save()
            self.log(f"deadline extended by {seconds:g} s")
            return {"ok": True, "state": self.record.state, "deadline": self.record.deadline}
        return {"ok": False, "state": self.record.state, "error": f"unknown request {op!r}"}

    def wait(self) -> None:
        assert self.server is not None
        while not self.done:
            if self.terminate:
                self.revert(
                    "reboot or shutdown: systemd stopped the guard while the change was pending; "
                    "it was undone before the machine went down" if system_stopping() else
                    "the guard was terminated (SIGTERM) before confirmation")
                break
            left = self.deadline.left()
            if left <= 0:
                self.revert(
                    f"timeout: not confirmed within {self.record.timeout_s:g} s"
                    + (" (deadline extended)" if any(e.event == "extended"
                                                     for e in self.record.events) else ""))
                break
            if self.backstop.missing:
                self.backstop.start()  # it could not be started before: try again
            watched: list[Any] = [self.server, self.wake_r]
            if self.backstop.fd is not None:
                watched.append(self.backstop.fd)
            try:
                readable, _, _ = select.select(watched, [], [], min(left, 1.0))
            except InterruptedError:
                continue
            self._dispatch(readable)

    def _dispatch(self, readable: list[Any]) -> None:
        if self.backstop.fd is not None and self.backstop.fd in readable:
            self.backstop.died(restart=not self.done)
            self.save()
        if self.wake_r in readable:
            try:
                os.read(self.wake_r, 4096)
            except BlockingIOError:
                pass
            verdict = self.probes.verdict() if self.probes and not self.done else None
            if verdict and verdict[0] == "revert":
                self.revert(verdict[1])
            elif verdict:
                self.confirm({"how": verdict[1]})
        if self.server in readable and not self.done:
            assert self.server is not None
            try:
                conn, _ = self.server.accept()
            except BlockingIOError:
                return
            serve_one(conn, self.handle, self.log)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                self.state.socket_path.unlink()
            except FileNotFoundError:
                pass


def _detach_signals() -> None:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE,
                signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    standing_by = args[3:] == ["--standby"]
    if standing_by:
        args = args[:3]
    if len(args) != 3 or args[0] not in ("--daemonize", "--foreground"):
        print("usage: python -m fwsafe.guard --daemonize|--foreground STATE_DIR TX_ID "
              "[--standby]", file=sys.stderr)
        return 2
    how, state_dir, tx_id = args
    _detach_signals()
    state = StateDir(Path(state_dir))
    # Started while the CLI still checks the change: nothing happens before it says go.
    if standing_by and not wait_for_go(state.tx_dir(tx_id)):
        print(f"transaction {tx_id}: the change was called off before the guard was needed; "
              "nothing to guard", flush=True)
        return 0
    # Second fork: the session leader exits, the guard can never regain a terminal.
    if how == "--daemonize" and os.fork() > 0:
        os._exit(0)
    mode = "setsid" if how == "--daemonize" else "systemd-run"
    log_fd = open_private(state.tx_dir(tx_id) / "guard.log", os.O_WRONLY | os.O_APPEND)
    log = os.fdopen(log_fd, "a")  # held for the guard's lifetime
    guard: Guard | None = None
    try:
        # Under the transaction's lock, which the CLI also holds when it gives up and marks
        # the transaction aborted: a guard that starts late sees `aborted` and applies nothing,
        # and the CLI never aborts a transaction this guard has begun to apply.
        with state.tx_locked(tx_id):
            record = transaction.load_record(state, tx_id)
            if record.state != transaction.PREPARING:
                log.write(f"transaction {tx_id} is {record.state}, not preparing: "
                          "nothing to guard\n")
                return 1
            problem = seconds_problem(record.timeout_s, max_seconds(record))
            if problem is not None:  # the CLI checks too; this is the second line of defence
                record.reason = f"the guard refused the timeout: {problem}; nothing was changed"
                record.transition(transaction.ABORTED, record.reason)
                transaction.save_record(state, record)
                log.write(record.reason + "\n")
                return 1
            config = record.options.get("config")
            if isinstance(config, str) and config:
                os.environ["FWSAFE_CONFIG"] = config  # the CLI's config, read again on confirm
            guard = Guard(state, record, mode, log)
            guard.arm()
            guard.begin()
        if guard.apply():
            guard.wait()
    except BaseException as exc:  # the revert must happen whatever went wrong
        if guard is None:
            log.write(f"guard error before arming: {exc!r}\n")
            raise
        guard.log(f"guard error: {exc!r}")
        if guard.applied and not guard.done and guard.record.state in (
                transaction.APPLYING, transaction.PENDING):
            guard.revert(f"the guard hit an internal error: {exc!r}")
        raise
    finally:
        if guard is not None:
            guard.backstop.stop()
            guard.close()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
