"""The audit's half of the sandbox agent (fwsafe/netns_agent/agent.py): on the server side,
listeners like the host's, a packet tap that ends a batch once every probe arrived and was
decided, the peers each listener heard from, the xt_recent lists; on the client side, the
probes (:class:`Prober`: connects started all at once, settled when told). The requests are
listed in the agent's docstring.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import struct
import threading
import time
from typing import Any

from fwsafe.netns_agent.agent_loop import abort, family

BATCH = 400   # sockets open at once: 400 under the usual limit of 1024 descriptors, more
              # where the hard limit allows (batch_size)
ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4
TapKey = tuple[str, str, int, str, int]   # (proto, src, sport, dst, dport) as the probe sends


def _error(number: int) -> str:
    if number == errno.ECONNREFUSED:
        return "refused (a REJECT or RST answered)"
    return os.strerror(number).lower()


def _readable(sock: socket.socket) -> bool:
    """Wait until `sock` has something to read; False: it is closed."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            for _, events in poller.poll():
                return not events & select.POLLNVAL
    except (OSError, ValueError):
        return False


def _parse(data: bytes, inner: bool = False) -> tuple[str, str, int, str, int, int] | None:
    """(proto, src, sport, dst, dport, tcp flags) of an IPv4/IPv6 TCP or UDP packet (`inner`:
    the start of one quoted in an ICMP error, flags 0)."""
    if len(data) < 20:
        return None
    version = data[0] >> 4
    if version == 4:
        if struct.unpack("!H", data[6:8])[0] & 0x1FFF:
            return None   # a later fragment
        header, proto = (data[0] & 15) * 4, data[9]
        family, src, dst = socket.AF_INET, data[12:16], data[16:20]
    elif version == 6 and len(data) >= 40:
        header, proto = 40, data[6]
        family, src, dst = socket.AF_INET6, data[8:24], data[24:40]
    else:
        return None
    transport = data[header:]
    if inner and proto in (6, 17) and len(transport) >= 4:
        flags = 0
    elif proto in (1, 58) and not inner and len(transport) >= 8 \
            and transport[0] == (3 if proto == 1 else 1):   # destination unreachable
        quoted = _parse(transport[8:], inner=True)
        return None if quoted is None else ("icmp", *quoted[1:5], 0)
    elif proto not in (6, 17) or len(transport) < (14 if proto == 6 else 8):
        return None
    else:
        flags = transport[13] if proto == 6 else 0
    sport, dport = struct.unpack("!HH", transport[:4])
    return ("tcp" if proto == 6 else "udp", socket.inet_ntop(family, src), sport,
            socket.inet_ntop(family, dst), dport, flags)


def recent(name: str, addresses: list[str]) -> dict[str, Any]:
    if not name or "/" in name or name.startswith("."):
        return {"ok": False, "error": f"bad list name {name!r}"}
    try:
        for address in addresses:   # one address per write, as xt_recent takes them
            with open(os.path.join("/proc/net/xt_recent", name), "w") as handle:
                handle.write(f"+{address}\n")
    except OSError as exc:
        return {"ok": False, "error": f"recent list {name}: {exc.strerror or exc}"}
    return {"ok": True}



class Prober:
    """The client side: connects started all at once, settled when told."""

    def __init__(self, batch: int = BATCH) -> None:
        self.pending: dict[int, tuple[str, socket.socket]] = {}
        self.batch = batch   # sockets open at once (more where the descriptor limit allows)

    def start(self, attempts: list[dict[str, Any]]) -> dict[str, Any]:
        if len(attempts) + len(self.pending) > self.batch:
            return {"ok": False, "error": f"at most {self.batch} attempts at once"}
        results: dict[str, str | None] = {}
        self._batch(attempts, self.pending, results)
        return {"ok": True, "results": results, "batch": self.batch}

    def finish(self, expect: list[str], wait: float) -> dict[str, Any]:
        """Settle the started connects: those in `expect` within `wait` s, the rest now."""
        results: dict[str, str | None] = {}
        expected = set(expect)
        waiting = {fd: item for fd, item in self.pending.items() if item[0] in expected}
        self._wait_connects(waiting, wait, results)
        rest = {fd: item for fd, item in self.pending.items() if item[0] not in results}
        self.pending = {}
        self._wait_connects(rest, 0.0, results)
        return {"ok": True, "results": results}

    @staticmethod
    def _batch(attempts: list[dict[str, Any]], pending: dict[int, tuple[str, socket.socket]],
               results: dict[str, str | None]) -> None:
        for attempt in attempts:
            ident = str(attempt["id"])
            kind = socket.SOCK_STREAM if attempt["proto"] == "tcp" else socket.SOCK_DGRAM
            sock = socket.socket(family(str(attempt["dst"])), kind)
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
                abort(sock)
                continue
            if code not in (0, errno.EINPROGRESS):
                results[ident] = _error(code)
                abort(sock)
                continue
            pending[sock.fileno()] = (ident, sock)

    @staticmethod
    def _wait_connects(pending: dict[int, tuple[str, socket.socket]], timeout: float,
                       results: dict[str, str | None]) -> None:
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        end = time.monotonic() + timeout
        while pending:
            left = end - time.monotonic()
            ready = poller.poll(max(0.0, left) * 1000)
            if not ready and left <= 0:
                break
            for fd, _ in ready:
                ident, sock = pending.pop(fd)
                poller.unregister(fd)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                # reset after the handshake completed: the listener was reached all the same
                results[ident] = None if code in (0, errno.ECONNRESET) else _error(code)
                abort(sock)
        for ident, sock in pending.values():
            results[ident] = "timed out"
            abort(sock)
        pending.clear()


class ProbeTargets:
    """The audit's requests: `serve`, `tap`, `settle`, `peers` (server side), `start`, `finish`
    (client side, by its :class:`Prober`)."""

    def __init__(self, batch: int = BATCH) -> None:
        self.served: list[socket.socket] = []
        self.udp: list[tuple[socket.socket, str]] = []
        self.heard: set[str] = set()
        self.peers: dict[str, set[str]] = {}
        self.cond = threading.Condition()
        self.tap_socket: socket.socket | None = None
        self.arrived: set[TapKey] = set()
        self.answered: set[TapKey] = set()     # a SYN-ACK left for it
        self.refused: set[TapKey] = set()      # a RST or an ICMP error left for it
        self.quoted: dict[tuple[str, int, str, int], TapKey] = {}   # ICMP errors, by ends
        self.prober = Prober(batch)

    # -- server side --------------------------------------------------------------------------
    def serve(self, proto: str, address: str, port: int, v6only: bool,
              device: str | None = None, label: str = "") -> dict[str, Any]:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family(address), kind)
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
        self.served.append(sock)
        if proto == "udp":
            sock.setblocking(False)
            self.udp.append((sock, label))
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
        """Drain the socket whenever it is readable, under the lock: a datagram that left the
        socket's queue is recorded before anyone else looks (settle drains too)."""
        while True:
            if not _readable(sock):
                return
            with self.cond:
                if not self._drain(sock, label):
                    return
                self.cond.notify_all()

    def _drain(self, sock: socket.socket, label: str) -> bool:
        """Record every datagram queued on `sock` (the lock held); False: it is closed."""
        while True:
            try:
                data, peer = sock.recvfrom(512)
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.peers.setdefault(label, set()).add(str(peer[0]).removeprefix("::ffff:"))
            self.heard.add(data.decode(errors="replace"))

    # -- the tap (server side): which probes arrived, which were answered ---------------------
    def tap(self) -> dict[str, Any]:
        with self.cond:
            if self.tap_socket is not None:
                self._drain_tap()
            for found in (self.arrived, self.answered, self.refused):
                found.clear()
            if self.tap_socket is not None:
                return {"ok": True}
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except OSError as exc:
            return {"ok": False, "error": f"no packet socket: {exc.strerror or exc}"}
        for option in (33, socket.SO_RCVBUF):   # SO_RCVBUFFORCE (root), else what is allowed
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, 32 << 20)
                break
            except OSError:
                continue
        sock.setblocking(False)
        self.tap_socket = sock
        threading.Thread(target=self._tap_loop, args=(sock,), daemon=True).start()
        return {"ok": True}

    def _tap_loop(self, sock: socket.socket) -> None:
        while True:
            if not _readable(sock):
                return
            with self.cond:
                if not self._drain_tap():
                    return
                self.cond.notify_all()

    def _drain_tap(self) -> bool:
        """Record the queued packets (the lock held): probes in, SYN-ACKs out."""
        assert self.tap_socket is not None
        while True:
            try:
                data, address = self.tap_socket.recvfrom(128)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if address[0] == "lo":
                continue
            found = _parse(data)
            if found is None:
                continue
            proto, src, sport, dst, dport, flags = found
            if address[2] == PACKET_OUTGOING:
                if proto == "icmp":     # the probe it quotes is refused (either protocol)
                    self.refused.update({("tcp", src, sport, dst, dport),
                                         ("udp", src, sport, dst, dport)})
                elif proto == "tcp" and flags & 0x12 == 0x12:   # SYN-ACK: the handshake goes on
                    self.answered.add((proto, dst, dport, src, sport))
                elif proto == "tcp" and flags & 0x04:           # RST
                    self.refused.add((proto, dst, dport, src, sport))
            elif proto == "udp" or (proto == "tcp" and flags & 0x12 == 0x02):   # a datagram, SYN
                self.arrived.add((proto, src, sport, dst, dport))

    def settle(self, probes: list[tuple[str, TapKey]], wait: float,
               grace: float) -> dict[str, Any]:
        """Wait until every probe ((id, key)) arrived (at most `wait` s), then until each is
        decided (a SYN-ACK, a RST or an ICMP error left for it; its datagram received), at
        most `grace` s: a packet's fate is decided in the same pass of the kernel that showed
        it to the tap, so after that nothing is on its way, and a probe still undecided was
        dropped. Answers whether all arrived, the keys answered with a SYN-ACK, the UDP ids
        received."""
        end = time.monotonic() + wait
        wanted = {key for _, key in probes}
        with self.cond:
            while self.tap_socket is not None:
                self._drain_tap()
                if wanted <= self.arrived or time.monotonic() >= end:
                    break
                self.cond.wait(min(0.01, max(0.0, end - time.monotonic())))
            everything = self.tap_socket is not None and wanted <= self.arrived
        end = time.monotonic() + grace
        while True:
            with self.cond:
                if self.tap_socket is not None:
                    self._drain_tap()
                for sock, label in self.udp:
                    self._drain(sock, label)
                decided = everything and all(
                    key in self.answered or key in self.refused
                    or (key[0] == "udp" and ident in self.heard) for ident, key in probes)
                if decided or time.monotonic() >= end:
                    answered = [list(k) for _, k in probes if k in self.answered]
                    heard = sorted({i for i, k in probes if k[0] == "udp"} & self.heard)
                    return {"ok": True, "arrived": everything, "answered": answered,
                            "heard": heard}
            time.sleep(0.005)

    def take_peers(self, settle: float) -> dict[str, Any]:
        time.sleep(settle)
        with self.cond:
            peers = {label: sorted(found) for label, found in self.peers.items()}
            self.peers = {}
        return {"ok": True, "peers": peers}

    def sockets(self) -> list[socket.socket]:
        """What end of input closes: the listeners."""
        return self.served


def batch_size() -> int:
    """Many attempts at once: the descriptor limit raised to the hard limit, the sockets a
    batch may hold open under it."""
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return max(BATCH, min(hard - 100, 4000))
    except (OSError, ValueError):
        return BATCH
