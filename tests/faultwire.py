"""The fault lab's wire: a userspace forwarder on a TUN device in the router namespace that
delays, drops or cuts IPv4 packets, per direction, changed at any moment over a control socket.

This kernel has no sch_netem, so the router namespace sends every packet it forwards into
``tun0`` (policy routing: ``iif c0/s0 lookup <table>`` whose default route is ``tun0``); this
program reads each one, holds it for the direction's delay (a FIFO per direction: nothing is
reordered), drops it at the direction's loss rate or when the direction is cut, and writes it
back into ``tun0``, from where the main table forwards it on.

    python3 tests/faultwire.py TUN CONTROL_SOCKET SERVER_NET

Directions: ``up`` is towards SERVER_NET (client to server), ``down`` the other way. The
control socket takes one JSON object per line, e.g. ``{"up": {"delay": 0.5, "loss": 0.1},
"down": {"cut": true}}`` (keys not given stay as they were; ``{"reset": true}`` clears both), and
answers one line: the settings and per-direction counters. It stops on SIGTERM. Standard
library only: it runs inside the lab's namespaces with this interpreter.
"""

from __future__ import annotations

import fcntl
import heapq
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
DIRECTIONS = ("up", "down")


class Wire:
    def __init__(self, fd: int, server_net: ipaddress.IPv4Network) -> None:
        self.fd = fd
        self.server_net = server_net
        self.settings = {d: {"delay": 0.0, "loss": 0.0, "cut": False} for d in DIRECTIONS}
        self.counts = {d: {"passed": 0, "dropped": 0} for d in DIRECTIONS}
        self.queue: list[tuple[float, int, bytes]] = []
        self.seq = 0
        self.cond = threading.Condition()
        self.rng = random.Random(0x3A7)

    def direction(self, packet: bytes) -> str:
        if len(packet) >= 20 and packet[0] >> 4 == 4:
            dst = ipaddress.IPv4Address(packet[16:20])
            return "up" if dst in self.server_net else "down"
        return "down"

    def read_loop(self) -> None:
        while True:
            try:
                packet = os.read(self.fd, 65535)
            except InterruptedError:
                continue
            except OSError:
                return
            way = self.direction(packet)
            with self.cond:
                rule = self.settings[way]
                if rule["cut"] or (rule["loss"] and self.rng.random() < float(rule["loss"])):
                    self.counts[way]["dropped"] += 1
                    continue
                self.counts[way]["passed"] += 1
                # FIFO per direction: a packet never leaves before one that came earlier.
                due = time.monotonic() + float(rule["delay"])
                self.seq += 1
                heapq.heappush(self.queue, (due, self.seq, packet))
                self.cond.notify()

    def write_loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue or self.queue[0][0] > time.monotonic():
                    timeout = self.queue[0][0] - time.monotonic() if self.queue else None
                    self.cond.wait(timeout)
                _, _, packet = heapq.heappop(self.queue)
            try:
                os.write(self.fd, packet)
            except OSError:
                pass

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            if request.get("reset"):
                for way in DIRECTIONS:
                    self.settings[way] = {"delay": 0.0, "loss": 0.0, "cut": False}
            for way in DIRECTIONS:
                for key, value in (request.get(way) or {}).items():
                    if key in ("delay", "loss"):
                        self.settings[way][key] = float(value)
                    elif key == "cut":
                        self.settings[way][key] = bool(value)
            return {"settings": self.settings, "counts": self.counts}


def serve(wire: Wire, path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                try:
                    answer = wire.control(json.loads(line))
                except (ValueError, TypeError, AttributeError) as exc:
                    answer = {"error": str(exc)}
                stream.write((json.dumps(answer) + "\n").encode())
                stream.flush()


def main() -> None:
    tun, control, server_net = sys.argv[1], sys.argv[2], sys.argv[3]
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun.encode(), IFF_TUN | IFF_NO_PI))
    wire = Wire(fd, ipaddress.IPv4Network(server_net))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    for target in (wire.read_loop, wire.write_loop):
        threading.Thread(target=target, daemon=True).start()
    serve(wire, control)


if __name__ == "__main__":
    main()
