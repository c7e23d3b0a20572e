"""How each probe kind is tried (fwsafe.core.probes runs them): a TCP connect, the SSH banner
and key exchange, an SSH key login, an HTTP(S) GET, a local command; and the socket deadline
that keeps each within its timeout (the remote commands use it too). A kind returns its
detail, or raises ProbeFailed with the reason a user reads.

The guard runs the probes while a change is pending, so the import is kept light: paramiko,
urllib.request and subprocess are imported only inside the functions that need them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from fwsafe.core.endpoints import format_host_port
from fwsafe.sshcompat import channel_timeout, fingerprint

if TYPE_CHECKING:
    from fwsafe.core.probes import Probe

__all__ = ["ProbeFailed", "SocketDeadline", "describe_os_error", "probe_cmd", "probe_http",
           "probe_ssh", "probe_ssh_auth", "probe_tcp", "ssh_log_channel"]

#: paramiko's log channel for probe connections (see `ssh_log_channel`).
_SSH_LOG_CHANNEL = "fwsafe.core.probes.ssh"
#: How many bytes of a would-be SSH banner line we look at.
_BANNER_MAX = 255


class ProbeFailed(Exception):
    """A probe failed (caught by `fwsafe.core.probes.run_probe`); the message is the
    user-facing error."""

    def __init__(self, error: str, detail: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail


def describe_os_error(exc: BaseException, timeout: float) -> str:
    """A short lower-case reason for a failed socket operation (`timeout`: the limit it had)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    text = str(exc) or type(exc).__name__
    return text


class SocketDeadline:
    """A hard deadline for a socket: when it passes, the socket is shut down.

    Shutting the socket down wakes up whatever thread is blocked on it (paramiko's transport
    thread, our own recv), so a probe or an SSH login cannot outlive its timeout by much.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.expired = False
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # so that `_fire` never touches a socket being closed

    def remaining(self) -> float:
        """Seconds left (at least a small positive value, for APIs that reject 0)."""
        return max(self.end - time.monotonic(), 0.001)

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def arm(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timer = threading.Timer(self.remaining(), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._sock is None:
                return  # cancelled meanwhile
            self.expired = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        """Disarm; after this returns the timer will not touch the socket any more."""
        with self._lock:
            self._sock = None
            if self._timer is not None:
                self._timer.cancel()

    def timed_out(self) -> str:
        return f"timed out after {self.timeout:g}s"


def _connect(host: str, port: int, deadline: SocketDeadline) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=deadline.remaining())
    except (OSError, ValueError) as exc:
        raise ProbeFailed(describe_os_error(exc, deadline.timeout)) from None


def probe_tcp(probe: Probe, deadline: SocketDeadline) -> str | None:
    assert probe.host is not None and probe.port is not None
    sock = _connect(probe.host, probe.port, deadline)
    try:
        peer = sock.getpeername()
        return f"connected to {format_host_port(str(peer[0]), int(peer[1]))}"
    except OSError:
        return None
    finally:
        sock.close()


def _read_banner(sock: socket.socket, deadline: SocketDeadline) -> str:
    """Peek at the server's first line (left in the socket buffer for paramiko)."""
    while True:
        if deadline.passed():
            raise ProbeFailed(f"no SSH banner: {deadline.timed_out()}")
        sock.settimeout(deadline.remaining())
        try:
            data = sock.recv(_BANNER_MAX, socket.MSG_PEEK)
        except OSError as exc:
            if deadline.expired:
                raise ProbeFailed(f"no SSH banner: {deadline.timed_out()}") from None
            why = describe_os_error(exc, deadline.timeout)
            raise ProbeFailed(f"no SSH banner: {why}") from None
        if not data:
            if deadline.expired:
                raise ProbeFailed(f"no SSH banner: {deadline.timed_out()}")
            raise ProbeFailed("connection closed before the SSH banner")
        newline = data.find(b"\n")
        if newline >= 0 or len(data) >= _BANNER_MAX:
            line = data[: newline if newline >= 0 else len(data)]
            text = line.decode("ascii", "replace").rstrip("\r")
            if not text.startswith("SSH-"):
                raise ProbeFailed(f"not an SSH server: first line is {text[:80]!r}")
            if newline < 0:
                raise ProbeFailed("SSH banner line too long")
            return text
        time.sleep(0.01)  # a partial line: wait for the rest (MSG_PEEK would not block)


def probe_ssh(probe: Probe, deadline: SocketDeadline) -> str | None:
    # paramiko takes long to import: loaded only when an SSH connection is made
    import paramiko

    assert probe.host is not None and probe.port is not None
    sock = _connect(probe.host, probe.port, deadline)
    deadline.arm(sock)
    transport: Any = None
    try:
        banner = _read_banner(sock, deadline)
        sock.settimeout(None)
        transport = paramiko.Transport(sock)
        transport.set_log_channel(ssh_log_channel())
        transport.banner_timeout = deadline.remaining()
        transport.handshake_timeout = deadline.remaining()
        try:
            transport.start_client(timeout=deadline.remaining())
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if deadline.expired or deadline.passed():
                raise ProbeFailed(f"SSH key exchange {deadline.timed_out()}", banner) from None
            raise ProbeFailed(f"SSH key exchange failed: {exc}", banner) from None
        key = transport.get_remote_server_key()
        return f"{banner}; host key {key.get_name()} {fingerprint(key)}"
    finally:
        deadline.cancel()
        if transport is not None:
            transport.close()
        sock.close()


def ssh_log_channel(name: str = _SSH_LOG_CHANNEL) -> str:
    """paramiko's logger `name` (the probes' one by default), with a NullHandler.

    The handler keeps paramiko's tracebacks (e.g. after a timeout shut the socket down) off
    stderr unless the application configures logging; records still propagate to the root.
    """
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used (by the ssh probes)
    import logging

    logger = logging.getLogger(name)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    return name


def _accept_any_policy() -> Any:
    """A paramiko host key policy that accepts any key without storing it anywhere."""
    # paramiko takes long to import: loaded only when an SSH connection is made
    import paramiko

    class _AcceptAny(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            return None

    return _AcceptAny()


def probe_ssh_auth(
    probe: Probe,
    deadline: SocketDeadline,
    *,
    key_filename: str | None,
    known_hosts: str | None,
) -> str | None:
    # paramiko takes long to import: loaded only when an SSH connection is made
    import paramiko

    assert probe.host is not None and probe.port is not None and probe.user is not None
    notes: list[str] = []
    client = paramiko.SSHClient()
    client.set_log_channel(ssh_log_channel())
    if known_hosts is not None:
        path = os.path.expanduser(known_hosts)
        try:
            client.load_host_keys(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ProbeFailed(f"cannot read known_hosts {path}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        client.set_missing_host_key_policy(_accept_any_policy())
        notes.append("host key not verified")
    key_path = os.path.expanduser(key_filename) if key_filename is not None else None
    sock = _connect(probe.host, probe.port, deadline)
    deadline.arm(sock)
    where = f"{probe.user}@{format_host_port(probe.host, probe.port)}"
    try:
        remaining = deadline.remaining()
        try:
            client.connect(
                probe.host,
                port=probe.port,
                username=probe.user,
                password=None,
                key_filename=key_path,
                # An explicit key is the only one tried: deterministic, and no risk of
                # hitting the server's MaxAuthTries with a crowded agent.
                allow_agent=key_path is None,
                look_for_keys=key_path is None,
                sock=sock,
                timeout=remaining,
                banner_timeout=remaining,
                auth_timeout=remaining,
                **channel_timeout(client, remaining),
            )
        except paramiko.BadHostKeyException as exc:
            raise ProbeFailed(
                f"host key mismatch for {where}: got {exc.key.get_name()} "
                f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)}"
            ) from None
        except paramiko.AuthenticationException as exc:
            raise ProbeFailed(f"authentication failed for {where}: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError, ValueError) as exc:
            if deadline.expired or deadline.passed():   # paramiko's own timers end with ours
                raise ProbeFailed(deadline.timed_out()) from None
            if isinstance(exc, OSError):
                raise ProbeFailed(describe_os_error(exc, deadline.timeout)) from None
            text = str(exc)
            if "No authentication methods available" in text:
                text = "no SSH key to offer (pass a key file, or load a key into the agent)"
            elif "not found in known_hosts" in text and known_hosts is not None:
                text = f"host key not found in {known_hosts}"
            raise ProbeFailed(f"SSH login to {where} failed: {text}") from None
        transport = client.get_transport()
        remote_version = getattr(transport, "remote_version", None)
        try:
            channel = transport.open_session(timeout=deadline.remaining())
            channel.settimeout(deadline.remaining())
            channel.exec_command("true")
            while not channel.exit_status_ready():
                if deadline.passed() or deadline.expired:
                    raise ProbeFailed(f"remote 'true' did not finish: {deadline.timed_out()}")
                if not transport.is_active():
                    raise ProbeFailed("connection closed before 'true' exited")
                time.sleep(0.01)
            if deadline.expired:
                raise ProbeFailed(f"remote 'true' did not finish: {deadline.timed_out()}")
            status = channel.recv_exit_status()
            if status == -1:  # paramiko's value when the channel closed without a status
                raise ProbeFailed("connection closed before 'true' exited")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if deadline.expired:
                raise ProbeFailed(deadline.timed_out()) from None
            raise ProbeFailed(f"cannot run 'true' on {where}: {exc}") from None
        if status != 0:
            raise ProbeFailed(
                f"remote 'true' exited with status {status}", "; ".join(notes) or None
            )
        if remote_version:
            notes.insert(0, str(remote_version))
        notes.insert(0, f"logged in as {probe.user}")
        return "; ".join(notes)
    finally:
        deadline.cancel()
        client.close()
        sock.close()


def probe_http(probe: Probe, timeout: float, *, verify_tls: bool) -> str | None:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used (by the http probe)
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        """Do not follow redirects: a 3xx already proves the server answered."""

        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler({}),  # the probe is about the direct path, not a proxy
        _NoRedirect(),
    ]
    if probe.kind == "https":
        context = ssl.create_default_context()
        if not verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(
        probe.url, method="GET", headers={"User-Agent": "fwsafe-probe", "Connection": "close"}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            status, reason = int(response.status), str(response.reason)
    except urllib.error.HTTPError as exc:
        status, reason = int(exc.code), str(exc.reason)
        exc.close()
    except urllib.error.URLError as exc:
        cause = exc.reason
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise ProbeFailed(f"TLS certificate not accepted: {cause.verify_message}") from None
        if isinstance(cause, BaseException):
            raise ProbeFailed(describe_os_error(cause, timeout)) from None
        raise ProbeFailed(str(cause)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ProbeFailed(describe_os_error(exc, timeout)) from None
    detail = f"HTTP {status} {reason}".rstrip()
    if status >= 500:
        raise ProbeFailed(detail, detail)
    return detail


def _last_line(data: bytes) -> str | None:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()
    return None


def probe_cmd(probe: Probe, timeout: float) -> str | None:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used (by the command probe)
    import signal
    import subprocess

    assert probe.command is not None
    argv = list(probe.command)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so that a timeout kills the whole process group
        )
    except FileNotFoundError:
        raise ProbeFailed(f"command not found: {argv[0]}") from None
    except OSError as exc:
        raise ProbeFailed(f"cannot run {argv[0]}: {describe_os_error(exc, timeout)}") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            # Something outside the group still holds the pipes: stop waiting for them.
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            proc.wait()
        raise ProbeFailed(f"command timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        status = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        raise ProbeFailed(_last_line(stderr) or status, status)
    out = _last_line(stdout)
    return f"exit status 0: {out}" if out else "exit status 0"
