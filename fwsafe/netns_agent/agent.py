"""The agent that `fwsafe check` and `fwsafe audit` run in each namespace of the sandbox.

Run as a script (``python3 -I -S agent.py``) by ``ip netns exec``, so it imports nothing from
fwsafe but its own package (standard library only: :mod:`.agent_loop`, the serve loop, the
socket helpers, the `sysctl` request; :mod:`.echo_paths`, the check's requests;
:mod:`.reach_probes`, the audit's). It reads one JSON request per line on stdin and answers
with one JSON line on stdout. End of input makes it close every socket and exit, so it never
outlives the check or the audit that started it (even one killed with SIGKILL).

Requests (``op``), the check's:
    listen {"port"}                             echo server on 0.0.0.0 and [::] at `port`
    open   {"id", "src", "dst", "port", "timeout"}
                                                connect from `src`, exchange data, keep it
    ping   {"id", "timeout"}                    exchange data on the kept connection `id`
    new    {"src", "dst", "port", "timeout"}    connect, exchange data, close
    canary {"port"}                             one UDP datagram to 127.0.0.1:`port`
the audit's:
    serve  {"proto", "address", "port", "v6only", "device", "label"}
                                                a listener like the host's
                                                (server side; bound to `device` if given):
                                                TCP accepts and closes, UDP records each
                                                datagram's payload
    tap    {}                                   (server side) watch every packet of the
                                                namespace's links: which probes arrived (a TCP
                                                SYN, a UDP datagram) and which TCP probes a
                                                SYN-ACK left for; forget what was seen before
    start  {"attempts": [{"id", "proto", "src", "sport", "dst", "port"}]}
                                                (client side) send them all at once: a TCP
                                                connect started, or one UDP datagram carrying
                                                the attempt's id (sent); answers the attempts
                                                that failed at once
    settle {"probes": [[id, proto, src, sport, dst, port]], "wait", "grace"}
                                                (server side) wait up to `wait` s until every
                                                probe arrived, then up to `grace` s until the
                                                kernel decided each; answers whether all
                                                arrived, the keys a SYN-ACK left for, and
                                                the UDP ids the listeners received
    finish {"expect", "wait"}                   (client side) the started connects: wait up
                                                to `wait` s for those in `expect` (a SYN-ACK
                                                is on its way), the others are settled now
    peers  {"settle"}                           the source addresses each listener (by the
                                                "label" it was served with) received from
                                                since the last time asked, after `settle` s
    recent {"name", "addresses"}                add them to the xt_recent list NAME (server
                                                side, once a rule created it)
and both's:
    sysctl {"name", "value"}                    write /proc/sys/net/NAME (`ipv4/ip_forward`:
                                                never absolute, no empty, `.` or `..` part)
Answers: {"ok": true, ...} or {"ok": false, "error": "..."}; a request the agent cannot read
(not JSON, a field missing or of the wrong type) is answered {"ok": false, "error": "bad
request: ..."}, and the agent goes on.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

if __name__ == "__main__":
    # Run by path with -I -S (see the docstring): the folder that holds this fwsafe package
    # goes on sys.path first, for the agent's own modules (standard library only)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.realpath(__file__)))))

from fwsafe.netns_agent.agent_loop import serve, sysctl  # noqa: E402 - after the path
from fwsafe.netns_agent.echo_paths import EchoPaths  # noqa: E402
from fwsafe.netns_agent.reach_probes import (  # noqa: E402
    BATCH,
    ProbeTargets,
    batch_size,
    recent,
)


class Agent:
    """Both request sets in one process: the check's (:class:`EchoPaths`) and the audit's
    (:class:`ProbeTargets`); their op names do not collide."""

    def __init__(self, batch: int = BATCH) -> None:
        self.echo = EchoPaths()
        self.targets = ProbeTargets(batch)

    def sockets(self) -> list[socket.socket]:
        """Every socket either half holds: what end of input closes."""
        return [*self.echo.sockets(), *self.targets.sockets()]

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        echo, targets = self.echo, self.targets
        if op == "listen":
            return echo.listen(int(request["port"]))
        if op == "open":
            return echo.open(str(request["id"]), str(request["src"]), str(request["dst"]),
                             int(request["port"]), float(request["timeout"]))
        if op == "ping":
            return echo.ping(str(request["id"]), float(request["timeout"]))
        if op == "new":
            return echo.new(str(request["src"]), str(request["dst"]), int(request["port"]),
                            float(request["timeout"]))
        if op == "canary":
            return echo.canary(int(request["port"]))
        if op == "serve":
            return targets.serve(str(request["proto"]), str(request["address"]),
                                 int(request["port"]), bool(request.get("v6only")),
                                 request.get("device") or None, str(request.get("label", "")))
        if op == "peers":
            return targets.take_peers(float(request.get("settle", 0)))
        if op == "recent":
            return recent(str(request["name"]), [str(a) for a in request["addresses"]])
        if op == "tap":
            return targets.tap()
        if op == "start":
            return targets.prober.start(list(request["attempts"]))
        if op == "settle":
            return targets.settle([(str(p[0]), (str(p[1]), str(p[2]), int(p[3]), str(p[4]),
                                                int(p[5]))) for p in request["probes"]],
                                  float(request["wait"]), float(request["grace"]))
        if op == "finish":
            return targets.prober.finish([str(i) for i in request["expect"]],
                                         float(request["wait"]))
        if op == "sysctl":
            return sysctl(str(request["name"]), str(request["value"]))
        return {"ok": False, "error": f"unknown op {op!r}"}


def main() -> int:
    # its threads (a listener each, an echo per connection) keep 8 MiB stacks: glibc would size
    # them by the stack limit fwsafe raised for the firewall tools (fwsafe.tool_stack)
    threading.stack_size(8 << 20)
    agent = Agent(batch_size())
    return serve(agent.handle, agent.sockets)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)   # no interpreter teardown: the sandbox waits for this exit
