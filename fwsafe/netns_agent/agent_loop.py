"""The sandbox agent's loop (fwsafe/netns_agent/agent.py): say ready, then one JSON request
per line on stdin, one JSON answer per line on stdout; end of input closes the agent's
sockets, so that it never outlives the command that started it, even one killed with SIGKILL.
Beside it the socket helpers both halves of the agent use (:mod:`.echo_paths`, the check's;
:mod:`.reach_probes`, the audit's) and the `sysctl` request.

Standard library only, like the agent: it is run by path (``python3 -I -S agent.py``, by ``ip
netns exec`` in the sandbox's namespaces: no site, neither its folder nor fwsafe on sys.path)
and puts the folder that holds its fwsafe package on sys.path first, before it imports this
module.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def serve(handle: Handler, sockets: Callable[[], Iterable[socket.socket]]) -> int:
    """Answer each request with `handle` until end of input (a request it cannot read is
    answered, not fatal), then close `sockets()`; the exit status."""
    print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        print(json.dumps(answer), flush=True)
    for sock in sockets():
        sock.close()
    return 0


def family(address: str) -> int:
    """The socket family of an IPv4 or IPv6 address."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def abort(sock: socket.socket) -> None:
    """Close with RST: no retransmissions linger in the sandbox after an attempt."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def sysctl(name: str, value: str) -> dict[str, Any]:
    """The `sysctl` request: write `value` to /proc/sys/net/NAME (NAME: `ipv4/ip_forward`,
    never absolute, with no empty, `.` or `..` part)."""
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts):
        return {"ok": False, "error": f"bad sysctl name {name!r}"}
    try:
        with open(os.path.join("/proc/sys/net", *parts), "w") as handle:
            handle.write(value)
    except OSError as exc:
        return {"ok": False, "error": f"{name}: {(exc.strerror or str(exc)).lower()}"}
    return {"ok": True}
