"""`fwsafe apply --host`: change a remote firewall from the workstation, and confirm the change
only through a brand-new SSH login.

A keypress in the session that made the change proves little: established connections survive
rules that drop new ones. So, like deploy-rs's "magic rollback", the workstation:

1. connects (paramiko; keys and ssh-agent only, never passwords) after checking the host key
   against known_hosts (`fwsafe.remote.hostkeys`): an unknown or changed key is refused before
   anything is sent;
2. uploads the rules over SFTP into a private ``mktemp -d`` directory on the host;
3. runs ``fwsafe apply --detach --json`` there: the host's guard is armed before anything
   changes and reverts by itself at the deadline unless confirmed;
4. opens NEW connections to the host - a TCP connect, then a full SSH login with a new
   paramiko client and transport, never the first one - and runs ``fwsafe confirm ID`` only
   over such a login, retrying (short per-attempt timeouts) until shortly before the
   deadline. With guard-side probes, the confirmation waits until the probes have had the
   time to fail (`probe_settle_s`); an early revert by a probe is seen meanwhile;
5. if no new login gets through in time it does nothing more: the guard reverts. The
   workstation waits (up to the deadline + 120 s) for SSH to answer again, reads
   ``fwsafe status`` and raises `RevertedError` (exit 4) with the host's reason, or
   `RevertFailedError` (exit 5) when the state cannot be known.

The remote result is also written to files in the upload directory, so a workstation that
lost the connection that ran the apply still learns the transaction from a later login.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fwsafe.config import HostTarget
from fwsafe.core.manager import ApplyOptions, read_rules_file
from fwsafe.errors import (
    FwsafeError,
    InvalidRulesError,
    PendingError,
    RejectedError,
    RevertedError,
    RevertFailedError,
    UsageError,
)
from fwsafe.remote.hostkeys import HostKeyError, KnownHosts, describe_key

__all__ = [
    "RemoteCommandError",
    "RemoteRequest",
    "SSHConnectError",
    "apply_remote",
    "probe_settle_s",
]

#: The first connection: TCP connect, key exchange and login together.
FIRST_CONNECT_TIMEOUT = 15.0
#: Small remote commands (mktemp, cleanup) and the upload.
COMMAND_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 120.0
#: How long the apply may stay silent before we also look for its result over new logins.
APPLY_QUIET_MAX = 10.0
APPLY_QUIET_MIN = 2.0
#: One new-login attempt: TCP connect (at most TCP_TIMEOUT) plus the SSH login.
ATTEMPT_TIMEOUT = 5.0
TCP_TIMEOUT = 2.0
#: After the deadline: short TCP attempts, so that the revert is noticed quickly.
WAIT_TCP_TIMEOUT = 0.5
MIN_ATTEMPT = 0.3
RETRY_PAUSE = 0.5
#: New logins stop this long before the deadline (a later confirm is too late anyway).
DEADLINE_MARGIN = 0.5
#: `fwsafe confirm` / `status` over a login that got in: bounded, but not by the deadline.
REMOTE_QUERY_TIMEOUT = 30.0
#: After the deadline, wait this long for SSH to answer again.
AFTER_DEADLINE_S = 120.0
#: While probes settle, poll the host's status this often.
SETTLE_POLL = 1.0
#: The same reason for failed new logins is repeated at most this often.
FAILURE_REPORT_EVERY = 10.0
#: With probes and a close deadline, confirm at the latest this long before it.
CONFIRM_RESERVE = 2.0

_LOG_CHANNEL = "fwsafe.remote.ssh"
_TMPDIR_RE = re.compile(r"^/[A-Za-z0-9._/-]*fwsafe-upload\.[A-Za-z0-9]+$")
_TX_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
_REMOTE_NAMES = {"ipv4": "rules.v4", "ipv6": "rules.v6"}
_WAITING_STATES = ("preparing", "applying", "pending", "reverting")

# Remote shell programs. Fixed text, no quotes or backslashes inside (they survive any login
# shell's quoting); every variable part is a positional parameter.
_MKTEMP_SCRIPT = 'umask 077 && mktemp -d "${TMPDIR:-/tmp}/fwsafe-upload.XXXXXXXXXX"'
_UPLOAD_SCRIPT = 'umask 077 && cat >"$1"'
# Run the apply immune to SIGHUP (a dropped session must not stop it half-way) and leave its
# result in the upload directory: a later login can read it if this connection is lost.
_APPLY_SCRIPT = (
    'trap "" HUP; d=$1; shift; "$@" >"$d/out.json" 2>"$d/err.txt"; rc=$?; '
    'echo "$rc" >"$d/rc.tmp" && mv "$d/rc.tmp" "$d/rc"; rm -f "$d/rules.v4" "$d/rules.v6"; '
    'cat "$d/out.json"; cat "$d/err.txt" >&2; exit "$rc"'
)
_READ_RESULT_SCRIPT = (
    'd=$1; test -f "$d/rc" || exit 99; cat "$d/rc"; cat "$d/out.json"; cat "$d/err.txt" >&2'
)
_RUN_AND_CLEAN_SCRIPT = 'd=$1; shift; "$@"; rc=$?; test -n "$d" && rm -rf "$d"; exit "$rc"'
_NOT_YET = 99
#: A marker result of `read_outcome`: go back to confirming.
_BACK_TO_CONFIRMING: dict[str, Any] = {}


class SSHConnectError(RejectedError):
    """The host could not be reached or logged into before anything was changed."""


class RemoteCommandError(RejectedError):
    """fwsafe on the host could not be run, or failed before changing anything."""


@dataclass
class RemoteRequest:
    target: HostTarget            # fwsafe.config.HostTarget: host, port, user, key, known_hosts, name
    rules: str | None             # local IPv4 iptables-save file
    rules6: str | None            # local IPv6 file
    options: ApplyOptions         # timeout_s, probes, probe_interval, probe_failures, confirm_on_probe
    identity: str | None          # private key file; else ssh-agent / default keys (never passwords)
    known_hosts: str | None       # default ~/.ssh/known_hosts
    accept_new_host_key: bool
    remote_state_dir: str | None = None   # passed as --state-dir to the remote fwsafe (tests)
    remote_fwsafe: str = "fwsafe"


def apply_remote(req: RemoteRequest, progress: Callable[[str], None]) -> dict[str, Any]:
    """Apply on the host under its guard; confirm only through a new SSH login.

    Returns a JSON-able summary once confirmed. Raises: `HostKeyError` (exit 3, nothing
    sent), `SSHConnectError` / `RemoteCommandError` / `InvalidRulesError` (exit 3, nothing
    changed), `PendingError` (6), `RevertedError` (4: reverted, with the host's reason),
    `RevertFailedError` (5: the revert failed, or the state could not be known).
    """
    return _RemoteApply(req, progress).run()


def probe_settle_s(options: ApplyOptions) -> float:
    """How long the guard's probes need to revert a change they keep failing on.

    A round lasts max(interval, probe timeout); `probe_failures` failing rounds in a row
    revert. One round and a second more are allowed for slack. 0 without probes.
    """
    if not options.probes:
        return 0.0
    round_s = max(options.probe_interval, options.probe_timeout)
    return (options.probe_failures + 1) * round_s + 1.0


# --------------------------------------------------------------------------------------------
# SSH plumbing
# --------------------------------------------------------------------------------------------


class _AttemptFailed(Exception):
    """One connection attempt failed; `message` says why (user-facing)."""

    def __init__(self, message: str, *, auth: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.auth = auth


def _ssh_errors() -> tuple[type[BaseException], ...]:
    """What a broken SSH connection raises while it is used."""
    import paramiko

    return (paramiko.SSHException, OSError, EOFError)


def _log_channel() -> str:
    logger = logging.getLogger(_LOG_CHANNEL)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    return _LOG_CHANNEL


def _os_error_text(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:.1f}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


class _Watchdog:
    """Shuts a socket down when its time is up, which wakes paramiko's threads blocked on it."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock: socket.socket | None = sock
        self.fired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.001), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self.sock is None:
                return
            self.fired = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        with self._lock:
            self.sock = None
            self._timer.cancel()


@dataclass
class _Result:
    """A finished (or abandoned) remote command. `rc` None: no exit status came back."""

    rc: int | None
    out: bytes
    err: bytes

    def json(self) -> dict[str, Any] | None:
        return _last_json(self.out)

    def stderr_tail(self) -> str:
        lines = [ln.strip() for ln in self.err.decode("utf-8", "replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return " | ".join(lines[-3:])


def _last_json(data: bytes) -> dict[str, Any] | None:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


class _Command:
    """A command running on a channel; `poll()` drains its output without blocking."""

    def __init__(self, transport: Any, command: str, stdin: bytes | None = None) -> None:
        self.channel = transport.open_session(timeout=10.0)
        self.channel.settimeout(10.0)
        self.channel.exec_command(command)
        if stdin is not None:
            self.channel.sendall(stdin)
        self.channel.shutdown_write()  # the remote command reads nothing more
        self.out = bytearray()
        self.err = bytearray()
        self._status_seen: float | None = None

    def poll(self) -> _Result | None:
        """The result once the command has exited and its output is in; else None."""
        channel = self.channel
        while channel.recv_ready():
            self.out += channel.recv(65536)
        while channel.recv_stderr_ready():
            self.err += channel.recv_stderr(65536)
        if channel.exit_status_ready():
            now = time.monotonic()
            if self._status_seen is None:
                self._status_seen = now
            drained = channel.eof_received or channel.closed
            if (drained or now - self._status_seen > 1.0) and not (
                    channel.recv_ready() or channel.recv_stderr_ready()):
                return _Result(channel.recv_exit_status(), bytes(self.out), bytes(self.err))
        elif channel.closed:
            return _Result(None, bytes(self.out), bytes(self.err))
        return None

    def wait(self, limit: float, *, give_up: bool = True) -> _Result | None:
        """Wait up to `limit` seconds for the result. Then, with `give_up`, close the channel
        and return rc None; without, return None and leave the command running."""
        end = time.monotonic() + limit
        while True:
            result = self.poll()
            if result is not None:
                return result
            if not self.channel.get_transport().is_active():
                return _Result(None, bytes(self.out), bytes(self.err))
            if time.monotonic() >= end:
                if not give_up:
                    return None
                self.close()
                return _Result(None, bytes(self.out), bytes(self.err))
            time.sleep(0.005)

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001 - closing a broken channel must not raise
            pass


class _Connection:
    """One SSH login: its own TCP connection, paramiko transport and client."""

    def __init__(self, client: Any, sock: socket.socket, tcp_s: float, login_s: float,
                 server_key: Any) -> None:
        self.client = client
        self.sock = sock
        self.tcp_s = tcp_s
        self.login_s = login_s
        self.server_key = server_key

    @property
    def transport(self) -> Any:
        return self.client.get_transport()

    def start(self, command: str, stdin: bytes | None = None) -> _Command:
        return _Command(self.transport, command, stdin)

    def run(self, command: str, limit: float, stdin: bytes | None = None) -> _Result:
        result = self.start(command, stdin).wait(limit)
        assert result is not None
        return result

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.sock.close()

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sh(script: str, *args: str) -> str:
    """A remote command line: ``sh -c SCRIPT NAME ARGS...`` (no shell syntax from the args)."""
    return shlex.join(["sh", "-c", script, "fwsafe-remote", *args])


# --------------------------------------------------------------------------------------------
# The workflow
# --------------------------------------------------------------------------------------------


class _RemoteApply:
    def __init__(self, req: RemoteRequest, progress: Callable[[str], None]) -> None:
        self.req = req
        self.target = req.target
        self.where = str(req.target)
        self._progress = progress
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}
        self.known: KnownHosts | None = None
        self.tmpdir: str | None = None
        self.tx_id: str | None = None
        self.deadline: float | None = None     # local monotonic time of the host's deadline
        self.sent_at: float | None = None      # when the apply command was sent
        self.armed: dict[str, Any] = {}
        self.attempts = 0
        self.last_failure: str | None = None
        self.apply_cmd: _Command | None = None
        self.first: _Connection | None = None
        self.first_login_s: float | None = None
        self._last_report = 0.0
        self.local_paths: dict[str, str] = {}

    # -- small helpers ------------------------------------------------------------------------
    def say(self, message: str) -> None:
        try:
            self._progress(message)
        except Exception:  # noqa: BLE001 - progress output must never stop a confirmation
            pass

    def mark(self, name: str) -> float:
        elapsed = round(time.monotonic() - self.start, 3)
        self.timings[name] = elapsed
        return elapsed

    def fw(self, *args: str) -> list[str]:
        argv = [self.req.remote_fwsafe, *args]
        if self.req.remote_state_dir:
            argv += ["--state-dir", self.req.remote_state_dir]
        return argv

    def localize(self, text: str) -> str:
        """Put the local file names back into a message from the host."""
        if self.tmpdir:
            for layer, name in _REMOTE_NAMES.items():
                local = self.local_paths.get(layer)
                if local:
                    text = text.replace(f"{self.tmpdir}/{name}", local)
        return text

    # -- connecting -----------------------------------------------------------------------------
    def connect(self, budget: float, *, tcp_timeout: float) -> _Connection:
        """A new TCP connection and a new SSH login (host key checked) within `budget` s.

        Raises HostKeyError for a refused host key, _AttemptFailed for anything else.
        """
        import paramiko

        assert self.known is not None
        target = self.target
        end = time.monotonic() + budget
        began = time.monotonic()
        connect_timeout = max(min(tcp_timeout, budget), 0.05)
        try:
            sock = socket.create_connection((target.host, target.port), timeout=connect_timeout)
        except (OSError, ValueError) as exc:
            raise _AttemptFailed(
                f"TCP connect to {target.hostport}: {_os_error_text(exc, connect_timeout)}"
            ) from None
        tcp_s = time.monotonic() - began
        watchdog = _Watchdog(sock, end - time.monotonic())
        client = paramiko.SSHClient()
        client.set_log_channel(_log_channel())
        self.known.prepare(client, target.host, target.port,
                           accept_new=self.req.accept_new_host_key, on_accept=self.say)
        identity = self.req.identity
        try:
            left = max(end - time.monotonic(), 0.05)
            client.connect(
                target.host, port=target.port, username=target.user, password=None,
                key_filename=identity, allow_agent=identity is None,
                look_for_keys=identity is None, sock=sock, timeout=left,
                banner_timeout=left, auth_timeout=left, channel_timeout=left,
            )
        except BaseException as exc:
            watchdog.cancel()
            client.close()
            sock.close()
            typed = self.known.translate(exc, target.host, target.port)
            if typed is not None:
                raise typed from None
            if not isinstance(exc, Exception):
                raise
            raise self._login_failure(exc, watchdog.fired, budget) from None
        watchdog.cancel()
        return _Connection(client, sock, tcp_s, time.monotonic() - began,
                           client.get_transport().get_remote_server_key())

    def _login_failure(self, exc: Exception, timed_out: bool, budget: float) -> _AttemptFailed:
        import paramiko

        where = self.where
        if timed_out:
            return _AttemptFailed(f"SSH login to {where} timed out after {budget:.1f}s")
        if isinstance(exc, paramiko.PasswordRequiredException):
            return _AttemptFailed(
                f"the key {self.req.identity} is protected by a passphrase: load it into "
                "ssh-agent (ssh-add) and leave out -i", auth=True)
        if isinstance(exc, paramiko.AuthenticationException):
            return _AttemptFailed(f"SSH login to {where} refused: {exc}", auth=True)
        if isinstance(exc, OSError):
            return _AttemptFailed(f"SSH login to {where}: {_os_error_text(exc, budget)}")
        text = str(exc) or type(exc).__name__
        if "No authentication methods available" in text:
            return _AttemptFailed(
                "no SSH key to offer (give -i KEY, or load a key into ssh-agent); "
                "passwords are never used", auth=True)
        return _AttemptFailed(f"SSH login to {where} failed: {text}")

    # -- the steps --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        contents = self.read_local()
        self.known = KnownHosts(self.req.known_hosts)
        self.say(f"connecting to {self.where} (host keys: {self.known.path})")
        try:
            self.first = self.connect(FIRST_CONNECT_TIMEOUT, tcp_timeout=FIRST_CONNECT_TIMEOUT)
        except _AttemptFailed as exc:
            hint = ("check -i KEY / ssh-agent and the user name" if exc.auth
                    else "check the host name, port and network")
            raise SSHConnectError(f"cannot connect to {self.where}: {exc.message}; nothing was "
                                  "changed", hint=hint) from None
        try:
            self.say(f"connected to {self.where} "
                     f"(host key {describe_key(self.first.server_key)}); "
                     f"login took {self.first.login_s * 1000:.0f} ms")
            self.mark("connected_s")
            self.first_login_s = self.first.login_s
            self.tmpdir = self.make_tmpdir()
            self.upload(contents)
            self.start_apply()
            try:
                return self.confirm_or_report()
            except KeyboardInterrupt as exc:
                if self.tx_id:
                    # The change is live and will not be confirmed from here: exit 4, as the
                    # guard reverts it (exit 3 would claim that nothing changed).
                    raise RevertedError(
                        f"interrupted: not confirmed; the guard on {self.where} reverts "
                        f"transaction {self.tx_id} at its deadline",
                        hint="to keep it, run `fwsafe confirm` there from a NEW SSH session",
                    ) from exc
                raise
        finally:
            if self.apply_cmd is not None:
                self.apply_cmd.close()
            if self.first is not None:
                self.first.close()

    def read_local(self) -> dict[str, bytes]:
        contents: dict[str, bytes] = {}
        for layer, path in (("ipv4", self.req.rules), ("ipv6", self.req.rules6)):
            if path:
                contents[layer] = read_rules_file(path)
                self.local_paths[layer] = path
        if not contents:
            raise UsageError("give RULES (IPv4) and/or --rules6 RULES6")
        return contents

    def make_tmpdir(self) -> str:
        assert self.first is not None
        try:
            result = self.first.run(_sh(_MKTEMP_SCRIPT), COMMAND_TIMEOUT)
        except _ssh_errors() as exc:
            raise RemoteCommandError(
                f"cannot run commands on {self.where}: {exc}; nothing was changed") from None
        path = result.out.decode("utf-8", "replace").strip()
        if result.rc != 0 or not _TMPDIR_RE.match(path):
            why = result.stderr_tail() or f"exit status {result.rc}, output {path[:80]!r}"
            raise RemoteCommandError(
                f"cannot make a private upload directory on {self.where} (mktemp -d): {why}; "
                "nothing was changed")
        return path

    def upload(self, contents: dict[str, bytes]) -> None:
        import paramiko

        assert self.first is not None and self.tmpdir is not None
        names = {f"{self.tmpdir}/{_REMOTE_NAMES[layer]}": data for layer, data in contents.items()}
        how = "SFTP"
        try:
            try:
                sftp = self.first.client.open_sftp()
            except paramiko.SSHException:
                sftp = None
            if sftp is not None:
                try:
                    sftp.get_channel().settimeout(UPLOAD_TIMEOUT)
                    for path, data in names.items():
                        sftp.putfo(io.BytesIO(data), path)
                        sftp.chmod(path, 0o600)
                finally:
                    sftp.close()
            else:
                how = "cat (the host offers no SFTP)"
                for path, data in names.items():
                    result = self.first.run(_sh(_UPLOAD_SCRIPT, path), UPLOAD_TIMEOUT, stdin=data)
                    if result.rc != 0:
                        raise OSError(result.stderr_tail() or f"exit status {result.rc}")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.cleanup_over_first()
            raise RemoteCommandError(
                f"upload to {self.where} failed: {exc}; nothing was changed") from None
        size = sum(len(data) for data in contents.values())
        self.mark("uploaded_s")
        self.say(f"uploaded {', '.join(sorted(contents))} rules ({size} bytes) to "
                 f"{self.where}:{self.tmpdir} via {how}")

    def cleanup_over_first(self) -> None:
        if self.first is None or self.tmpdir is None:
            return
        try:
            self.first.run(_sh(_RUN_AND_CLEAN_SCRIPT, self.tmpdir, "true"), COMMAND_TIMEOUT)
        except Exception:  # noqa: BLE001 - best effort; later logins clean up too
            pass

    def apply_argv(self) -> list[str]:
        assert self.tmpdir is not None
        options = self.req.options
        argv = ["apply", "--detach", "--json", "--timeout", repr(float(options.timeout_s))]
        if options.force:
            argv.append("--force")
        if options.partial:
            argv.append("--partial")
        if not options.check:
            argv.append("--no-check")
        for url in options.probes:
            argv += ["--probe", url]
        if options.probes:
            argv += ["--probe-interval", repr(float(options.probe_interval)),
                     "--probe-failures", str(int(options.probe_failures)),
                     "--probe-timeout", repr(float(options.probe_timeout))]
            if options.confirm_on_probe:
                argv += ["--confirm-on-probe", str(int(options.confirm_on_probe))]
        argv = self.fw(*argv)
        if "ipv4" in self.local_paths:
            argv.append(f"{self.tmpdir}/{_REMOTE_NAMES['ipv4']}")
        if "ipv6" in self.local_paths:
            argv += ["--rules6", f"{self.tmpdir}/{_REMOTE_NAMES['ipv6']}"]
        return argv

    def start_apply(self) -> None:
        """Run the apply over the first connection; take its result if it comes back soon."""
        assert self.first is not None and self.tmpdir is not None
        command = _sh(_APPLY_SCRIPT, self.tmpdir, *self.apply_argv())
        self.sent_at = time.monotonic()
        try:
            self.apply_cmd = self.first.start(command)
        except _ssh_errors() as exc:
            raise RemoteCommandError(
                f"cannot run fwsafe on {self.where}: {exc}; nothing was changed") from None
        quiet_limit = min(APPLY_QUIET_MAX, max(APPLY_QUIET_MIN, self.req.options.timeout_s / 3))
        try:
            result = self.apply_cmd.wait(quiet_limit, give_up=False)
        except _ssh_errors():
            result = _Result(None, b"", b"")  # the connection broke: new logins will tell
        if result is not None:
            self.apply_cmd = None  # finished, or its connection is gone
        if result is not None and result.rc is not None:
            self.take_apply_result(result, via_first=True)
            first, self.first = self.first, None
            if first is not None:
                first.close()  # from here on only new logins count
            return
        self.say(f"the connection that ran the apply went silent (no result within "
                 f"{quiet_limit:.1f} s); looking for the result through new logins")

    def take_apply_result(self, result: _Result, *, via_first: bool, late: bool = False) -> None:
        """Record the armed transaction, or raise the typed error for a refused apply.

        `late`: the result was read from the host's files through a later login; its
        `remaining_s` is stale then, and the caller asks the host for the current deadline.
        """
        data = result.json()
        if result.rc == 0 and data and isinstance(data.get("id"), str) and \
                _TX_ID_RE.match(data["id"]) and data.get("state") == "pending":
            self.tx_id = data["id"]
            self.armed = data
            if late:
                self.say(f"the apply on {self.where} had armed transaction {self.tx_id} "
                         f"(guard PID {data.get('guard_pid')}); learned through a new login")
                return
            remaining = data.get("remaining_s")
            if not isinstance(remaining, (int, float)):
                deadline = data.get("deadline")
                remaining = (float(deadline) - time.time()
                             if isinstance(deadline, (int, float)) else self.req.options.timeout_s)
            self.deadline = time.monotonic() + float(remaining)
            armed_s = self.mark("armed_s")
            shield = "" if data.get("shielded") is not False else \
                f"; warning: the guard is NOT shielded from the OOM killer ({data.get('shield_error')})"
            self.say(f"armed: the guard on {self.where} (PID {data.get('guard_pid')}) reverts "
                     f"transaction {self.tx_id} in {float(remaining):.1f} s unless confirmed{shield}")
            self.say(f"applied: {', '.join(data.get('layers') or [])} rules are live on "
                     f"{self.where} ({armed_s:.2f} s after start)")
            return
        if via_first:
            self.cleanup_over_first()
        raise self.remote_error(result, data, "apply")

    def remote_error(self, result: _Result, data: dict[str, Any] | None,
                     what: str) -> FwsafeError:
        rc = result.rc
        message = str(data.get("error")) if data and data.get("error") else (
            result.stderr_tail() or f"exit status {rc}")
        message = self.localize(message.removeprefix("fwsafe: error: "))
        hint = self.localize(str(data["hint"])) if data and data.get("hint") else None
        kind = str(data.get("kind")) if data and data.get("kind") else None
        text = f"{self.where}: {message}"
        if rc == 2:
            return UsageError(text, hint=hint)
        if rc == 3:
            if kind in (None, "InvalidRulesError"):
                return InvalidRulesError(text, hint=hint or "nothing was changed")
            return RejectedError(text, hint=hint or "nothing was changed")
        if rc == 4:
            return RevertedError(text, hint=hint)
        if rc == 5:
            return RevertFailedError(text, hint=hint)
        if rc == 6:
            return PendingError(text, hint=hint)
        if rc == 127:
            return RemoteCommandError(
                f"{self.req.remote_fwsafe!r} was not found on {self.where} (exit 127): "
                f"{result.stderr_tail()}; nothing was changed",
                hint="install fwsafe on the host (root's PATH)")
        return RemoteCommandError(
            f"fwsafe {what} on {self.where} failed (exit {rc}): {message}",
            hint="if it had applied anything, its guard reverts it unless confirmed; "
                 "check `fwsafe status` on the host")

    # -- waiting for a new login ------------------------------------------------------------------
    def stop_at(self) -> float:
        """Until when new logins may try to confirm (local monotonic time)."""
        if self.deadline is not None:
            return self.deadline - DEADLINE_MARGIN
        assert self.sent_at is not None  # unknown result: the deadline is at least this late
        return self.sent_at + self.req.options.timeout_s - DEADLINE_MARGIN

    def confirm_or_report(self) -> dict[str, Any]:
        settle = probe_settle_s(self.req.options)
        settle_until: float | None = None
        self.say(f"probing: opening NEW SSH connections to {self.where} (TCP connect, then a "
                 "full login with a new client); only such a login confirms")
        while True:
            now = time.monotonic()
            if self.tx_id is None:
                self.poll_apply()
            if self.tx_id is not None and settle_until is None:
                settle_until = self._settle_until(settle)
            stop_at = self.stop_at()
            budget = min(ATTEMPT_TIMEOUT, stop_at - now)
            if budget < MIN_ATTEMPT:
                break
            self.attempts += 1
            number = self.attempts
            try:
                conn = self.connect(budget, tcp_timeout=TCP_TIMEOUT)
            except (_AttemptFailed, HostKeyError) as exc:
                self.report_failure(number, exc.message)
                self._pause(stop_at)
                continue
            try:
                with conn:
                    outcome, wait = self.over_new_login(conn, number, settle_until)
            except _ssh_errors() as exc:
                self.last_failure = f"new login #{number} broke off: {exc or type(exc).__name__}"
                self.say(self.last_failure)
                self._pause(stop_at)
                continue
            if outcome is not None:
                return outcome
            time.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
        self.say("no new SSH login confirmed before the deadline"
                 + (f" (last: {self.last_failure})" if self.last_failure else "")
                 + f"; the guard on {self.where} reverts the change by itself")
        return self.await_outcome()

    def report_failure(self, number: int, text: str) -> None:
        """Say why a new login failed: at once when the reason changes, else every 10 s."""
        now = time.monotonic()
        if text != self.last_failure or now - self._last_report >= FAILURE_REPORT_EVERY:
            self.say(f"new login #{number} failed: {text}")
            self._last_report = now
        self.last_failure = text

    def over_new_login(self, conn: _Connection, number: int,
                       settle_until: float | None) -> tuple[dict[str, Any] | None, float]:
        """Use one new login: learn the transaction, watch the probes settle, or confirm.

        Returns the final result (or None) and how long to wait before the next login.
        """
        if "first_new_login_s" not in self.timings and self.tx_id is not None:
            self.mark("first_new_login_s")
        self.say(f"new login #{number} got in (TCP {conn.tcp_s * 1000:.0f} ms, "
                 f"login {conn.login_s * 1000:.0f} ms)")
        if self.tx_id is None:
            # This login may predate the change: it only tells us the transaction.
            self.learn_result(conn)
            return None, 0.0
        assert settle_until is not None
        if time.monotonic() < settle_until:
            outcome = self.settle_status(conn)
            return outcome, max(0.0, min(SETTLE_POLL, settle_until - time.monotonic()))
        return self.confirm_over(conn), RETRY_PAUSE

    def _settle_until(self, settle: float) -> float:
        now = time.monotonic()
        if settle <= 0:
            return now
        # Leave enough time for a login and the confirm (a few first logins' worth).
        assert self.first_login_s is not None
        reserve = min(ATTEMPT_TIMEOUT, max(CONFIRM_RESERVE, 4 * self.first_login_s))
        latest = self.stop_at() - reserve
        until = min(now + settle, latest)
        if until < now + settle:
            self.say(f"the probes need about {settle:.0f} s to decide but the deadline is "
                     f"closer: confirming at the latest {max(until - now, 0):.0f} s from now")
        else:
            self.say(f"letting the guard's probes run for {settle:.0f} s before confirming")
        return until

    def _pause(self, stop_at: float) -> None:
        time.sleep(max(0.0, min(RETRY_PAUSE, stop_at - time.monotonic())))

    def poll_apply(self) -> None:
        """With the result unknown: has the first connection's apply answered meanwhile?"""
        if self.apply_cmd is None:
            return
        try:
            result = self.apply_cmd.poll()
        except Exception:  # noqa: BLE001 - a dead channel: the new logins will tell
            self.apply_cmd = None
            return
        if result is None:
            return
        self.apply_cmd = None
        if result.rc is not None:
            self.take_apply_result(result, via_first=False, late=True)

    def learn_result(self, conn: _Connection) -> None:
        """Read the apply's result left in the upload directory (if it has finished)."""
        assert self.tmpdir is not None
        result = conn.run(_sh(_READ_RESULT_SCRIPT, self.tmpdir), REMOTE_QUERY_TIMEOUT)
        if result.rc == _NOT_YET or result.rc is None:
            self.say("the apply has not finished on the host yet")
            return
        first_line, _, rest = result.out.partition(b"\n")
        try:
            rc = int(first_line.strip())
        except ValueError:
            return
        try:
            self.take_apply_result(_Result(rc, rest, result.err), via_first=False, late=True)
        except FwsafeError:
            self.cleanup(conn)
            raise
        status = self.query(conn, "status")
        remaining = status.get("remaining_s") if status else None
        if self.tx_id and status and status.get("id") == self.tx_id and \
                isinstance(remaining, (int, float)):
            self.deadline = time.monotonic() + float(remaining)

    def cleanup(self, conn: _Connection) -> None:
        """Remove the upload directory over `conn` (best effort)."""
        if self.tmpdir is None:
            return
        try:
            conn.run(_sh(_RUN_AND_CLEAN_SCRIPT, self.tmpdir, "true"), COMMAND_TIMEOUT)
            self.tmpdir = None
        except Exception:  # noqa: BLE001 - a leftover directory in /tmp is no reason to fail
            pass

    def query(self, conn: _Connection, *args: str, clean: bool = False) -> dict[str, Any] | None:
        """Run `fwsafe ARGS --json` over `conn`; its JSON output (None if there is none)."""
        result = self.query_result(conn, *args, clean=clean)
        return result.json()

    def query_result(self, conn: _Connection, *args: str, clean: bool = False) -> _Result:
        argv = self.fw(*args, "--json")
        command = (_sh(_RUN_AND_CLEAN_SCRIPT, self.tmpdir, *argv) if clean and self.tmpdir
                   else shlex.join(argv))
        return conn.run(command, REMOTE_QUERY_TIMEOUT)

    def settle_status(self, conn: _Connection) -> dict[str, Any] | None:
        """While the probes settle: stop at once if the guard already decided."""
        status = self.query(conn, "status")
        if status is None or status.get("id") != self.tx_id:
            return None
        if status.get("state") in _WAITING_STATES:
            return None
        return self.final(status, conn)

    def confirm_over(self, conn: _Connection) -> dict[str, Any] | None:
        """`fwsafe confirm ID` over a new login. None: try again with another login."""
        assert self.tx_id is not None
        result = self.query_result(conn, "confirm", self.tx_id, clean=True)
        data = result.json()
        if result.rc == 0 and data and data.get("state") == "confirmed":
            self.tmpdir = None  # removed by the confirm command
            return self.success(data, conn, how="through a new SSH login")
        if result.rc in (4, 5):
            status = self.query(conn, "status")
            if status and status.get("id") == self.tx_id and \
                    status.get("state") not in _WAITING_STATES:
                return self.final(status, conn)
            raise self.remote_error(result, data, "confirm")
        why = (data or {}).get("error") or result.stderr_tail() or f"exit status {result.rc}"
        self.last_failure = f"fwsafe confirm: {why}"
        self.say(f"confirm over the new login did not succeed ({why}); trying again")
        return None

    def success(self, data: dict[str, Any], conn: _Connection | None, *,
                how: str) -> dict[str, Any]:
        confirmed_s = self.mark("confirmed_s")
        reason = data.get("reason")
        self.say(f"confirmed {how}: transaction {self.tx_id} stays on {self.where} "
                 f"({confirmed_s:.2f} s after start)")
        return {
            "ok": True,
            "id": self.tx_id,
            "state": "confirmed",
            "host": self.where,
            "confirmed_via": how,
            "reason": reason,
            "login_attempts": self.attempts,
            "probe_settle_s": probe_settle_s(self.req.options),
            **self.timings,
            "armed": self.armed,
            "remote": data,
        }

    def final(self, status: dict[str, Any], conn: _Connection | None) -> dict[str, Any]:
        """Turn the host's final state of our transaction into a result or a typed error."""
        state = status.get("state")
        reason = status.get("reason") or "no reason recorded"
        if conn is not None:
            self.cleanup(conn)
        if state == "confirmed":
            return self.success(status, conn, how=f"on the host ({reason})")
        if state == "reverted":
            self.mark("reverted_s")
            tail = ""
            if self.last_failure and self.timings.get("first_new_login_s") is None:
                tail = f"; no new SSH login got through (last attempt: {self.last_failure})"
            self.say(f"reverted: transaction {self.tx_id} on {self.where}: {reason}")
            raise RevertedError(
                f"the change was reverted on {self.where} (transaction {self.tx_id}): "
                f"{reason}{tail}",
                hint="the rules from before the change are back in force there")
        if state == "revert_failed":
            raise RevertFailedError(
                f"the revert FAILED on {self.where} (transaction {self.tx_id}): "
                f"{status.get('error') or reason}; the firewall may hold the new rules",
                hint="log in (console if need be) and run `fwsafe recover`; check iptables-save")
        if state in ("rejected", "aborted"):
            raise RejectedError(f"{self.where}: transaction {self.tx_id} was {state}: {reason}",
                                hint="nothing was changed")
        raise RevertFailedError(
            f"transaction {self.tx_id} on {self.where} is {state!r}: state unknown",
            hint="check `fwsafe status` on the host")

    # -- after the deadline -----------------------------------------------------------------------
    def await_outcome(self) -> dict[str, Any]:
        """Wait (bounded) until SSH answers again and report what the guard did."""
        deadline = self.deadline if self.deadline is not None else self.stop_at() + DEADLINE_MARGIN
        end = deadline + AFTER_DEADLINE_S
        self.say(f"waiting for SSH on {self.where} to answer again (at most "
                 f"{AFTER_DEADLINE_S:.0f} s after the deadline)")
        last = "no attempt yet"
        while True:
            now = time.monotonic()
            budget = min(ATTEMPT_TIMEOUT, end - now)
            if budget < MIN_ATTEMPT:
                break
            try:
                conn = self.connect(budget, tcp_timeout=WAIT_TCP_TIMEOUT)
            except (_AttemptFailed, HostKeyError) as exc:
                last = exc.message
                time.sleep(max(0.0, min(0.1, end - time.monotonic())))
                continue
            try:
                with conn:
                    if "answered_s" not in self.timings:
                        self.mark("answered_s")
                    outcome, last = self.read_outcome(conn, deadline)
            except _ssh_errors() as exc:
                last = f"a login broke off: {exc or type(exc).__name__}"
                outcome = None
            if outcome is _BACK_TO_CONFIRMING:
                # The apply finished late and its deadline is still ahead: back to confirming
                # through (another) new login.
                return self.confirm_or_report()
            if outcome is not None:
                return outcome
            time.sleep(0.2)
        raise RevertFailedError(
            f"{self.where} did not answer SSH again within {AFTER_DEADLINE_S:.0f} s after the "
            f"deadline (last: {last}); whether transaction {self.tx_id or '?'} was reverted is "
            "unknown",
            hint="reach the host another way (console) and check `fwsafe status`")

    def read_outcome(self, conn: _Connection,
                     deadline: float) -> tuple[dict[str, Any] | None, str]:
        """After the deadline, over a login that got in: the final result, or None and why
        not yet. Raises the typed error for a reverted (or failed) transaction."""
        if self.tx_id is None:
            self.learn_result(conn)
            if self.tx_id is not None and self.deadline is not None and \
                    self.deadline - time.monotonic() > DEADLINE_MARGIN + ATTEMPT_TIMEOUT:
                return _BACK_TO_CONFIRMING, "the transaction is still pending"
        status = self.query(conn, "status", clean=self.tx_id is not None)
        if status is None:
            return None, "fwsafe status gave no answer"
        if self.tx_id is None:
            self._unknown_transaction(status)
            return None, "the apply has not reported back yet"
        if status.get("id") != self.tx_id:
            raise RevertFailedError(
                f"transaction {self.tx_id} is no longer the current one on {self.where} "
                f"(now {status.get('id')}: {status.get('state')}); its outcome is unknown",
                hint="check `fwsafe status` and the firewall on the host")
        if status.get("state") not in _WAITING_STATES:
            self.tmpdir = None  # removed by the status command
            return self.final(status, conn), "final"
        if status.get("guard_alive") is False and time.monotonic() > deadline + 5:
            raise RevertFailedError(
                f"transaction {self.tx_id} on {self.where} is still {status.get('state')} but "
                "its guard is gone: the change was NOT reverted",
                hint="log in and run `fwsafe recover` (or confirm it)")
        return None, f"transaction {self.tx_id} is still {status.get('state')}"

    def _unknown_transaction(self, status: dict[str, Any]) -> None:
        if status.get("state") in _WAITING_STATES:
            return
        raise RevertFailedError(
            f"the apply on {self.where} never reported back; `fwsafe status` there shows "
            f"transaction {status.get('id')}: {status.get('state')} ({status.get('reason')}); "
            "the outcome of this apply is unknown",
            hint="check `fwsafe status` and the firewall on the host")
