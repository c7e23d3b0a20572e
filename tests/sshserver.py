"""A small SSH server on loopback, for tests (paramiko in threads; no root, no sshd).

Usage::

    client_key = TestKey.generate()
    with SSHTestServer(authorized_keys=[client_key]) as server:
        key_path = client_key.write(tmp_path / "id_ed25519")
        known_hosts = server.write_known_hosts(tmp_path / "known_hosts")
        ...  # connect to server.host / server.port as any user with that key

It accepts public key authentication only (password attempts are recorded and refused), and
runs "commands" with a handler: by default ``true`` exits 0, ``false`` exits 1, and anything
else exits 127.  Pass ``handler=`` to emulate other commands.  Every exec request is recorded
in `commands`, every authentication attempt in `auth_attempts`.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["CommandResult", "SSHTestServer", "TestKey", "default_handler"]

_LOG_CHANNEL = "tests.sshserver"
# Server-side paramiko noise (a tcp:// probe that hangs up before the banner, ...) goes to a
# NullHandler instead of logging's last-resort stderr handler; it still propagates to root.
logging.getLogger(_LOG_CHANNEL).addHandler(logging.NullHandler())


@dataclass(frozen=True)
class TestKey:
    """An Ed25519 key pair: the paramiko key and its OpenSSH private key text."""

    __test__ = False  # not a pytest test class

    pkey: Any  # paramiko.Ed25519Key
    pem: str

    @classmethod
    def generate(cls) -> TestKey:
        """A fresh Ed25519 key (fast: no RSA prime search)."""
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode("ascii")
        return cls(pkey=paramiko.Ed25519Key(file_obj=io.StringIO(pem)), pem=pem)

    @property
    def public_line(self) -> str:
        """``ssh-ed25519 AAAA...`` (the authorized_keys / known_hosts form)."""
        return f"{self.pkey.get_name()} {self.pkey.get_base64()}"

    def write(self, path: str | os.PathLike[str]) -> str:
        """Write the private key (mode 0600) and the ``.pub`` beside it; return the path."""
        target = Path(path)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.pem)
        Path(f"{target}.pub").write_text(f"{self.public_line} test\n")
        return str(target)


@dataclass(frozen=True)
class CommandResult:
    """What an emulated command does: wait `delay` seconds, print, exit with `status`.

    `status=None` means the command never exits (useful for timeout tests).
    """

    status: Optional[int] = 0
    stdout: bytes = b""
    stderr: bytes = b""
    delay: float = 0.0


CommandHandler = Callable[[str], CommandResult]


def default_handler(command: str) -> CommandResult:
    """``true`` → 0, ``false`` → 1, anything else → 127 "command not found"."""
    if command.strip() == "true":
        return CommandResult(0)
    if command.strip() == "false":
        return CommandResult(1)
    name = command.split()[0] if command.split() else command
    return CommandResult(127, stderr=f"sh: 1: {name}: not found\n".encode())


class _Interface(paramiko.ServerInterface):  # type: ignore[misc]
    def __init__(self, server: SSHTestServer) -> None:
        self.server = server

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_password(self, username: str, password: str) -> int:
        self.server._record_auth(username, "password", False)
        return int(paramiko.AUTH_FAILED)

    def check_auth_publickey(self, username: str, key: Any) -> int:
        ok = self.server._key_allowed(username, key)
        self.server._record_auth(username, "publickey", ok)
        return int(paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return int(paramiko.OPEN_SUCCEEDED)
        return int(paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)

    def check_channel_exec_request(self, channel: Any, command: bytes) -> bool:
        text = command.decode("utf-8", "replace")
        user = channel.get_transport().get_username()
        self.server._record_command(user, text)
        result = self.server.handler(text)
        # paramiko sends the exec reply after we return; run the command in a thread.
        threading.Thread(
            target=_run_channel, args=(channel, result), name="sshserver-exec", daemon=True
        ).start()
        return True


def _run_channel(channel: Any, result: CommandResult) -> None:
    try:
        if result.delay:
            time.sleep(result.delay)
        if result.status is None:
            return  # never exits; the client will time out
        if result.stdout:
            channel.sendall(result.stdout)
        if result.stderr:
            channel.sendall_stderr(result.stderr)
        channel.send_exit_status(result.status)
        channel.shutdown_write()
        # Close a little later: a close that overtook the exec reply would make the client
        # see "Channel closed" instead of the exit status.
        time.sleep(0.2)
        channel.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass


class SSHTestServer:
    """An SSH server listening on ``127.0.0.1`` (or `bind`) on a free port.

    authorized_keys: keys (`TestKey` or paramiko keys) accepted for any user in `users`
        (all users when `users` is None).
    host_key: the server's host key (a fresh Ed25519 key by default).
    handler: maps a command line to a `CommandResult`.
    """

    def __init__(
        self,
        *,
        authorized_keys: Iterable[Any] = (),
        users: Optional[Iterable[str]] = None,
        host_key: Optional[TestKey] = None,
        handler: CommandHandler = default_handler,
        bind: str = "127.0.0.1",
    ) -> None:
        self.host_key = host_key or TestKey.generate()
        self._authorized = {
            (k.pkey if isinstance(k, TestKey) else k).asbytes() for k in authorized_keys
        }
        self.users = None if users is None else set(users)
        self.handler = handler
        self.bind = bind
        self.commands: list[tuple[str, str]] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._threads: list[threading.Thread] = []
        self._transports: list[Any] = []
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> SSHTestServer:
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.bind, 0))
        sock.listen(16)
        sock.settimeout(0.1)
        self._sock = sock
        self.port = sock.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name="sshserver-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            transports = list(self._transports)
        for transport in transports:
            transport.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SSHTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.bind

    @property
    def hostport(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        return f"[{self.bind}]:{self.port}" if ":" in self.bind else f"{self.bind}:{self.port}"

    def url(self, scheme: str = "ssh", user: Optional[str] = None) -> str:
        """A probe URL for this server, e.g. ``ssh-auth://root@127.0.0.1:40123``."""
        who = f"{user}@" if user else ""
        return f"{scheme}://{who}{self.hostport}"

    def known_hosts_line(self) -> str:
        """The known_hosts line for this server (``[host]:port`` form, as OpenSSH writes it)."""
        return f"[{self.bind}]:{self.port} {self.host_key.public_line}"

    def write_known_hosts(self, path: str | os.PathLike[str]) -> str:
        Path(path).write_text(self.known_hosts_line() + "\n")
        return str(path)

    # -- internals --------------------------------------------------------------------------

    def _key_allowed(self, username: str, key: Any) -> bool:
        if self.users is not None and username not in self.users:
            return False
        return bool(key.asbytes() in self._authorized)

    def _record_auth(self, username: str, method: str, ok: bool) -> None:
        with self._lock:
            self.auth_attempts.append((username, method, ok))

    def _record_command(self, username: str, command: str) -> None:
        with self._lock:
            self.commands.append((username, command))

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(
                target=self._serve, args=(conn,), name="sshserver-conn", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        transport = paramiko.Transport(conn)
        transport.set_log_channel(_LOG_CHANNEL)
        channels: list[Any] = []  # keep references: a garbage-collected Channel closes itself
        with self._lock:
            self._transports.append(transport)
        try:
            transport.add_server_key(self.host_key.pkey)
            try:
                transport.start_server(server=_Interface(self))
            except (paramiko.SSHException, EOFError, OSError):
                return
            while transport.is_active() and not self._stop.is_set():
                channel = transport.accept(0.1)  # served by the exec callback
                if channel is not None:
                    channels.append(channel)
        finally:
            transport.close()
            conn.close()
