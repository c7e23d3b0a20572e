"""The guard's socket: one JSON request line in, one JSON answer line out (fwsafe.guard.spawn
is the client side)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUEST_LIMIT = 65536

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def listen(path: Path) -> socket.socket:
    """A non-blocking Unix socket at `path`, created 0600 (no chmod through a path)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(mask)
    server.listen(16)
    server.setblocking(False)
    return server


def serve_one(conn: socket.socket, handle: Handler, log: Callable[[str], None]) -> None:
    """Read one request from `conn`, answer it with `handle`'s answer, close it."""
    conn.settimeout(2.0)
    try:
        data = b""
        while not data.endswith(b"\n") and len(data) < REQUEST_LIMIT:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            answer = handle(message)
        except ValueError as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError as exc:
        log(f"request failed: {exc}")
    finally:
        conn.close()
