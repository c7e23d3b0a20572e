"""The backstop: a second, independent way back when the guard itself dies.

The guard is the dead-man's switch; the backstop is the switch's own dead-man's switch. While
a transaction is open, something other than the guard waits for the guard's death and, if the
transaction has not ended by then, undoes the change from the snapshots on disk (the same
merge-based revert as the guard's; it never gives up). The record then says
``reverted_by: backstop``.

* With systemd as PID 1 the guard is a transient unit, and systemd itself is the backstop: the
  unit carries ``ExecStopPost=<python> -m fwsafe.guard.backstop --after-stop STATE TX``, which systemd
  runs whenever the guard's main process is gone, whatever ended it (``systemctl kill``,
  systemd-oomd, a crash, SIGKILL); after a normal end it finds nothing open and exits 0.
* Elsewhere the guard starts a watcher in a session of its own (``--watch``). It holds a pidfd
  of the guard and wakes the moment the guard dies. The guard watches the watcher in turn and
  starts a new one if it dies.

This module is imported by the backstop process alone: it keeps its imports small.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, open_private

BACKSTOP_MODULE = "fwsafe.guard.backstop"
POLL_S = 1.0   # how often the watcher also looks at the record (ended by confirm/revert)


def watcher_argv(state_dir: Path, tx_id: str) -> list[str]:
    return [sys.executable, "-m", BACKSTOP_MODULE, "--watch", str(state_dir), tx_id]


def after_stop_command(state_dir: Path, tx_id: str) -> str:
    """The ExecStopPost= line of the guard's transient unit (systemd mode)."""
    return f"{sys.executable} -m {BACKSTOP_MODULE} --after-stop {state_dir} {tx_id}"


def start_watcher(state_dir: Path, tx_id: str, log_path: Path,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the watcher in a session of its own (setsid mode): it outlives the guard."""
    log = open_private(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        return subprocess.Popen(
            watcher_argv(state_dir, tx_id), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            cwd="/", start_new_session=True, close_fds=True, env=env)
    finally:
        os.close(log)


class BackstopKeeper:
    """The guard's side: start the backstop, notice when it dies, start another, stop it."""

    def __init__(self, state: StateDir, record: transaction.Record, mode: str,
                 log: Callable[[str], None]) -> None:
        self.state, self.record, self.mode, self.log = state, record, mode, log
        self.process: subprocess.Popen[bytes] | None = None   # setsid mode: the watcher
        self.fd: int | None = None                              # its pidfd

    @property
    def missing(self) -> bool:
        """A watcher should run but none does (it could not be started)."""
        return self.mode != "systemd-run" and self.process is None

    def start(self) -> None:
        if self.mode == "systemd-run":
            unit = f"fwsafe-guard-{self.record.id}.service"
            self.record.backstop = {"kind": "systemd", "unit": unit,
                                    "how": f"ExecStopPost= of {unit}, run by systemd"}
            return
        try:
            self.process = start_watcher(self.state.root, self.record.id,
                                         self.state.tx_dir(self.record.id) / "backstop.log")
        except OSError as exc:
            self.log(f"cannot start the backstop watcher: {exc}; trying again in 1 s")
            self.process, self.fd = None, None
            return
        self.fd = pidfd_of(self.process.pid)
        self.record.backstop = {"kind": "watcher", "pid": self.process.pid,
                                "how": f"watcher PID {self.process.pid} holds a pidfd of the "
                                       f"guard"}
        self.log(f"backstop: watcher PID {self.process.pid}")

    def died(self, restart: bool) -> None:
        """The watcher died (killed, OOM): reap it, and start another when `restart`."""
        if self.process is not None:
            code = self.process.poll()
            self.log(f"the backstop watcher (PID {self.process.pid}) died (exit {code})")
        if self.fd is not None:
            os.close(self.fd)
        self.process, self.fd = None, None
        if restart:
            self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def pidfd_of(pid: int) -> int | None:
    """A pidfd for `pid` (Linux 5.3+); None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _open(record: transaction.Record) -> bool:
    return record.state in transaction.OPEN_STATES


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} [{os.getpid()}] backstop: {message}", flush=True)


def take_over(state: StateDir, tx_id: str, why: str) -> int:
    """The guard is gone: undo the change if its transaction is still open. Exit status."""
    from fwsafe.core.recover import recover
    from fwsafe.errors import FwsafeError

    if not transaction.record_path(state, tx_id).exists():
        # Its guard stood by and was never told to go (fwsafe.guard.spawn.Standby): the record
        # is written before that, so without one nothing was ever applied.
        _log(f"transaction {tx_id} was called off before it was prepared: nothing to do")
        return 0
    try:
        record = transaction.load_record(state, tx_id)
    except FwsafeError as exc:
        _log(f"cannot read transaction {tx_id}: {exc}")
        return 1
    if not _open(record) and record.state != transaction.PREPARING:
        return 0   # confirmed, reverted or aborted: the guard finished its job
    _log(f"{why}; transaction {tx_id} is {record.state}: reverting it")
    while True:   # never give up while the change may be live
        try:
            done = recover(
                state, reason=f"{why}; the backstop reverted the change", by="backstop",
                tx_id=tx_id, give_up_after=None)
        except FwsafeError as exc:
            current = transaction.load_record(state, tx_id)
            if not _open(current):
                _log(f"nothing left to do ({exc.message})")
                return 0
            _log(f"recover refused ({exc.message}); trying again")
            time.sleep(0.5)
            continue
        except Exception as exc:  # noqa: BLE001 - the backstop must not die of it
            _log(f"recover failed ({type(exc).__name__}: {exc}); trying again")
            time.sleep(0.5)
            continue
        _log(f"transaction {tx_id} is {done.state}: {done.reason}")
        return 0


def watch(state: StateDir, tx_id: str) -> int:
    """Wait for the guard of `tx_id` to die; take over if its transaction is still open."""
    record = transaction.load_record(state, tx_id)
    pid = record.guard_pid
    if not pid:
        return take_over(state, tx_id, "the guard never recorded its PID")
    fd = pidfd_of(pid)
    if fd is None or not transaction.guard_alive(record):
        return take_over(state, tx_id, f"the guard (PID {pid}) is gone")
    _log(f"watching guard PID {pid} of transaction {tx_id}")
    try:
        while True:
            readable, _, _ = select.select([fd], [], [], POLL_S)
            if readable:
                return take_over(state, tx_id, f"the guard (PID {pid}) died")
            try:
                if not _open(transaction.load_record(state, tx_id)):
                    return 0
            except Exception:  # noqa: BLE001 - a record being replaced: look again later
                continue
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in ("--watch", "--after-stop"):
        print("usage: python -m fwsafe.guard.backstop --watch|--after-stop STATE_DIR TX_ID",
              file=sys.stderr)
        return 2
    how, state_dir, tx_id = args
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    try:  # shielded from the OOM killer where the kernel allows (children inherit it)
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError:
        pass
    state = StateDir(Path(state_dir))
    if how == "--after-stop":
        # systemd runs this after the guard unit's main process is gone, however it ended.
        result = os.environ.get("SERVICE_RESULT", "unknown")
        return take_over(state, tx_id, f"the guard unit stopped ({result})")
    return watch(state, tx_id)


if __name__ == "__main__":
    sys.exit(main())
