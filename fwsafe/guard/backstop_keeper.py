"""The backstop, the guard's side: the watcher started in a session of its own, fed the deadline
and a heartbeat over its stdin, started again when it dies; under systemd, systemd's own limit
(a transient timer) set and moved (fwsafe.guard.backstop tells the whole story).

Imported by the guard process: it keeps its imports small.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir
from fwsafe.guard.backstop_tools import (
    BACKSTOP_MODULE,
    Log,
    pidfd_of,
    run_tool,
    unit_name,
    watcher_argv,
)
from fwsafe.guard.clock import boottime


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


