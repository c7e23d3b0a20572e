"""Starting the guard and talking to it: what runs in the CLI (see fwsafe.guard.process for
the guard itself), and `wait_for_go`, where a guard started ahead waits for its transaction.

Where systemd is PID 1 the guard is a transient unit (``systemd-run``) whose ExecStopPost= is the
backstop; elsewhere a double-forked ``setsid`` daemon that starts a watcher as its backstop.
Requests (``confirm``, ``revert``, ``extend``, ``status``) go as one JSON line on the Unix socket
in the state directory; the guard answers with one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fwsafe.context import RUN
from fwsafe.core import transaction
from fwsafe.core.recover import orphaned
from fwsafe.core.statedir import StateDir, open_private
from fwsafe.core.transaction import Record
from fwsafe.errors import GuardError, StateError
from fwsafe.guard.backstop_tools import after_stop_command
from fwsafe.guard.takeover import ask_unsaved, left_loaded, remove_left_hatch

GUARD_MODULE = "fwsafe.guard"


# --------------------------------------------------------------------------------------------
# Starting the guard (runs in the CLI)
# --------------------------------------------------------------------------------------------
def systemd_is_init() -> bool:
    return os.path.isdir("/run/systemd/system")


def guard_mode() -> str:
    forced = os.environ.get("FWSAFE_GUARD_MODE")
    if forced in ("setsid", "systemd-run"):
        return forced
    return "systemd-run" if systemd_is_init() else "setsid"


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])   # the dir holding fwsafe/
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_parent + (os.pathsep + existing if existing else "")
    return env


def _passed_on(name: str) -> bool:
    return name.startswith(("FWSAFE_", "LC_")) or name in ("PATH", "LANG", "LANGUAGE")


def guard_env(config_path: str | None = None) -> dict[str, str]:
    """What the guard must get from the CLI in either spawn mode: the FWSAFE_* variables,
    PATH, LANG/LANGUAGE/LC_*, the PYTHONPATH that finds this fwsafe, and FWSAFE_CONFIG naming
    the config file the CLI read (--config or $FWSAFE_CONFIG)."""
    env = {name: value for name, value in os.environ.items() if _passed_on(name)}
    env["PYTHONPATH"] = _python_env()["PYTHONPATH"]
    if config_path:
        env["FWSAFE_CONFIG"] = config_path
    return env


def systemd_run_argv(state_dir: Path, tx_id: str, netns_pid: int,
                     config_path: str | None = None) -> list[str]:
    """The transient unit: its own cgroup (outside the session's scope), OOM-shielded, in the
    network namespace of the CLI that asked for it, with the CLI's relevant environment (a
    unit starts with the service manager's, not ours)."""
    return [
        "systemd-run", "--quiet", "--collect", f"--unit=fwsafe-guard-{tx_id}",
        "--property=OOMScoreAdjust=-1000",
        f"--property=NetworkNamespacePath=/proc/{netns_pid}/ns/net",
        # The backstop: systemd runs this whenever the guard's process is gone, however it
        # ended; it reverts if the transaction is still open (fwsafe.guard.backstop).
        f"--property=ExecStopPost={after_stop_command(state_dir, tx_id)}",
        *(f"--setenv={name}={value}" for name, value in sorted(guard_env(config_path).items())),
        sys.executable, "-m", GUARD_MODULE, "--foreground", str(state_dir), tx_id, "--standby",
    ]


GO_FIFO = "go"          # tx/<id>/go: the named pipe on which a standing-by guard waits
GO = b"go\n"


class Standby:
    """A guard started ahead of its transaction, while the CLI still reads the firewall and
    checks the change: its start-up (Python, imports, ``systemd-run``) is off the critical path.
    It waits on the transaction's named pipe and does nothing until `go` is written there; when
    every writer is gone without it (the CLI called the change off, or died) it exits, having
    changed nothing. Only after `go` may the change become live."""

    def __init__(self, state: StateDir, tx_id: str, mode: str, fd: int,
                 intermediate: subprocess.Popen[bytes] | None) -> None:
        self.state, self.tx_id, self.mode = state, tx_id, mode
        self.fd: int | None = fd   # the pipe's write end (opened read-write: never blocks)
        self.intermediate = intermediate   # setsid: it forks the guard once told to go

    def go(self) -> None:
        """Tell the guard to arm and apply (the record must be saved, `preparing`). Raises
        GuardError when the guard is known to be gone; the pipe stays open until `close`, so
        that `go` reaches a guard that opens it late."""
        RUN.spawned.append(self.tx_id)
        log_path = self.state.tx_dir(self.tx_id) / "guard.log"
        if self.intermediate is not None and self.intermediate.poll() is not None:
            raise GuardError(f"the guard died while standing by (exit "
                             f"{self.intermediate.returncode}); see {log_path}")
        assert self.fd is not None
        try:
            os.write(self.fd, GO)
        except OSError as exc:
            raise GuardError(f"cannot tell the guard to go: {exc.strerror}") from exc
        if self.intermediate is None:
            return
        try:
            code = self.intermediate.wait(timeout=30)
        except subprocess.TimeoutExpired as exc:
            self.intermediate.kill()
            raise GuardError("the guard did not start within 30 s") from exc
        if code != 0:
            raise GuardError(f"the guard failed to start (exit {code}); see {log_path}")

    def close(self) -> None:
        """Done with the pipe: the guard has read `go` (it armed), or has been given up on. A
        guard that opens it only now finds none and exits (its transaction is aborted)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            (self.state.tx_dir(self.tx_id) / GO_FIFO).unlink()
        except FileNotFoundError:
            pass

    def call_off(self) -> None:
        """Nothing is to be applied: the guard exits without changing anything."""
        self.close()
        if self.intermediate is not None:
            try:
                self.intermediate.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def standby(state: StateDir, tx_id: str, config_path: str | None = None) -> Standby:
    """Start the guard of `tx_id` (its directory exists) standing by; see `Standby`."""
    mode = guard_mode()
    tx_dir = state.tx_dir(tx_id)
    fifo = tx_dir / GO_FIFO
    try:
        os.mkfifo(fifo, 0o600)
        fd = os.open(fifo, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise GuardError(f"cannot create {fifo}: {exc.strerror}") from exc
    try:
        return Standby(state, tx_id, mode, fd, _start(state, tx_id, mode, config_path))
    except BaseException:
        os.close(fd)
        raise


def _start(state: StateDir, tx_id: str, mode: str,
           config_path: str | None) -> subprocess.Popen[bytes] | None:
    log_path = state.tx_dir(tx_id) / "guard.log"
    if mode == "systemd-run":
        argv = systemd_run_argv(state.root, tx_id, os.getpid(), config_path)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise GuardError(f"systemd-run could not start the guard: {exc}") from exc
        if result.returncode != 0:
            raise GuardError(f"systemd-run could not start the guard: {result.stderr.strip()}")
        return None
    try:
        log = open_private(log_path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        raise GuardError(f"cannot open {log_path}: {exc.strerror}") from exc
    try:
        return subprocess.Popen(
            [sys.executable, "-m", GUARD_MODULE, "--daemonize", str(state.root), tx_id,
             "--standby"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
            start_new_session=True, close_fds=True,
            env={**os.environ, **guard_env(config_path)},
        )
    except OSError as exc:
        raise GuardError(f"the guard could not be started: {exc}") from exc
    finally:
        os.close(log)


SAVED_FIFO = "saved"    # tx/<id>/saved: the guard says "record saved" to the CLI waiting for it
SAVED_POLL_S = 0.25     # the CLI reads the record at least this often anyway


def watch_saves(state: StateDir, tx_id: str) -> int | None:
    """In the CLI, before the guard is told to go: a named pipe on which the guard says each
    time it has saved the record, so that the CLI reads it then instead of every few
    milliseconds. None when it cannot be made (the CLI then reads the record at intervals)."""
    path = state.tx_dir(tx_id) / SAVED_FIFO
    try:
        os.mkfifo(path, 0o600)
    except OSError:
        return None
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def wait_saved(fd: int | None, limit: float = SAVED_POLL_S) -> None:
    """Until the guard says it saved the record, at most `limit` seconds (without a pipe:
    a short pause)."""
    if fd is None:
        time.sleep(min(limit, 0.005))
        return
    with contextlib.suppress(InterruptedError):
        select.select([fd], [], [], limit)
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass


def stop_watching(state: StateDir, tx_id: str, fd: int | None) -> None:
    if fd is None:
        return
    os.close(fd)
    with contextlib.suppress(OSError):
        (state.tx_dir(tx_id) / SAVED_FIFO).unlink()


def tell_saved(tx_dir: Path) -> None:
    """In the guard, after it saved the record: wake the CLI waiting for it (nothing when none
    waits: no pipe, or nobody reading it)."""
    try:
        fd = os.open(tx_dir / SAVED_FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b".")
    except OSError:
        pass
    finally:
        os.close(fd)


def wait_for_go(tx_dir: Path) -> bool:
    """In the guard: wait on the transaction's named pipe. True once the CLI wrote `go`; False
    when every writer is gone without it (called off, or the CLI died)."""
    try:
        fd = os.open(tx_dir / GO_FIFO, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False   # the CLI called it off and removed the directory
    got = b""
    try:
        while b"\n" not in got:
            try:
                chunk = os.read(fd, 64)
            except BlockingIOError:
                select.select([fd], [], [], 1.0)
                continue
            if not chunk:
                return False
            got += chunk
    finally:
        os.close(fd)
    return got.startswith(GO)   # the first line, whole


# --------------------------------------------------------------------------------------------
# Talking to the guard (runs in the CLI)
# --------------------------------------------------------------------------------------------
def request(state: StateDir, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """Send one request to the guard and return its answer."""
    payload = json.dumps({"op": op, **fields}).encode() + b"\n"
    path = str(state.socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(payload)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            raise GuardError(f"the guard does not answer on {path}: {exc}") from exc
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise GuardError(f"the guard sent a garbled answer: {exc}") from exc
    if not isinstance(answer, dict):
        raise GuardError("the guard sent a garbled answer")
    return answer




SETTLE_S = 60.0   # how long `settle` waits for a transaction being decided elsewhere
CONVERGE_WAIT_S = 5.0   # how long a command waits for the late take-over it started
NOBODY_S = 5.0    # how long it waits for somebody (the backstop) to take over a dead guard's


def ask_record(state: StateDir, record: Record, timeout: float = 2.0) -> Record | None:
    """The living guard's own record, the truth even while the disk refuses to store it;
    None when the guard is gone or does not answer in time (busy reverting, stopped). With
    the guard gone: the record a take-over keeps in memory because the disk refuses it."""
    if not transaction.guard_alive(record):
        kept = ask_unsaved(state, record.id) if state.tx_held(record.id) else None
        try:
            return Record.from_json(kept) if kept is not None else None
        except (StateError, KeyError, TypeError, ValueError):
            return None
    try:
        answer = request(state, "status", timeout=timeout)
        live = Record.from_json(dict(answer["record"]))
    except (GuardError, StateError, KeyError, TypeError, ValueError):
        return None
    return live if live.id == record.id else None


def view(state: StateDir, record: Record, timeout: float = 2.0) -> Record:
    """Transaction `record` as it stands: the guard's view while it lives and answers, else
    the record on disk (else `record` itself, when the disk cannot be read)."""
    live = ask_record(state, record, timeout)
    if live is not None:
        return live
    try:
        return transaction.load_record(state, record.id)
    except StateError:
        return record


def looked_after(state: StateDir, record: Record) -> bool:
    """Someone decides the transaction: its guard lives, or a process holds it (the backstop
    or a recover that took it over)."""
    return transaction.guard_alive(record) or state.tx_held(record.id)


def start_late_take_over(state: StateDir, record: Record) -> None:
    """Start the take-over of an orphaned transaction in a session of its own (it outlives
    the command that saw it, never gives up, and does not hold the state lock across its
    attempts: fwsafe.guard.takeover.take_over); its log goes to the transaction's guard.log."""
    log: int | None = None
    with contextlib.suppress(OSError):
        log = os.open(state.tx_dir(record.id) / "guard.log",
                      os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "fwsafe.guard.backstop", "--take-over", str(state.root),
             record.id],
            stdin=subprocess.DEVNULL, stdout=log if log is not None else subprocess.DEVNULL,
            stderr=log if log is not None else subprocess.DEVNULL, cwd="/",
            start_new_session=True, close_fds=True)
    finally:
        if log is not None:
            os.close(log)


def settle(state: StateDir, record: Record, limit: float = SETTLE_S) -> Record:
    """Wait until transaction `record` is no longer open, while somebody looks after it (its
    guard, the backstop; a guard just gone is given NOBODY_S for the backstop to take over;
    one left past its deadline with nobody on it is taken over, as `converge` does), at most
    `limit` seconds; return it as it stands then."""

    end = time.monotonic() + limit
    nobody_since: float | None = None
    taken = False
    while True:
        current = view(state, record, timeout=1.0)
        if current.state not in transaction.OPEN_STATES:
            return current
        now = time.monotonic()
        if looked_after(state, current):
            nobody_since = None
        elif not taken and orphaned(state, current):   # past its deadline with nobody on it
            start_late_take_over(state, current)
            taken, nobody_since = True, None
        elif nobody_since is None:
            nobody_since = now
        elif now - nobody_since > NOBODY_S:
            return current
        if now > end:
            return current
        time.sleep(0.2)


def converge(state: StateDir, wait: float = CONVERGE_WAIT_S) -> Record | None:
    """What every fwsafe command does first (and the login hook): an open transaction left
    past its deadline with nobody looking after it is taken over (reverted) now, so that the
    answer that follows is the truth and nothing waits for a hand; a transaction that ended
    with its hatch still loaded (its guard died cleaning up) has it removed. Waits at most
    `wait` seconds for the take-over to finish; returns the record as it stands then (None
    when there was nothing to do). Never raises: a command must not fail because of it."""
    try:
        if os.geteuid() != 0 or not state.exists():
            return None
        record = transaction.load_current(state)
        if record is None:
            return None
        if left_loaded(record) and not looked_after(state, record):
            # it ended, but its guard died before removing its hatch (the hatch lets SSH in
            # from the admin's addresses once its moment comes): remove it now, without
            # waiting for anyone (an apply being prepared removes it too)
            return remove_left_hatch(state, record, until=time.monotonic() + 1.0, wait=False)
        if not orphaned(state, record):
            return None
        start_late_take_over(state, record)
        return settle(state, record, limit=wait)
    except Exception:  # noqa: BLE001 - best effort: the command goes on and tells what it sees
        return None
