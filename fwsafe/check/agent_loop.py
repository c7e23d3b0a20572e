"""The loop both sandbox agents serve (check/sandbox_agent.py, audit/audit_agent.py): say
ready, then one JSON request per line on stdin, one JSON answer per line on stdout; end of
input closes the agent's sockets, so that it never outlives the command that started it (even
one killed with SIGKILL).

Standard library only, like the agents: they are run by path (``python3 -I -S
sandbox_agent.py``, by ``ip netns exec`` in the sandbox's namespaces: no site, neither their
folder nor fwsafe on sys.path) and put the folder that holds their fwsafe package on sys.path
first.
"""

from __future__ import annotations

import json
import os
import socket
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
