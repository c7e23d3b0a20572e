"""The check's half of the sandbox agent (fwsafe/netns_agent/agent.py): an echo server on the
management port, and the connections the check tries against it, each exchanging data (kept
open across the switch to the candidate, or opened new), and the canary datagram that tells
when the trace has caught up. The requests are listed in the agent's docstring.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from fwsafe.netns_agent.agent_loop import abort, family

PAYLOAD = b"fwsafe-check-ping\n"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "refused (a REJECT or RST answered)"
    if isinstance(exc, ConnectionResetError):
        return "reset by the peer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or exc.__class__.__name__


def _exchange(sock: socket.socket, deadline: float) -> None:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    sock.sendall(PAYLOAD)
    got = b""
    while len(got) < len(PAYLOAD):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
        chunk = sock.recv(len(PAYLOAD) - len(got))
        if not chunk:
            raise ConnectionResetError("connection closed by the peer")
        got += chunk
    if got != PAYLOAD:
        raise OSError(0, "the echo came back altered")


def _connect(src: str, dst: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    sock = socket.socket(family(dst), socket.SOCK_STREAM)
    try:
        sock.bind((src, 0))
        sock.settimeout(timeout)
        sock.connect((dst, port))
        _exchange(sock, deadline)
    except BaseException:
        abort(sock)
        raise
    return sock


class EchoPaths:
    """The check's requests: `listen` (server side), `open`, `ping`, `new`, `canary`."""

    def __init__(self) -> None:
        self.kept: dict[str, socket.socket] = {}
        self.listeners: list[socket.socket] = []

    # -- server side --------------------------------------------------------------------------
    def listen(self, port: int) -> dict[str, Any]:
        bound = []
        for af, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                sock = socket.socket(af, socket.SOCK_STREAM)
            except OSError:
                continue  # IPv6 disabled in this namespace
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if af == socket.AF_INET:
                    return {"ok": False, "error": f"cannot listen on port {port}: {_describe(exc)}"}
                continue
            sock.listen(64)
            self.listeners.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
            bound.append(address)
        return {"ok": True, "bound": bound}

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    # -- client side --------------------------------------------------------------------------
    def open(self, ident: str, src: str, dst: str, port: int, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        try:
            self.kept[ident] = _connect(src, dst, port, timeout)
        except OSError as exc:
            return {"ok": False, "error": _describe(exc), "seconds": time.monotonic() - started}
        return {"ok": True, "seconds": time.monotonic() - started}

    def ping(self, ident: str, timeout: float) -> dict[str, Any]:
        sock = self.kept.get(ident)
        if sock is None:
            return {"ok": False, "error": f"no connection {ident}"}
        started = time.monotonic()
        try:
            _exchange(sock, started + timeout)
        except OSError as exc:
            del self.kept[ident]
            abort(sock)
            return {"ok": False, "error": _describe(exc), "seconds": time.monotonic() - started}
        return {"ok": True, "seconds": time.monotonic() - started}

    def new(self, src: str, dst: str, port: int, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        try:
            sock = _connect(src, dst, port, timeout)
        except OSError as exc:
            return {"ok": False, "error": _describe(exc), "seconds": time.monotonic() - started}
        sock.close()
        return {"ok": True, "seconds": time.monotonic() - started}

    @staticmethod
    def canary(port: int) -> dict[str, Any]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.sendto(b"fwsafe-check-canary", ("127.0.0.1", port))
        except OSError as exc:
            return {"ok": False, "error": _describe(exc)}
        finally:
            sock.close()
        return {"ok": True}

    def sockets(self) -> list[socket.socket]:
        """What end of input closes: the kept connections, the listeners."""
        return [*self.kept.values(), *self.listeners]
