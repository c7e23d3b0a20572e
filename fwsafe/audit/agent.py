"""The agent `fwsafe audit` runs in each namespace of the check's sandbox.

Run as a script (``python3 -I -S agent.py``) by ``ip netns exec``, so it imports nothing from
fwsafe. It reads one JSON request per line on stdin and answers with one JSON line; end of
input makes it close every socket and exit, so it never outlives the audit that started it.

Requests (``op``):
    serve  {"proto", "address", "port", "v6only", "device"}  a listener like the host's
                                                (server side; bound to `device` if given):
                                                TCP accepts and closes, UDP records each
                                                datagram's payload
    reach  {"attempts": [{"id", "proto", "src", "sport", "dst", "port"}], "timeout"}
                                                all at once (client side): a TCP connect
                                                (the handshake completes: reached), or one
                                                UDP datagram carrying the attempt's id (sent)
    heard  {"ids", "wait"}                      which of these ids the UDP listeners received,
                                                waiting up to `wait` seconds for all of them
    peers  {"settle"}                           the source addresses each listener (by the
                                                "label" it was served with) received from
                                                since the last time asked, after `settle` s
    sysctl {"name", "value"}                    write /proc/sys/net/NAME (server side)
Answers: {"ok": true, ...} or {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from typing import Any

BATCH = 400   # sockets open at once: 400 under the usual limit of 1024 descriptors, more
              # where the hard limit allows (main)


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _abort(sock: socket.socket) -> None:
    """Close with RST: nothing lingers in the sandbox after an attempt."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _error(number: int) -> str:
    if number == errno.ECONNREFUSED:
        return "refused (a REJECT or RST answered)"
    return os.strerror(number).lower()


class Agent:
    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.heard: set[str] = set()
        self.peers: dict[str, set[str]] = {}
        self.cond = threading.Condition()

    # -- server side --------------------------------------------------------------------------
    def serve(self, proto: str, address: str, port: int, v6only: bool,
              device: str | None = None, label: str = "") -> dict[str, Any]:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(_family(address), kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if device:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
            sock.bind((address, port))
            if proto == "tcp":
                sock.listen(1024)
        except OSError as exc:
            sock.close()
            return {"ok": False, "error": f"cannot listen on {address} port {port}/{proto}: "
                                          f"{(exc.strerror or str(exc)).lower()}"}
        self.sockets.append(sock)
        target = self._accept if proto == "tcp" else self._receive
        threading.Thread(target=target, args=(sock, label), daemon=True).start()
        return {"ok": True}

    def _seen(self, label: str, peer: str) -> None:
        with self.cond:
            self.peers.setdefault(label, set()).add(peer.removeprefix("::ffff:"))

    def _accept(self, sock: socket.socket, label: str) -> None:
        """Accept and close (the handshake is what counts; nothing piles up)."""
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            conn.close()
            self._seen(label, str(peer[0]))

    def _receive(self, sock: socket.socket, label: str) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(512)
            except OSError:
                return
            self._seen(label, str(peer[0]))
            with self.cond:
                self.heard.add(data.decode(errors="replace"))
                self.cond.notify_all()

    def take_peers(self, settle: float) -> dict[str, Any]:
        time.sleep(settle)
        with self.cond:
            peers = {label: sorted(found) for label, found in self.peers.items()}
            self.peers = {}
        return {"ok": True, "peers": peers}

    @staticmethod
    def sysctl(name: str, value: str) -> dict[str, Any]:
        if ".." in name or name.startswith("/"):
            return {"ok": False, "error": f"bad sysctl name {name!r}"}
        try:
            with open(os.path.join("/proc/sys/net", name), "w") as handle:
                handle.write(value)
        except OSError as exc:
            return {"ok": False, "error": f"{name}: {exc.strerror or exc}"}
        return {"ok": True}

    def wait_heard(self, ids: list[str], wait: float) -> dict[str, Any]:
        end = time.monotonic() + wait
        wanted = set(ids)
        with self.cond:
            while not wanted <= self.heard:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return {"ok": True, "heard": sorted(wanted & self.heard)}

    # -- client side --------------------------------------------------------------------------
    def reach(self, attempts: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
        results: dict[str, str | None] = {}   # id -> None (reached/sent) or the error
        for start in range(0, len(attempts), BATCH):
            self._batch(attempts[start:start + BATCH], timeout, results)
        return {"ok": True, "results": results}

    def _batch(self, attempts: list[dict[str, Any]], timeout: float,
               results: dict[str, str | None]) -> None:
        pending: dict[int, tuple[str, socket.socket]] = {}
        for attempt in attempts:
            ident = str(attempt["id"])
            kind = socket.SOCK_STREAM if attempt["proto"] == "tcp" else socket.SOCK_DGRAM
            sock = socket.socket(_family(str(attempt["dst"])), kind)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((str(attempt["src"]), int(attempt["sport"])))
                destination = (str(attempt["dst"]), int(attempt["port"]))
                if kind == socket.SOCK_DGRAM:
                    sock.sendto(ident.encode(), destination)
                    results[ident] = None
                    sock.close()
                    continue
                sock.setblocking(False)
                code = sock.connect_ex(destination)
            except OSError as exc:
                results[ident] = (exc.strerror or str(exc)).lower()
                _abort(sock)
                continue
            if code not in (0, errno.EINPROGRESS):
                results[ident] = _error(code)
                _abort(sock)
                continue
            pending[sock.fileno()] = (ident, sock)
        self._wait_connects(pending, timeout, results)

    @staticmethod
    def _wait_connects(pending: dict[int, tuple[str, socket.socket]], timeout: float,
                       results: dict[str, str | None]) -> None:
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        end = time.monotonic() + timeout
        while pending:
            left = end - time.monotonic()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                ident, sock = pending.pop(fd)
                poller.unregister(fd)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                # reset after the handshake completed: the listener was reached all the same
                results[ident] = None if code in (0, errno.ECONNRESET) else _error(code)
                _abort(sock)
        for ident, sock in pending.values():
            results[ident] = "timed out"
            _abort(sock)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "serve":
            return self.serve(str(request["proto"]), str(request["address"]),
                              int(request["port"]), bool(request.get("v6only")),
                              request.get("device") or None, str(request.get("label", "")))
        if op == "peers":
            return self.take_peers(float(request.get("settle", 0)))
        if op == "sysctl":
            return self.sysctl(str(request["name"]), str(request["value"]))
        if op == "reach":
            return self.reach(list(request["attempts"]), float(request["timeout"]))
        if op == "heard":
            return self.wait_heard([str(i) for i in request["ids"]], float(request["wait"]))
        return {"ok": False, "error": f"unknown op {op!r}"}


def main() -> int:
    try:   # many attempts at once: as many descriptors as the hard limit allows
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        global BATCH
        BATCH = max(BATCH, min(hard - 100, 4000))
    except (OSError, ValueError):
        pass
    agent = Agent()
    print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = agent.handle(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        print(json.dumps(answer), flush=True)
    for sock in agent.sockets:
        sock.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)   # no interpreter teardown: the sandbox waits for this exit
