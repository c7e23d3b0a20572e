"""The backstop's watcher (`python -m fwsafe.guard.backstop --watch`): it holds a pidfd of the
guard and its own copy of the deadline on CLOCK_BOOTTIME, wakes the moment the guard dies, and
kills a guard stuck past its deadline; then the transaction is taken over
(fwsafe.guard.takeover; under systemd, by the unit's ExecStopPost=).

Run in the backstop process: it keeps its imports small.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from pathlib import Path

from fwsafe import failpoints
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir
from fwsafe.guard.backstop_tools import (
    BACKOFF_MAX,
    DEFAULT_STUCK_GRACE,
    KILL_WAIT_S,
    POLL_S,
    log,
    pidfd_of,
    run_tool,
    stuck_grace,
)
from fwsafe.guard.clock import boottime
from fwsafe.guard.takeover import take_over


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
            log(f"systemctl kill {self.unit}: {'done' if worked else said}")
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
                    log(f"the guard (PID {pid}) is stuck {now - self.deadline_at:.1f} s past "
                         f"its deadline (state {process_state(pid)}): killing it")
                    self._kill(pid, fd)
                    return self.guard_gone(
                        f"the guard (PID {pid}) was stuck past its deadline + {self.grace:g} s "
                        "and the backstop killed it")
                delay = 0.1
            except Exception as exc:  # noqa: BLE001 - the watcher must not die of it
                log(f"watcher error ({type(exc).__name__}: {exc}); going on")
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
            log(f"cannot read transaction {tx_id} ({exc}); trying again")
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
    log(f"watching guard PID {pid} of transaction {tx_id}")
    try:
        return watcher.run(pid, fd)
    finally:
        os.close(fd)


