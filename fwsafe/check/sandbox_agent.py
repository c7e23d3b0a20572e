"""The small agent that `fwsafe check` runs inside each sandbox network namespace.

It is run as a script (``python3 -I -S sandbox_agent.py``) by ``ip netns exec``, so it imports
nothing from fwsafe but what it shares with the audit's agent (:mod:`fwsafe.check.agent_loop`,
standard library only: the serve loop, the socket helpers, the `sysctl` request). It reads one
JSON request per line on stdin and answers with one JSON line on stdout. End of input makes it
close every socket and exit, so it never outlives the check that started it (even when that
check is killed with SIGKILL).

Requests (``op``):
    listen  {"port"}                              echo server on 0.0.0.0 and [::] at `port`
    open    {"id", "src", "dst", "port", "timeout"} connect from `src`, exchange data, keep it
    ping    {"id", "timeout"}                     exchange data on the kept connection `id`
    new     {"src", "dst", "port", "timeout"}     connect, exchange data, close
    canary  {"port"}                              one UDP datagram to 127.0.0.1:`port`
    sysctl  {"name", "value"}                     write /proc/sys/net/<name>
Answers: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

if __name__ == "__main__":
    # Run by path with -I -S (see the docstring): the folder that holds this fwsafe package
    # goes on sys.path first, for what the agents share (standard library only)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.realpath(__file__)))))

from fwsafe.check.agent_loop import abort, family, serve, sysctl  # noqa: E402 - after the path

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


class Agent:
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

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "listen":
            return self.listen(int(request["port"]))
        if op == "open":
            return self.open(str(request["id"]), str(request["src"]), str(request["dst"]),
                             int(request["port"]), float(request["timeout"]))
        if op == "ping":
            return self.ping(str(request["id"]), float(request["timeout"]))
        if op == "new":
            return self.new(str(request["src"]), str(request["dst"]), int(request["port"]),
                            float(request["timeout"]))
        if op == "canary":
            return self.canary(int(request["port"]))
        if op == "sysctl":
            return sysctl(str(request["name"]), str(request["value"]))
        return {"ok": False, "error": f"unknown op {op!r}"}


def main() -> int:
    agent = Agent()
    return serve(agent.handle, lambda: [*agent.kept.values(), *agent.listeners])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)   # no interpreter teardown: the sandbox waits for this exit
