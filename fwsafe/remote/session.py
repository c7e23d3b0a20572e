"""The SSH plumbing of `fwsafe apply --host` (paramiko, imported only where it is used).

* `Dialer.connect`: a NEW TCP connection and a NEW SSH login - keys and ssh-agent only, never
  passwords - with the host key checked against known_hosts (`fwsafe.remote.hostkeys`)
  before anything is sent, all within a time budget;
* `Connection`: one such login; `run` or `start` a command over it (`RemoteCommand`, whose
  end is a `RemoteResult`), then `close` it. Every step over it runs under an overall limit
  (`Connection.bounded`): paramiko's own waits (the exec reply, SFTP answers, a send window)
  have none, so the socket is shut down when the limit passes and the step raises
  `StepTimedOut`. This works the same with every paramiko version fwsafe supports;
* `ssh_errors`: what a connection that breaks while it is used raises.

paramiko logs to `LOG_CHANNEL`, which has a NullHandler: its tracebacks (e.g. after a
timeout shut a socket down) stay off stderr unless the application configures logging.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fwsafe.core.config import HostTarget
from fwsafe.core.probe_kinds import SocketDeadline, describe_os_error, ssh_log_channel
from fwsafe.remote import timing
from fwsafe.remote.hostkeys import KnownHosts
from fwsafe.remote.signals import Interrupts
from fwsafe.sshcompat import channel_timeout

__all__ = [
    "LOG_CHANNEL",
    "AttemptFailed",
    "Connection",
    "Dialer",
    "RemoteCommand",
    "RemoteResult",
    "StepTimedOut",
    "os_error_text",
    "ssh_errors",
]

LOG_CHANNEL = "fwsafe.remote.ssh"


class AttemptFailed(Exception):
    """One connection attempt failed; `message` says why (user-facing)."""

    def __init__(self, message: str, *, auth: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.auth = auth


def ssh_errors() -> tuple[type[BaseException], ...]:
    """What a broken SSH connection raises while it is used."""
    # paramiko takes long to import: loaded only when an SSH connection is made
    import paramiko

    return (paramiko.SSHException, OSError, EOFError)


def os_error_text(exc: BaseException, timeout: float) -> str:
    """Why a connection failed, for messages about a host (timeouts to a tenth of a second)."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:.1f}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    return describe_os_error(exc, timeout)


@dataclass
class RemoteResult:
    """A finished (or abandoned) remote command. `rc` None: no exit status came back."""

    rc: int | None
    out: bytes
    err: bytes

    def json(self) -> dict[str, Any] | None:
        """The last line of the output that is a JSON object (None if there is none)."""
        for line in reversed(self.out.decode("utf-8", "replace").splitlines()):
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

    def stderr_tail(self) -> str:
        """The last three non-blank lines of stderr, joined with `` | ``."""
        lines = [ln.strip() for ln in self.err.decode("utf-8", "replace").splitlines()]
        lines = [ln for ln in lines if ln]
        return " | ".join(lines[-3:])


class StepTimedOut(TimeoutError):
    """A remote step did not finish within its overall limit; its connection was shut down."""


class RemoteCommand:
    """A command on a new channel of `conn`. `start` it (bounded), then `poll()` drains its
    output without blocking, or `wait` for its end.

    `sent` becomes true just before the exec request goes out: from then on the host may be
    running the command, whatever happens to the connection.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.channel: Any = None
        self.sent = False
        self.out = bytearray()
        self.err = bytearray()
        self._status_seen: float | None = None

    def start(self, command: str, stdin: bytes | None, limit: float) -> RemoteCommand:
        """Open a channel and run `command` (feeding it `stdin`), all within `limit` seconds:
        paramiko's own wait for the exec reply has no limit, so the connection is shut down
        when it passes (`StepTimedOut`)."""
        self.conn.interrupts.check()  # Ctrl-C before a command starts: it does not start
        with self.conn.bounded(limit, "running a command"):
            channel = self.conn.transport.open_session(timeout=max(limit, 0.05))
            self.channel = channel
            self.sent = True
            channel.exec_command(command)
            if stdin is not None:
                channel.sendall(stdin)
            channel.shutdown_write()  # the remote command reads nothing more
        return self

    def poll(self) -> RemoteResult | None:
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
                return self._result(channel.recv_exit_status())
        elif channel.closed:
            return self._result(None)
        return None

    def wait(self, limit: float, *, give_up: bool = True) -> RemoteResult | None:
        """Wait up to `limit` seconds for the result. Then, with `give_up`, close the channel
        and return rc None; without, return None and leave the command running."""
        end = time.monotonic() + limit
        while True:
            result = self.poll()
            if result is not None:
                return result
            if not self.conn.active():
                return self._result(None)
            if time.monotonic() >= end:
                if not give_up:
                    return None
                self.close()
                return self._result(None)
            self.conn.interrupts.pause(0.005)

    def close(self) -> None:
        """Close the channel; a connection that cannot even take that is shut down."""
        if self.channel is None:
            return
        try:
            with self.conn.bounded(timing.CLOSE_LIMIT, "closing a channel"):
                self.channel.close()
        except Exception:  # noqa: BLE001 - closing a broken channel must not raise
            pass

    def _result(self, rc: int | None) -> RemoteResult:
        return RemoteResult(rc, bytes(self.out), bytes(self.err))


class Connection:
    """One SSH login: its own TCP connection, paramiko transport and client."""

    def __init__(self, client: Any, sock: socket.socket, tcp_s: float, login_s: float,
                 server_key: Any, interrupts: Interrupts | None = None) -> None:
        self.interrupts = interrupts or Interrupts()
        self.client = client
        self.sock = sock
        self.tcp_s = tcp_s
        self.login_s = login_s
        self.server_key = server_key

    @property
    def transport(self) -> Any:
        return self.client.get_transport()

    def active(self) -> bool:
        transport = self.client.get_transport()
        return bool(transport is not None and transport.is_active())

    @contextlib.contextmanager
    def bounded(self, limit: float, what: str) -> Iterator[SocketDeadline]:
        """Run the body within `limit` seconds: when they pass, the socket is shut down, which
        wakes every paramiko wait on this connection (the exec reply, a window to send in, an
        SFTP answer), and the body's error becomes `StepTimedOut`. The connection is
        unusable after that."""
        watchdog = SocketDeadline(max(limit, 0.05))
        watchdog.arm(self.sock)
        try:
            yield watchdog
        except Exception as exc:
            watchdog.cancel()
            if watchdog.expired:
                raise StepTimedOut(f"{what}: no answer within {limit:.1f} s") from exc
            raise
        except BaseException:
            watchdog.cancel()
            raise
        watchdog.cancel()

    def command(self) -> RemoteCommand:
        """A command not started yet (see `RemoteCommand.start`)."""
        return RemoteCommand(self)

    def start(self, command: str, limit: float, stdin: bytes | None = None) -> RemoteCommand:
        return self.command().start(command, stdin, limit)

    def run(self, command: str, limit: float, stdin: bytes | None = None) -> RemoteResult:
        """Run `command` and wait for its end, all within `limit` seconds; rc None if no exit
        status came back (`StepTimedOut` if the limit passed first)."""
        end = time.monotonic() + limit
        cmd = self.command()
        with self.bounded(limit, "a remote command") as watchdog:
            cmd.start(command, stdin, limit)
            result = cmd.wait(max(end - time.monotonic(), 0.0), give_up=False)
        if result is None or (result.rc is None and watchdog.expired):
            self.shut()
            raise StepTimedOut(f"a remote command: no answer within {limit:.1f} s")
        return result

    def shut(self) -> None:
        """Shut the socket down: every paramiko wait on it ends at once."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Dialer:
    """Opens new logins to one host: each a new TCP connection, paramiko client and transport.

    `known` checks the host key (`accept_new`: record an unknown host's key, and tell
    `on_accept`); `identity` is the only key offered, else ssh-agent and the default keys.
    `interrupts`: Ctrl-C is raised before a login starts and while a command is awaited
    (`fwsafe.remote.signals`), never inside paramiko.
    """

    def __init__(self, target: HostTarget, known: KnownHosts, *, identity: str | None,
                 accept_new: bool, on_accept: Callable[[str], None],
                 interrupts: Interrupts | None = None) -> None:
        self.interrupts = interrupts or Interrupts()
        self.target = target
        self.where = str(target)
        self.known = known
        self.identity = identity
        self.accept_new = accept_new
        self.on_accept = on_accept

    def connect(self, budget: float, *, tcp_timeout: float) -> Connection:
        """A new TCP connection and a new SSH login (host key checked) within `budget` s.

        Raises HostKeyError for a refused host key, AttemptFailed for anything else.
        """
        # paramiko takes long to import: loaded only when an SSH connection is made
        import paramiko

        target = self.target
        end = time.monotonic() + budget
        began = time.monotonic()
        connect_timeout = max(min(tcp_timeout, budget), 0.05)
        try:
            with self.interrupts.interruptible():  # no lock of paramiko's is held here
                sock = socket.create_connection((target.host, target.port),
                                                timeout=connect_timeout)
        except (OSError, ValueError) as exc:
            raise AttemptFailed(
                f"TCP connect to {target.hostport}: {os_error_text(exc, connect_timeout)}"
            ) from None
        tcp_s = time.monotonic() - began
        try:  # small requests go out at once, as with OpenSSH (no Nagle delay on a slow link)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        # Shutting the socket down at the end wakes paramiko's threads blocked on it.
        watchdog = SocketDeadline(end - time.monotonic())
        watchdog.arm(sock)
        client = paramiko.SSHClient()
        client.set_log_channel(ssh_log_channel(LOG_CHANNEL))
        self.known.prepare(client, target.host, target.port,
                           accept_new=self.accept_new, on_accept=self.on_accept)
        identity = self.identity
        try:
            left = max(end - time.monotonic(), 0.05)
            client.connect(
                target.host, port=target.port, username=target.user, password=None,
                key_filename=identity, allow_agent=identity is None,
                look_for_keys=identity is None, sock=sock, timeout=left,
                banner_timeout=left, auth_timeout=left, **channel_timeout(client, left),
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
            raise self._login_failure(exc, watchdog.expired, budget) from None
        watchdog.cancel()
        return Connection(client, sock, tcp_s, time.monotonic() - began,
                          client.get_transport().get_remote_server_key(), self.interrupts)

    def _login_failure(self, exc: Exception, timed_out: bool, budget: float) -> AttemptFailed:
        # paramiko takes long to import: loaded only when an SSH connection is made
        import paramiko

        where = self.where
        if timed_out:
            return AttemptFailed(f"SSH login to {where} timed out after {budget:.1f}s")
        if isinstance(exc, paramiko.PasswordRequiredException):
            return AttemptFailed(
                f"the key {self.identity} is protected by a passphrase: load it into "
                "ssh-agent (ssh-add) and leave out -i", auth=True)
        if isinstance(exc, paramiko.AuthenticationException):
            return AttemptFailed(f"SSH login to {where} refused: {exc}", auth=True)
        if isinstance(exc, OSError):
            return AttemptFailed(f"SSH login to {where}: {os_error_text(exc, budget)}")
        text = str(exc) or type(exc).__name__
        if "No authentication methods available" in text:
            return AttemptFailed(
                "no SSH key to offer (give -i KEY, or load a key into ssh-agent); "
                "passwords are never used", auth=True)
        return AttemptFailed(f"SSH login to {where} failed: {text}")
