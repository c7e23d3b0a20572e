"""What `fwsafe apply --host` is asked (`RemoteRequest`), the errors it adds, and `RemoteJob`:
the state that its phases share, with the small remote queries they all use."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fwsafe.control.flow import ApplyOptions
from fwsafe.core.config import HostTarget
from fwsafe.errors import RejectedError
from fwsafe.remote import timing
from fwsafe.remote.scripts import REMOTE_NAMES, RUN_AND_CLEAN_SCRIPT, sh
from fwsafe.remote.session import Connection, Dialer, RemoteCommand, RemoteResult
from fwsafe.remote.signals import Interrupts

__all__ = ["InterruptedBeforeChange", "RemoteCommandError", "RemoteJob", "RemoteRequest",
           "SSHConnectError"]


class SSHConnectError(RejectedError):
    """The host could not be reached or logged into before anything was changed."""


class RemoteCommandError(RejectedError):
    """fwsafe on the host could not be run, or failed before changing anything."""


class InterruptedBeforeChange(RejectedError):
    """Interrupted (Ctrl-C, SIGTERM, SIGHUP) before the host could have changed anything."""


@dataclass
class RemoteRequest:
    target: HostTarget            # fwsafe.core.config.HostTarget: host, port, user, key, known_hosts, name
    rules: str | None             # local IPv4 iptables-save file
    rules6: str | None            # local IPv6 file
    options: ApplyOptions         # timeout_s, probes, probe_interval, probe_failures, confirm_on_probe
    identity: str | None          # private key file; else ssh-agent / default keys (never passwords)
    known_hosts: str | None       # default ~/.ssh/known_hosts
    accept_new_host_key: bool
    remote_state_dir: str | None = None   # passed as --state-dir to the remote fwsafe (tests)
    remote_fwsafe: str = "fwsafe"


class RemoteJob:
    """One `fwsafe apply --host` under way: what the phases learn and pass on.

    Times are local monotonic ones; `timings` records seconds since the start for the result.
    """

    def __init__(self, req: RemoteRequest, progress: Callable[[str], None]) -> None:
        self.req = req
        self.target = req.target
        self.where = str(req.target)
        self._progress = progress
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}
        self.dialer: Dialer | None = None        # set once known_hosts has been read
        self.local_paths: dict[str, str] = {}    # layer -> the local rules file
        self.tmpdir: str | None = None           # the upload directory on the host
        self.first: Connection | None = None     # the login that uploads and applies
        self.first_login_s: float | None = None
        self.link = timing.Link()                # measured by the first login
        self.apply_cmd: RemoteCommand | None = None  # the apply, while its result is unknown
        self.sent_at: float | None = None        # when the apply command was sent
        self.tx_id: str | None = None
        self.armed: dict[str, Any] = {}          # the apply's JSON result
        self.deadline: float | None = None       # the host's deadline
        self.attempts = 0                        # new logins tried
        self.last_failure: str | None = None     # why the last new login did not confirm
        self.until: float | None = None          # no step may run past this (a phase's end)
        self.interrupts = Interrupts()           # Ctrl-C, raised only between steps

    # -- messages -------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        try:
            self._progress(message)
        except Exception:  # noqa: BLE001 - progress output must never stop a confirmation
            pass

    def mark(self, name: str) -> float:
        """Record in `timings` that `name` happened now; the seconds since the start."""
        elapsed = round(time.monotonic() - self.start, 3)
        self.timings[name] = elapsed
        return elapsed

    def localize(self, text: str) -> str:
        """Put the local file names back into a message from the host."""
        if self.tmpdir:
            for layer, name in REMOTE_NAMES.items():
                local = self.local_paths.get(layer)
                if local:
                    text = text.replace(f"{self.tmpdir}/{name}", local)
        return text

    def pause(self, seconds: float) -> None:
        """Wait between steps; Ctrl-C (SIGTERM, SIGHUP) raises KeyboardInterrupt here."""
        self.interrupts.pause(seconds)

    # -- connections ----------------------------------------------------------------------------
    def connect(self, budget: float, *, tcp_timeout: float) -> Connection:
        """A new login (see `Dialer.connect`)."""
        assert self.dialer is not None
        return self.dialer.connect(self.limit(budget), tcp_timeout=tcp_timeout)

    def limit(self, seconds: float) -> float:
        """`seconds`, cut short where the current phase ends (`until`)."""
        if self.until is None:
            return seconds
        return max(min(seconds, self.until - time.monotonic()), 0.05)

    def may_have_applied(self) -> bool:
        """Whether the apply's exec request may have gone out (the host may have changed)."""
        if self.sent_at is None:
            return False
        return self.apply_cmd is None or self.apply_cmd.sent

    def stop_at(self) -> float:
        """Until when new logins may try to confirm (local monotonic time)."""
        if self.deadline is not None:
            return self.deadline - timing.DEADLINE_MARGIN
        assert self.sent_at is not None  # unknown result: the deadline is at least this late
        return self.sent_at + self.req.options.timeout_s - timing.DEADLINE_MARGIN

    def close_first(self) -> None:
        """Close the apply's channel (if still open) and the first connection."""
        if self.apply_cmd is not None:
            self.apply_cmd.close()
            self.apply_cmd = None
        if self.first is not None:
            self.first.close()
            self.first = None

    # -- remote commands ------------------------------------------------------------------------
    def fw(self, *args: str) -> list[str]:
        """The argv of the host's fwsafe with `args` (and the remote --state-dir)."""
        argv = [self.req.remote_fwsafe, *args]
        if self.req.remote_state_dir:
            argv += ["--state-dir", self.req.remote_state_dir]
        return argv

    def check_command(self) -> str:
        """The command that shows the host's state (for messages)."""
        port = ["-p", str(self.target.port)] if self.target.port != 22 else []
        return shlex.join(["ssh", *port, f"{self.target.user}@{self.target.host}",
                           *self.fw("status")])

    def query(self, conn: Connection, *args: str, clean: bool = False) -> dict[str, Any] | None:
        """Run `fwsafe ARGS --json` over `conn`; its JSON output (None if there is none)."""
        result = self.query_result(conn, *args, clean=clean)
        return result.json()

    def query_result(self, conn: Connection, *args: str, clean: bool = False) -> RemoteResult:
        """Run `fwsafe ARGS --json` over `conn`; with `clean`, remove the upload directory
        afterwards."""
        argv = self.fw(*args, "--json")
        command = (sh(RUN_AND_CLEAN_SCRIPT, self.tmpdir, *argv) if clean and self.tmpdir
                   else shlex.join(argv))
        return conn.run(command, self.limit(self.link.query()))

    def cleanup(self, conn: Connection, limit: float | None = None) -> bool:
        """Remove the upload directory over `conn` (best effort, bounded); whether it is gone."""
        if self.tmpdir is None:
            return True
        try:
            result = conn.run(sh(RUN_AND_CLEAN_SCRIPT, self.tmpdir, "true"),
                              self.limit(limit if limit is not None else self.link.query()))
        except Exception:  # noqa: BLE001 - a leftover directory in /tmp is no reason to fail
            return False
        if result.rc == 0:
            self.tmpdir = None
        return self.tmpdir is None

    def cleanup_over_first(self, limit: float | None = None) -> bool:
        """Remove the upload directory over the first connection (best effort, bounded)."""
        if self.first is None or self.tmpdir is None:
            return self.tmpdir is None
        return self.cleanup(self.first, limit)
