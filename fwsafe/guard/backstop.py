"""The backstop: a second, independent way back when the guard itself dies or is stuck.

The guard is the dead-man's switch; the backstop is the switch's own dead-man's switch. While
a transaction is open, a watcher process (``--watch``) started by the guard in a session of its
own holds a pidfd of the guard and keeps its own copy of the deadline on CLOCK_BOOTTIME, which
the guard sends it over the watcher's stdin (a pipe: no disk involved) when the change goes
live and with every extension, with a heartbeat from the guard's main loop:

* the guard dies (``kill -9``, the OOM killer, a crash) while the transaction is open: the
  watcher wakes at once and undoes the change from the snapshots on disk (the same merge-based
  revert as the guard's; it never gives up);
* the guard is alive but stuck (SIGSTOP, a hung mount, a deadlock: no heartbeat, and it is not
  waiting for a tool it runs) at the deadline + ``stuck_grace`` (default 5 s): the watcher kills
  it (SIGKILL through its pidfd; under systemd ``systemctl kill`` of its unit) and takes over.

With systemd as PID 1 the guard is a transient unit whose ``ExecStopPost=<python> -m
fwsafe.guard.backstop --after-stop STATE TX`` is what takes over: systemd runs it whenever the
guard's main process is gone, however it ended; the watcher (in the unit) only kills a stuck
guard there. systemd's own limit, for when the guard and the watcher are frozen together, is a
transient timer the guard sets to the deadline + ``hatch_grace`` + ``stuck_grace`` and moves
with every extension (``RuntimeMaxSec=`` cannot be changed once the unit runs: systemd 252
refuses it), which ``systemctl kill``s the unit; ExecStopPost= then takes over.

The take-over claims the transaction (tx/<id>/lock, which the guard holds for its life), marks
it reverting and reverts without holding the state directory's lock, so `confirm`, `revert` and
`status` answer at once meanwhile. The record then says ``reverted_by: backstop``. Nothing on
the way back needs the disk: the log goes to stderr (the guard's log file, or the journal) and
a record that cannot be written (ENOSPC, EIO, read-only) is kept in memory and written once
space returns.

This module is imported by the guard and the backstop processes: it keeps its imports small.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fwsafe import failpoints
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir
from fwsafe.guard.clock import boottime

BACKSTOP_MODULE = "fwsafe.guard.backstop"
POLL_S = 1.0        # how often the watcher also looks at the record (ended by confirm/revert)
DEFAULT_STUCK_GRACE = 5.0
BACKOFF_MAX = 5.0
KILL_WAIT_S = 10.0  # how long a killed guard may take to be gone
Log = Callable[[str], None]


def write_line(text: str, fd: int = 2) -> None:
    """Write a line to `fd` (stderr: the guard's log file, or the journal); never raises: a
    full disk, EIO or a closed descriptor must not end a process on the way back."""
    data = (text.rstrip("\n") + "\n").encode(errors="replace")
    with contextlib.suppress(OSError, ValueError):
        while data:
            data = data[os.write(fd, data):]


class TolerantStream:
    """sys.stdout / sys.stderr for the guard and the backstop: whatever is printed goes to the
    descriptor best-effort, and flushing never fails (Python exits 120 when it cannot flush)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        if text.strip():
            write_line(text, self.fd)
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False


def quiet_std() -> None:
    sys.stdout = TolerantStream(2)
    sys.stderr = TolerantStream(2)


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    write_line(f"{stamp} [{os.getpid()}] backstop: {message}")


def stuck_grace(record: transaction.Record) -> float:
    value = record.options.get("stuck_grace", DEFAULT_STUCK_GRACE)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6
    return float(value) if ok else DEFAULT_STUCK_GRACE


def unit_name(tx_id: str) -> str:
    return f"fwsafe-guard-{tx_id}.service"


def watcher_argv(state_dir: Path, tx_id: str, mode: str) -> list[str]:
    how = "--watch-unit" if mode == "systemd-run" else "--watch"
    return [sys.executable, "-m", BACKSTOP_MODULE, how, str(state_dir), tx_id]


def after_stop_command(state_dir: Path, tx_id: str) -> str:
    """The ExecStopPost= line of the guard's transient unit (systemd mode)."""
    return f"{sys.executable} -m {BACKSTOP_MODULE} --after-stop {state_dir} {tx_id}"


def pidfd_of(pid: int) -> int | None:
    """A pidfd for `pid` (Linux 5.3+); None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def run_tool(argv: list[str], timeout: float = 10.0, tries: int = 3) -> tuple[bool, str]:
    """Run a tool on the way back: bounded in time, tried again; (worked, what it said)."""
    said = ""
    for _ in range(tries):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    check=False, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            said = str(exc)
            time.sleep(0.2)
            continue
        if result.returncode == 0:
            return True, result.stdout.strip()
        said = (result.stderr or result.stdout).strip() or f"exit {result.returncode}"
        time.sleep(0.2)
    return False, said


# --------------------------------------------------------------------------------------------
# The guard's side: start the watcher, feed it, restart it, set systemd's limit
# --------------------------------------------------------------------------------------------
class BackstopKeeper:
    """The guard's side: start the watcher, tell it the deadline and that the guard is alive,
    notice when it dies and start another; under systemd, keep systemd's own limit."""

    def __init__(self, state: StateDir, record: transaction.Record, mode: str,
                 log: Log) -> None:
        self.state, self.record, self.mode, self.log = state, record, mode, log
        self.process: subprocess.Popen[bytes] | None = None   # the watcher
        self.fd: int | None = None                              # its pidfd
        self.deadline_at: float | None = None   # the deadline on CLOCK_BOOTTIME, as told
        self.last_beat = 0.0
        self.limit_units: list[str] = []       # systemd: the limit timer(s) set

    @property
    def missing(self) -> bool:
        """A watcher should run but none does (it could not be started)."""
        return self.process is None

    def start(self) -> None:
        try:
            self.process = subprocess.Popen(
                watcher_argv(self.state.root, self.record.id, self.mode),
                stdin=subprocess.PIPE, cwd="/", start_new_session=True, close_fds=True)
        except OSError as exc:
            self.log(f"cannot start the backstop watcher: {exc}; trying again in 1 s")
            self.process, self.fd = None, None
            return
        assert self.process.stdin is not None
        os.set_blocking(self.process.stdin.fileno(), False)
        self.fd = pidfd_of(self.process.pid)
        pid = self.process.pid
        if self.mode == "systemd-run":
            unit = unit_name(self.record.id)
            self.record.backstop = {
                "kind": "systemd", "unit": unit, "pid": pid,
                "how": f"ExecStopPost= of {unit}, run by systemd; watcher PID {pid} kills the "
                       "unit if the guard is stuck past its deadline"}
        else:
            self.record.backstop = {
                "kind": "watcher", "pid": pid,
                "how": f"watcher PID {pid} holds a pidfd of the guard and its own copy of the "
                       "deadline"}
        self.log(f"backstop: watcher PID {pid}")
        if self.deadline_at is not None:
            self._tell(f"deadline {self.deadline_at:.3f}")

    def _tell(self, line: str) -> None:
        if self.process is None or self.process.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            os.write(self.process.stdin.fileno(), (line + "\n").encode())

    def deadline(self, at_boot: float) -> None:
        """The deadline (CLOCK_BOOTTIME) is now `at_boot`: told before anyone hears of it."""
        self.deadline_at = at_boot
        self._tell(f"deadline {at_boot:.3f}")

    def beat(self) -> None:
        """The guard's main loop goes on (sent at most twice a second)."""
        now = boottime()
        if now - self.last_beat >= 0.5:
            self.last_beat = now
            self._tell("beat")

    def died(self, restart: bool) -> None:
        """The watcher died (killed, OOM): reap it, and start another when `restart`."""
        if self.process is not None:
            code = self.process.poll()
            self.log(f"the backstop watcher (PID {self.process.pid}) died (exit {code})")
            with contextlib.suppress(OSError, ValueError):
                if self.process.stdin is not None:
                    self.process.stdin.close()
        if self.fd is not None:
            os.close(self.fd)
        self.process, self.fd = None, None
        if restart:
            self.start()

    def stop(self) -> None:
        """The transaction is over: the watcher ends by itself once told."""
        self._tell("done")
        if self.process is not None:
            with contextlib.suppress(OSError, ValueError):
                if self.process.stdin is not None:
                    self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.clear_limit()

    # -- systemd's own limit ------------------------------------------------------------------
    def set_limit(self, seconds: float) -> None:
        """systemd mode: in `seconds` unless moved again (a new timer is started before the
        old one is stopped: never a moment without), `limit` kills the guard's unit and, if
        nobody else does (its ExecStopPost= was killed too), takes the transaction over."""
        if self.mode != "systemd-run":
            return
        name = f"fwsafe-limit-{self.record.id}-{len(self.limit_units) + 1}"
        worked, said = run_tool([
            "systemd-run", "--quiet", "--collect", f"--unit={name}",
            f"--on-active={max(1, int(seconds + 0.999))}s",
            "--timer-property=AccuracySec=100ms",
            sys.executable, "-m", BACKSTOP_MODULE, "--limit", str(self.state.root),
            self.record.id], tries=2)
        if not worked:
            self.log(f"cannot set systemd's limit ({name}): {said}")
            return
        old, self.limit_units = self.limit_units, [*self.limit_units, name]
        for unit in old:
            run_tool(["systemctl", "stop", f"{unit}.timer"], tries=1)
        self.limit_units = [name]

    def clear_limit(self) -> None:
        for unit in self.limit_units:
            run_tool(["systemctl", "stop", f"{unit}.timer"], tries=2)
        self.limit_units = []


# --------------------------------------------------------------------------------------------
# The watcher
# --------------------------------------------------------------------------------------------
def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, D, T, t, Z, ...); None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def waiting_for_a_tool(pid: int) -> bool:
    """`pid` waits for a child process that is itself running (a restore tool at work):
    not stuck, whatever its own heartbeat says (every tool call has a timeout)."""
    children: list[str] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += (task / "children").read_text().split()
    own = str(os.getpid())   # the watcher is the guard's child: it does not count
    return any(process_state(int(child)) not in (None, "T", "t", "Z", "D")
               for child in children if child.isdigit() and child != own)


def stuck(pid: int) -> bool:
    """Stopped, blocked in the kernel, or neither beating nor waiting for a tool."""
    state = process_state(pid)
    if state is None or state == "Z":
        return False   # dead: the pidfd tells
    return state in ("T", "t", "D") or not waiting_for_a_tool(pid)


class Watcher:
    """One transaction's watcher: the guard's death, or the guard stuck past its deadline."""

    def __init__(self, state: StateDir, tx_id: str, unit: str | None) -> None:
        self.state, self.tx_id, self.unit = state, tx_id, unit
        self.deadline_at: float | None = None
        self.last_beat = boottime()
        self.last_loop = boottime()
        self.grace = DEFAULT_STUCK_GRACE
        self.channel_open = True
        self.buffer = b""

    def _read_channel(self) -> bool:
        """Read what the guard said; False once it said it is done."""
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.channel_open = False
            return True
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            word, _, value = raw.decode(errors="replace").strip().partition(" ")
            self.last_beat = boottime()
            if word == "deadline":
                with contextlib.suppress(ValueError):
                    self.deadline_at = float(value)
            elif word == "done":
                return False
        return True

    def _transaction_open(self) -> bool:
        try:
            return transaction.load_record(self.state, self.tx_id).state in \
                transaction.OPEN_STATES
        except Exception:  # noqa: BLE001 - a record being replaced, or a disk that fails
            return True

    def _kill(self, pid: int, fd: int) -> None:
        failpoints.hit("backstop.killing")
        if self.unit is not None:
            worked, said = run_tool(["systemctl", "kill", "--signal=SIGKILL", self.unit])
            _log(f"systemctl kill {self.unit}: {'done' if worked else said}")
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [], KILL_WAIT_S)

    def run(self, pid: int, fd: int) -> int:
        """Watch until the transaction ends; take over when the guard dies or is stuck."""
        os.set_blocking(0, False)
        polled = 0.0
        delay = 0.1
        while True:
            try:
                now = boottime()
                if now - self.last_loop > 3 * POLL_S:
                    self.last_beat = now   # we were frozen ourselves: give the guard its grace
                self.last_loop = now
                watched = [fd, 0] if self.channel_open else [fd]
                readable, _, _ = select.select(watched, [], [], POLL_S / 2)
                if fd in readable:
                    return self.guard_gone(f"the guard (PID {pid}) died")
                if 0 in readable and not self._read_channel():
                    return 0
                if now - polled >= POLL_S:
                    polled = now
                    if not self._transaction_open():
                        return 0
                if self.deadline_at is not None and now > self.deadline_at + self.grace \
                        and now - self.last_beat > self.grace and stuck(pid) \
                        and self._transaction_open():
                    _log(f"the guard (PID {pid}) is stuck {now - self.deadline_at:.1f} s past "
                         f"its deadline (state {process_state(pid)}): killing it")
                    self._kill(pid, fd)
                    return self.guard_gone(
                        f"the guard (PID {pid}) was stuck past its deadline + {self.grace:g} s "
                        "and the backstop killed it")
                delay = 0.1
            except Exception as exc:  # noqa: BLE001 - the watcher must not die of it
                _log(f"watcher error ({type(exc).__name__}: {exc}); going on")
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def guard_gone(self, why: str) -> int:
        if self.unit is not None:
            return 0   # systemd runs ExecStopPost= (take_over) once the unit's process is gone
        return take_over(self.state, self.tx_id, why)


def watch(state: StateDir, tx_id: str, unit: str | None = None) -> int:
    """Wait for the guard of `tx_id` to die or be stuck; take over if its transaction is
    still open (under systemd, its unit's ExecStopPost= does)."""
    delay = 0.1
    while True:
        try:
            record = transaction.load_record(state, tx_id)
            break
        except Exception as exc:  # noqa: BLE001 - a record being replaced, or a failing disk
            if not transaction.record_path(state, tx_id).parent.exists():
                return 0
            _log(f"cannot read transaction {tx_id} ({exc}); trying again")
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
    watcher = Watcher(state, tx_id, unit)
    watcher.grace = stuck_grace(record)
    pid = record.guard_pid
    if not pid:
        return watcher.guard_gone("the guard never recorded its PID")
    fd = pidfd_of(pid)
    if fd is None or not transaction.guard_alive(record):
        return watcher.guard_gone(f"the guard (PID {pid}) is gone")
    _log(f"watching guard PID {pid} of transaction {tx_id}")
    try:
        return watcher.run(pid, fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The take-over
# --------------------------------------------------------------------------------------------
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
                _log(f"cannot write the record ({exc}); it is kept in memory and written once "
                     "the disk takes it")

    def _serve(self, state: StateDir, tx_id: str) -> None:
        if self.server is not None:
            return
        try:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(unsaved_address(state, tx_id))
            server.listen(8)
        except OSError as exc:   # another take-over answers already; or no sockets at all
            _log(f"cannot answer the record from memory: {exc}")
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
                _log("the record is written")
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
                _log(f"transaction {tx_id} was called off before it was prepared: nothing to do")
                return 0
            record = transaction.load_record(state, tx_id)
            if not (record.state in transaction.OPEN_STATES
                    or record.state == transaction.PREPARING):
                _remove_leftover_hatch(record)
                return 0   # confirmed, reverted or aborted: the guard finished its job
            if not announced:
                _log(f"{why}; transaction {tx_id} is {record.state}: reverting it")
                announced = True
            failpoints.hit("backstop.taking-over")
            with state.tx_claimed(tx_id):   # held until the record is written
                done = recover(state, reason=f"{why}; the {by} reverted the change",
                               by=by, tx_id=tx_id, give_up_after=None,
                               save=unsaved.save, claimed=True, prover=PROVER,
                               remove_hatch=removed)
                unsaved.flush(state)
            _log(f"transaction {tx_id} is {done.state}: {done.reason}")
            return 0
        except PendingError as exc:   # the guard still holds it, or another reverter does
            _log(f"not yet: {exc.message}")
        except FwsafeError as exc:
            try:
                current = transaction.load_record(state, tx_id)
            except Exception:  # noqa: BLE001 - try again below
                current = None
            if current is not None and not (current.state in transaction.OPEN_STATES
                                            or current.state == transaction.PREPARING):
                _log(f"nothing left to do ({exc.message})")
                return 0
            _log(f"recover refused ({exc.message}); trying again")
        except BaseException as exc:  # noqa: BLE001 - the backstop must not die of anything
            _log(f"recover failed ({type(exc).__name__}: {exc}); trying again")
        time.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def _remove_leftover_hatch(record: transaction.Record) -> None:
    """A transaction that ended while its hatch may still be loaded (its guard died cleaning
    up): remove it (best effort; the next apply removes leftovers too)."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.guard import hatch, hatch_sync

    if not hatch.may_be_loaded(record.hatch):
        return
    states = hatch_sync.sync(None, hatch_sync.available_layers(), _log)
    _log(f"hatch left by transaction {record.id}: {states}")


def late(state: StateDir, tx_id: str | None) -> int:
    """``--take-over`` (started by a command that found the transaction orphaned: see
    fwsafe.guard.spawn.converge) and ``--converge`` (the login hook, systemd's limit timer):
    take over the transaction (`tx_id`, else the current one) if it is orphaned: open, past
    its deadline, its guard gone and nobody holding it."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.core.recover import LATE_REASON, orphaned

    try:
        record = transaction.load_record(state, tx_id) if tx_id else \
            transaction.load_current(state)
    except Exception as exc:  # noqa: BLE001 - no state, a damaged record: nothing to do here
        _log(f"nothing to take over ({exc})")
        return 0
    if record is None or not orphaned(state, record):
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
    _log(f"systemd's limit: systemctl kill {unit_name(tx_id)}: {'done' if worked else said}")
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


USAGE = ("usage: python -m fwsafe.guard.backstop --watch|--watch-unit|--after-stop|--take-over"
         "|--limit STATE_DIR TX_ID\n       python -m fwsafe.guard.backstop --converge [STATE_DIR]")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--converge"] and len(args) <= 2:
        args = [*args, "", ""][:3]
    if len(args) != 3 or args[0] not in ("--watch", "--watch-unit", "--after-stop",
                                         "--take-over", "--converge", "--limit"):
        write_line(USAGE)
        return 2
    how, state_dir, tx_id = args
    if how == "--converge" and not state_dir:
        # imported by the guard and backstop processes, which keep their imports small: loaded when
        # used
        from fwsafe.core.config import load_config
        from fwsafe.core.statedir import resolve_state_dir

        try:
            state_dir = str(resolve_state_dir(None, load_config(None).state_dir))
        except Exception as exc:  # noqa: BLE001 - a broken config: the hook says nothing
            _log(f"no state directory ({exc})")
            return 0
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    quiet_std()
    try:  # shielded from the OOM killer where the kernel allows (children inherit it)
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            _log(f"oom_score_adj: {exc}")
    state = StateDir(Path(state_dir))
    if how in ("--take-over", "--converge"):
        return late(state, tx_id or None)
    if how == "--limit":
        return limit(state, tx_id)
    if how == "--after-stop":
        # systemd runs this after the guard unit's main process is gone, however it ended.
        result = os.environ.get("SERVICE_RESULT", "unknown")
        code = take_over(state, tx_id, f"the guard unit stopped ({result})")
        # systemd's limit of a guard that could not stop it itself (it was killed)
        run_tool(["systemctl", "stop", f"fwsafe-limit-{tx_id}-*.timer"], tries=1)
        return code
    return watch(state, tx_id, unit_name(tx_id) if how == "--watch-unit" else None)


if __name__ == "__main__":
    sys.exit(main())
