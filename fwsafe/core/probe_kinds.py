"""Connectivity probes: "can I still reach this host after the firewall change?".

A probe is written as a URL:

    tcp://HOST:PORT                 a TCP connect (the port is required)
    ssh://[USER@]HOST[:PORT]        TCP connect, SSH banner and key exchange; no login
    ssh-auth://USER@HOST[:PORT]     a full SSH key login that runs `true` (never a password)
    http://... / https://...        an HTTP(S) GET; any status below 500 counts as up
    cmd:COMMAND                     a local command (split with shlex, no shell); exit 0 is up

IPv6 literals go in brackets: ``tcp://[fd00::1]:22``.

The guard imports this module and runs the probes periodically while a change is pending, so
the import is kept light: paramiko, urllib.request and subprocess are imported only inside the
functions that need them.  `run_probe` never raises for a network failure; it reports it in a
`ProbeResult`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fwsafe.errors import UsageError
from fwsafe.sshcompat import channel_timeout, fingerprint

__all__ = [
    "PROBE_KINDS",
    "Probe",
    "ProbeKind",
    "ProbeResult",
    "SocketDeadline",
    "describe_os_error",
    "format_host_port",
    "parse_probe",
    "run_probe",
    "run_probes",
    "split_endpoint",
    "ssh_log_channel",
    "validate_host",
]

ProbeKind = Literal["tcp", "ssh", "ssh-auth", "http", "https", "cmd"]

#: Every probe kind, in the order they are documented.
PROBE_KINDS: tuple[ProbeKind, ...] = ("tcp", "ssh", "ssh-auth", "http", "https", "cmd")

_FORMS = "tcp://HOST:PORT, ssh://[USER@]HOST[:PORT], ssh-auth://USER@HOST[:PORT], http://..., https://..., cmd:COMMAND"  # noqa: E501

_LABEL_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
#: A login name as probes, the config and the remote commands accept it.
USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._$-]*$")

#: Extra time `run_probes` waits past the timeout before it gives up on a probe thread.
_JOIN_GRACE_S = 2.0
#: paramiko's log channel for probe connections (see `ssh_log_channel`).
_SSH_LOG_CHANNEL = "fwsafe.core.probes.ssh"
#: How many bytes of a would-be SSH banner line we look at.
_BANNER_MAX = 255


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A parsed probe URL.

    `host`/`port` are set for every network kind (for http/https, `port` is the effective
    port: 80/443 when the URL has none).  `user` is set for ssh-auth (and for ssh when given).
    `path` is the path and query of an http/https URL.  `command` is the argv of a cmd probe.
    """

    url: str
    kind: ProbeKind
    host: str | None = None
    port: int | None = None
    user: str | None = None
    path: str | None = None
    command: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return self.url


def validate_host(host: str, *, allow_bare_ipv6: bool = True) -> str:
    """Check that `host` is a hostname, an IPv4 address or (bare) IPv6 address; return it.

    Brackets are not accepted here (see `split_endpoint`).  Raises ValueError with a short
    reason.
    """
    if not host:
        raise ValueError("empty host")
    if ":" in host:
        if not allow_bare_ipv6:
            raise ValueError(f"IPv6 address {host!r} must be written in brackets, e.g. [{host}]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
        return host
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None
        return host
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"invalid host name {host!r}")
    return host


def _parse_port(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid port {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port


def split_endpoint(text: str) -> tuple[str | None, str, int | None]:
    """Split ``[USER@]HOST[:PORT]`` into ``(user, host, port)``; missing parts are None.

    IPv6 literals must be bracketed (``root@[fd00::1]:2222``); the brackets are removed from
    the returned host.  Raises ValueError with a short reason when the text is malformed.
    """
    if not text:
        raise ValueError("empty host")
    if any(c.isspace() for c in text):
        raise ValueError("whitespace is not allowed")
    user: str | None = None
    rest = text
    if "@" in text:
        user, _, rest = text.rpartition("@")
        if not user:
            raise ValueError("empty user name before '@'")
        if not USER_RE.match(user):
            raise ValueError(f"invalid user name {user!r}")
    port: int | None = None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError("missing ']' after IPv6 address")
        host = rest[1:end]
        after = rest[end + 1 :]
        if not host:
            raise ValueError("empty IPv6 address in brackets")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address [{host}]") from None
        if after:
            if not after.startswith(":"):
                raise ValueError(f"unexpected {after!r} after ']'")
            port = _parse_port(after[1:])
        return user, host, port
    if rest.count(":") > 1:
        raise ValueError(f"IPv6 address must be written in brackets, e.g. [{rest}]:PORT")
    host, sep, port_text = rest.partition(":")
    if sep:
        port = _parse_port(port_text)
    validate_host(host, allow_bare_ipv6=False)
    return user, host, port


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host put in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bad(url: str, why: str, hint: str | None = None) -> UsageError:
    return UsageError(f"invalid probe {url!r}: {why}", hint=hint)


def _parse_network(url: str, kind: ProbeKind, rest: str) -> Probe:
    for ch in "/?#":
        if ch in rest:
            tail = rest[rest.index(ch) :]
            raise _bad(url, f"unexpected {tail!r} (a {kind}:// probe has no path)")
    try:
        user, host, port = split_endpoint(rest)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    if kind == "tcp":
        if port is None:
            raise _bad(url, "a port is required", hint="write tcp://HOST:PORT")
        if user is not None:
            raise _bad(url, "a tcp:// probe takes no user")
    elif kind == "ssh-auth" and user is None:
        raise _bad(url, "a user is required", hint="write ssh-auth://USER@HOST[:PORT]")
    return Probe(url=url, kind=kind, host=host, port=port if port is not None else 22, user=user)


def _parse_http(url: str, kind: ProbeKind) -> Probe:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used (by the http probe)
    import urllib.parse

    if any(c.isspace() for c in url):
        raise _bad(url, "whitespace is not allowed in a URL")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    host = parts.hostname
    if not host:
        raise _bad(url, "no host in the URL")
    if "@" in parts.netloc:
        raise _bad(url, "user names and passwords in the URL are not supported")
    if port == 0:
        raise _bad(url, "port 0 is not valid")
    try:
        validate_host(host)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    if ":" in host and not parts.netloc.startswith("["):
        raise _bad(url, "IPv6 address must be written in brackets")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    if port is None:
        port = 443 if kind == "https" else 80
    return Probe(url=url, kind=kind, host=host, port=port, path=path)


def parse_probe(url: str) -> Probe:
    """Parse a probe URL (see the module docstring for the forms).

    Raises UsageError naming the URL and what is wrong with it.
    """
    text = url.strip()
    if not text:
        raise UsageError("invalid probe '': empty probe URL", hint=f"forms: {_FORMS}")
    lower = text.lower()
    if lower.startswith("cmd:"):
        body = text[4:]
        if body.startswith("//"):
            raise _bad(text, "write cmd:COMMAND, not cmd://", hint=f"e.g. cmd:{body[2:]}")
        try:
            argv = shlex.split(body)
        except ValueError as exc:
            raise _bad(text, f"cannot split the command: {exc}") from None
        if not argv:
            raise _bad(text, "empty command", hint="e.g. cmd:ping -c1 -W1 192.0.2.1")
        return Probe(url=text, kind="cmd", command=tuple(argv))
    scheme, sep, rest = text.partition("://")
    if not sep:
        hint = f"did you mean tcp://{text}?" if re.search(r":\d+$", text) else None
        raise _bad(text, f"no scheme; expected one of: {_FORMS}", hint=hint)
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        return _parse_http(text, "http" if scheme == "http" else "https")
    if scheme == "tcp":
        return _parse_network(text, "tcp", rest)
    if scheme == "ssh":
        return _parse_network(text, "ssh", rest)
    if scheme == "ssh-auth":
        return _parse_network(text, "ssh-auth", rest)
    raise _bad(text, f"unknown probe type {scheme!r}; expected one of: {_FORMS}")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """The outcome of one probe attempt.  `error` is set iff `ok` is false."""

    url: str
    ok: bool
    latency_s: float
    error: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (latency rounded to the microsecond)."""
        return {
            "url": self.url,
            "ok": self.ok,
            "latency_s": round(self.latency_s, 6),
            "error": self.error,
            "detail": self.detail,
        }


class _ProbeFailed(Exception):
    """Internal: a probe failed; the message is the user-facing error."""

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
        raise _ProbeFailed(describe_os_error(exc, deadline.timeout)) from None


# --------------------------------------------------------------------------------------------
# The probe kinds
# --------------------------------------------------------------------------------------------


def _probe_tcp(probe: Probe, deadline: SocketDeadline) -> str | None:
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
            raise _ProbeFailed(f"no SSH banner: {deadline.timed_out()}")
        sock.settimeout(deadline.remaining())
        try:
            data = sock.recv(_BANNER_MAX, socket.MSG_PEEK)
        except OSError as exc:
            if deadline.expired:
                raise _ProbeFailed(f"no SSH banner: {deadline.timed_out()}") from None
            why = describe_os_error(exc, deadline.timeout)
            raise _ProbeFailed(f"no SSH banner: {why}") from None
        if not data:
            if deadline.expired:
                raise _ProbeFailed(f"no SSH banner: {deadline.timed_out()}")
            raise _ProbeFailed("connection closed before the SSH banner")
        newline = data.find(b"\n")
        if newline >= 0 or len(data) >= _BANNER_MAX:
            line = data[: newline if newline >= 0 else len(data)]
            text = line.decode("ascii", "replace").rstrip("\r")
            if not text.startswith("SSH-"):
                raise _ProbeFailed(f"not an SSH server: first line is {text[:80]!r}")
            if newline < 0:
                raise _ProbeFailed("SSH banner line too long")
            return text
        time.sleep(0.01)  # a partial line: wait for the rest (MSG_PEEK would not block)


def _probe_ssh(probe: Probe, deadline: SocketDeadline) -> str | None:
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
                raise _ProbeFailed(f"SSH key exchange {deadline.timed_out()}", banner) from None
            raise _ProbeFailed(f"SSH key exchange failed: {exc}", banner) from None
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


def _probe_ssh_auth(
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
            raise _ProbeFailed(f"cannot read known_hosts {path}: {exc}") from None
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
            raise _ProbeFailed(
                f"host key mismatch for {where}: got {exc.key.get_name()} "
                f"{fingerprint(exc.key)}, known_hosts has {fingerprint(exc.expected_key)}"
            ) from None
        except paramiko.AuthenticationException as exc:
            raise _ProbeFailed(f"authentication failed for {where}: {exc}") from None
        except (paramiko.SSHException, OSError, EOFError, ValueError) as exc:
            if deadline.expired or deadline.passed():   # paramiko's own timers end with ours
                raise _ProbeFailed(deadline.timed_out()) from None
            if isinstance(exc, OSError):
                raise _ProbeFailed(describe_os_error(exc, deadline.timeout)) from None
            text = str(exc)
            if "No authentication methods available" in text:
                text = "no SSH key to offer (pass a key file, or load a key into the agent)"
            elif "not found in known_hosts" in text and known_hosts is not None:
                text = f"host key not found in {known_hosts}"
            raise _ProbeFailed(f"SSH login to {where} failed: {text}") from None
        transport = client.get_transport()
        remote_version = getattr(transport, "remote_version", None)
        try:
            channel = transport.open_session(timeout=deadline.remaining())
            channel.settimeout(deadline.remaining())
            channel.exec_command("true")
            while not channel.exit_status_ready():
                if deadline.passed() or deadline.expired:
                    raise _ProbeFailed(f"remote 'true' did not finish: {deadline.timed_out()}")
                if not transport.is_active():
                    raise _ProbeFailed("connection closed before 'true' exited")
                time.sleep(0.01)
            if deadline.expired:
                raise _ProbeFailed(f"remote 'true' did not finish: {deadline.timed_out()}")
            status = channel.recv_exit_status()
            if status == -1:  # paramiko's value when the channel closed without a status
                raise _ProbeFailed("connection closed before 'true' exited")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if deadline.expired:
                raise _ProbeFailed(deadline.timed_out()) from None
            raise _ProbeFailed(f"cannot run 'true' on {where}: {exc}") from None
        if status != 0:
            raise _ProbeFailed(
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


def _probe_http(probe: Probe, timeout: float, *, verify_tls: bool) -> str | None:
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
            raise _ProbeFailed(f"TLS certificate not accepted: {cause.verify_message}") from None
        if isinstance(cause, BaseException):
            raise _ProbeFailed(describe_os_error(cause, timeout)) from None
        raise _ProbeFailed(str(cause)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _ProbeFailed(describe_os_error(exc, timeout)) from None
    detail = f"HTTP {status} {reason}".rstrip()
    if status >= 500:
        raise _ProbeFailed(detail, detail)
    return detail


def _last_line(data: bytes) -> str | None:
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        if line.strip():
            return line.strip()
    return None


def _probe_cmd(probe: Probe, timeout: float) -> str | None:
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
        raise _ProbeFailed(f"command not found: {argv[0]}") from None
    except OSError as exc:
        raise _ProbeFailed(f"cannot run {argv[0]}: {describe_os_error(exc, timeout)}") from None
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
        raise _ProbeFailed(f"command timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        status = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        raise _ProbeFailed(_last_line(stderr) or status, status)
    out = _last_line(stdout)
    return f"exit status 0: {out}" if out else "exit status 0"


def run_probe(
    probe: Probe,
    *,
    timeout: float = 3.0,
    key_filename: str | None = None,
    known_hosts: str | None = None,
    verify_tls: bool = True,
) -> ProbeResult:
    """Run one probe attempt with its own `timeout` (seconds) and report the outcome.

    Never raises for a network or command failure: `ok` is false and `error` says why.
    `key_filename` and `known_hosts` are used by ssh-auth probes (without `key_filename`,
    the agent and the default keys are tried; without `known_hosts`, any host key is
    accepted and `detail` says so).  `verify_tls=False` accepts any certificate for https.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    start = time.monotonic()
    deadline = SocketDeadline(timeout)
    error: str | None = None
    detail: str | None = None
    try:
        if probe.kind == "tcp":
            detail = _probe_tcp(probe, deadline)
        elif probe.kind == "ssh":
            detail = _probe_ssh(probe, deadline)
        elif probe.kind == "ssh-auth":
            detail = _probe_ssh_auth(
                probe, deadline, key_filename=key_filename, known_hosts=known_hosts
            )
        elif probe.kind in ("http", "https"):
            detail = _probe_http(probe, timeout, verify_tls=verify_tls)
        elif probe.kind == "cmd":
            detail = _probe_cmd(probe, timeout)
        else:  # pragma: no cover - Probe.kind is a Literal
            error = f"unknown probe kind {probe.kind!r}"
    except _ProbeFailed as exc:
        error, detail = exc.error, exc.detail
    except Exception as exc:  # a probe must never take the guard down
        error = f"{type(exc).__name__}: {exc}"
    latency = time.monotonic() - start
    return ProbeResult(
        url=probe.url, ok=error is None, latency_s=latency, error=error, detail=detail
    )


def run_probes(
    probes: Sequence[Probe],
    *,
    timeout: float = 3.0,
    key_filename: str | None = None,
    known_hosts: str | None = None,
    verify_tls: bool = True,
) -> list[ProbeResult]:
    """Run `probes` concurrently (one daemon thread each); results come in input order.

    A probe whose thread has not finished `timeout` + 2 s after the start is reported as
    failed (its thread is left behind as a daemon), so this call is bounded in time even if,
    say, a DNS lookup hangs.
    """
    results: list[ProbeResult | None] = [None] * len(probes)

    def worker(index: int, probe: Probe) -> None:
        results[index] = run_probe(
            probe,
            timeout=timeout,
            key_filename=key_filename,
            known_hosts=known_hosts,
            verify_tls=verify_tls,
        )

    start = time.monotonic()
    threads = []
    for index, probe in enumerate(probes):
        thread = threading.Thread(
            target=worker, args=(index, probe), name=f"fwsafe-probe-{index}", daemon=True
        )
        thread.start()
        threads.append(thread)
    end = start + timeout + _JOIN_GRACE_S
    for thread in threads:
        thread.join(max(end - time.monotonic(), 0.0))
    out: list[ProbeResult] = []
    for probe, result in zip(probes, results):
        if result is None:
            result = ProbeResult(
                url=probe.url,
                ok=False,
                latency_s=time.monotonic() - start,
                error=f"probe did not finish within {timeout + _JOIN_GRACE_S:g}s",
            )
        out.append(result)
    return out
