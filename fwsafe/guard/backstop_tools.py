"""What the backstop's parts share: log lines that never fail (a full disk, EIO), the
command lines of the watcher and of the guard unit's ExecStopPost=, pidfds, and tools run on
the way back, bounded and tried again (fwsafe.guard.backstop tells the whole story).

Imported by the guard and the backstop processes: it keeps its imports small.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fwsafe.core import transaction

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


def log(message: str) -> None:
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


