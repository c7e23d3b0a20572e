"""The throwaway network namespaces in which `fwsafe check` lets the kernel judge a ruleset.

A sandbox is two network namespaces, ``fwck<tag>s`` (the server: it gets the host's
interface name and addresses, the firewall under test and a listener on the management port)
and ``fwck<tag>c`` (the clients: it holds the clients' addresses); the tag begins with the PID
of the process that owns them. The access proof after a revert (fwsafe.core.revert) builds
its sandbox under its own prefix, ``fwpr``: a guard killed during that proof cannot remove it,
so whoever takes over from a dead owner (the backstop, ``fwsafe recover``) removes
``fwpr<pid>...`` namespaces whose PID is gone (:func:`remove_orphans`). They are joined by one veth
pair per host interface that management traffic arrives on; the veth is created directly in
the two namespaces, so nothing ever appears in the namespace `fwsafe check` runs in, whose
firewall is only ever read. When one address of the server is reached over several links (the
audit's sources send to every host address), each client's packets leave by its own link
(a policy rule per IPv4 client, source-specific IPv6 routes).

Everything the sandbox starts (the agents, ``nft monitor trace``) is stopped by PID in
:meth:`Sandbox.close`, and both namespaces are deleted, also after errors and interrupts.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

from fwsafe.check.netns import (
    Namespaces,
    NetnsError,
    configuring,
    remove_orphans,
)
from fwsafe.errors import EnvironmentProblem
from fwsafe.netns_agent import AGENT
from fwsafe.runner import require_binary, run

TRACE_TABLE = "fwsafe_check_trace"
CANARY_PORTS = "40000-49999"
CHECK_PREFIX = "fwck"   # `fwsafe check`, the check before `apply`, the audit
PROOF_PREFIX = "fwpr"   # the access proof after a revert


class SandboxError(Exception):
    """The sandbox could not be built or used."""


@dataclass
class LinkPlan:
    """One host interface reproduced in the server namespace."""

    name: str                                   # the host interface's name (used in S)
    mtu: int = 1500
    addresses: list[tuple[str, int]] = field(default_factory=list)  # (address, prefix length)
    clients: list[str] = field(default_factory=list)   # client addresses arriving over it
    servers: list[str] = field(default_factory=list)   # addresses they connect to

    def server_mac(self, index: int) -> str:
        return f"02:fc:c4:{index:02x}:00:01"

    def peer_mac(self, index: int) -> str:
        return f"02:fc:c4:{index:02x}:00:02"


def _host_prefix(address: str) -> str:
    return f"{address}/128" if ":" in address else f"{address}/32"


def _routes(addresses: list[str], dev: str, lladdr: str) -> list[str]:
    """`ip` commands: a host route to each address over `dev`, its neighbour entry fixed."""
    lines: list[str] = []
    for address in addresses:
        lines.append(f"route replace {_host_prefix(address)} dev {dev}")
        lines.append(f"neigh replace {address} lladdr {lladdr} dev {dev} nud permanent")
    return lines


def _by_source(link: LinkPlan, peer: str, table: int) -> list[str]:
    """`ip` commands: packets from the link's clients to its servers leave by `peer` (IPv4: a
    rule and a table of its own; IPv6: source-specific routes)."""
    lines = [f"rule add from {_host_prefix(c)} table {table}" for c in link.clients
             if ":" not in c]
    for server in link.servers:
        if ":" not in server:
            lines.append(f"route replace {_host_prefix(server)} dev {peer} table {table}")
            continue
        lines += [f"route replace {_host_prefix(server)} from {_host_prefix(c)} dev {peer}"
                  for c in link.clients if ":" in c]
    return lines


class AgentProcess:
    """The sandbox agent (fwsafe/netns_agent/agent.py) running in one namespace; one JSON
    request and answer per line."""

    def __init__(self, argv: list[str], label: str) -> None:
        self.label = label
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, start_new_session=True)
        self._buffer = b""

    def _readline(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0:
                raise SandboxError(f"the {self.label} agent did not answer within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SandboxError(f"the {self.label} agent exited: {self.stderr_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def stderr_tail(self) -> str:
        try:
            self._err.seek(0)
            return self._err.read().decode(errors="replace").strip()[-500:] or "(no output)"
        except (OSError, ValueError):
            return "(no output)"

    def wait_ready(self, timeout: float = 15.0) -> None:
        answer = json.loads(self._readline(timeout))
        if not answer.get("ready"):
            raise SandboxError(f"the {self.label} agent did not start: {answer}")

    def request(self, request: dict[str, Any], *, wait: float = 10.0) -> dict[str, Any]:
        """Send one request; wait up to `wait` seconds for the answer."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise SandboxError(f"the {self.label} agent is gone: {self.stderr_tail()}") from exc
        answer: dict[str, Any] = json.loads(self._readline(wait))
        return answer

    def stop(self) -> None:
        """Close its input (it exits by itself), then SIGKILL it by PID if it lingers."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


class TraceMonitor:
    """``nft -a monitor trace`` in the server namespace, read by a thread.

    Attempts are delimited by canaries: UDP datagrams to 127.0.0.1 on a fresh port each,
    which the trace table marks like everything else; once a canary's trace line is read,
    every event before it has been read too.
    """

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.canary_ports: set[int] = set()
        self._next_port = 40000  # within CANARY_PORTS
        self.mark = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _wait_for(self, needle: str, start: int, timeout: float) -> int | None:
        end = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    if needle in self.lines[index]:
                        return index + 1
                    index += 1
                left = end - time.monotonic()
                if left <= 0 or self._done:
                    return None
                self._cond.wait(left)

    def sync(self, agent: AgentProcess, timeout: float = 3.0, *, each: float = 0.5) -> list[str]:
        """Send canaries until one shows up; return the lines since the previous sync."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            port = self._next_port
            self._next_port += 1
            self.canary_ports.add(port)
            agent.request({"op": "canary", "port": port})
            found = self._wait_for(f"udp dport {port} ", self.mark, min(each, timeout))
            if found is not None:
                with self._cond:
                    lines = self.lines[self.mark:found]
                self.mark = found
                return lines
        raise SandboxError("nft monitor trace did not report the sandbox's canary packets")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        self._thread.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Sandbox:
    """The server/client namespace pair; use it as a context manager."""

    def __init__(self, tag: str, prefix: str = CHECK_PREFIX) -> None:
        remove_orphans(prefix)  # a sandbox whose owner was killed (SIGKILL) goes with the next
        self.srv = f"{prefix}{tag}s"
        self.cli = f"{prefix}{tag}c"
        self.namespaces = Namespaces(ip=require_binary("ip"))
        self.srv_agent: AgentProcess | None = None
        self.cli_agent: AgentProcess | None = None
        self.trace: TraceMonitor | None = None
        self.links: list[LinkPlan] = []

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- running things ---------------------------------------------------------------------------
    def in_srv(self, argv: Sequence[str]) -> list[str]:
        return self.namespaces.exec_argv(self.srv, argv)

    def in_cli(self, argv: Sequence[str]) -> list[str]:
        return self.namespaces.exec_argv(self.cli, argv)

    def srv_run(self, argv: Sequence[str], *, input: bytes | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return run(self.in_srv(argv), input=input, timeout=timeout)

    # -- building ----------------------------------------------------------------------------------
    def build(self, links: list[LinkPlan], lo_addresses: list[str], *,
              agents: bool = False, client_agent: bool = False) -> None:
        """Create both namespaces, the veth pairs, addresses, routes and neighbour entries.
        `agents`: start the agent too (and one on the client side: `client_agent`), while the
        links are wired (they start in moments of their own; then they are waited for)."""
        self.links = links
        for name in (self.srv, self.cli):
            try:
                self.namespaces.create(name, busy="refuse", lo_up=False)   # up in _wire
            except NetnsError as exc:
                raise EnvironmentProblem(
                    f"cannot create the sandbox network namespace {name}: {exc}",
                    hint="fwsafe check needs root and network namespaces (`ip netns add`)",
                ) from exc
        if agents:
            self.launch_agents(client_agent)
        try:
            self._wire(links, lo_addresses)
        except NetnsError as exc:
            raise SandboxError(str(exc)) from exc
        if agents:
            self.wait_agents()

    def _wire(self, links: list[LinkPlan], lo_addresses: list[str]) -> None:
        """The veth pairs, then one ``ip -batch`` per namespace: loopback, addresses, links up,
        routes and neighbour entries."""
        ns = self.namespaces
        srv_lines = configuring("lo", [_host_prefix(address) for address in lo_addresses])
        cli_lines = configuring("lo")
        served = [a for link in links for a in link.servers]
        shared = len(served) != len(set(served))
        for index, link in enumerate(links):
            peer = f"peer{index}"
            ns.veth(self.srv, link.name, self.cli, peer, mtu=link.mtu,
                    a_mac=link.server_mac(index), b_mac=link.peer_mac(index))
            srv_lines += configuring(link.name, [f"{a}/{p}" for a, p in link.addresses],
                                     addrgen=False)
            cli_lines += configuring(peer, [_host_prefix(c) for c in link.clients],
                                     addrgen=False)
            srv_lines += _routes(link.clients, link.name, link.peer_mac(index))
            cli_lines += _routes(link.servers, peer, link.server_mac(index))
            if shared:   # an address served over several links: each client's packets
                cli_lines += _by_source(link, peer, 100 + index)   # leave by its own link
        ns.batch(self.srv, srv_lines)
        ns.batch(self.cli, cli_lines)

    def launch_agents(self, client_side: bool) -> None:
        """Start the agent in the server namespace (and one in the client's), serving the
        check's requests and the audit's alike; `wait_agents` waits for them to be ready."""
        argv = [sys.executable, "-I", "-S", AGENT]   # stdlib only: no site (10 ms)
        self.srv_agent = AgentProcess(self.in_srv(argv), "server-side")
        if client_side:
            self.cli_agent = AgentProcess(self.in_cli(argv), "client-side")

    def wait_agents(self) -> None:
        assert self.srv_agent is not None
        self.srv_agent.wait_ready()
        if self.cli_agent is not None:
            self.cli_agent.wait_ready()

    def start_trace(self, nft: str) -> TraceMonitor:
        """Mark every packet in the server namespace for tracing, and start reading the trace."""
        table = (f"table inet {TRACE_TABLE} {{\n"
                 "  chain pre {\n    type filter hook prerouting priority -1000; policy accept;\n"
                 "    meta nftrace set 1\n  }\n"
                 "  chain out {\n    type filter hook output priority -1000; policy accept;\n"
                 "    meta nftrace set 1\n"
                 # the canaries end here: no other chain (no iptables counter) ever sees them
                 f"    ip daddr 127.0.0.1 udp dport {CANARY_PORTS} drop\n  }}\n}}\n")
        # on its standard input: the check writes no file (a sandbox killed with its owner
        # left its directory behind in /tmp, one per SIGKILL, and a full /tmp broke it)
        result = self.srv_run([nft, "-f", "-"], input=table.encode(), timeout=60)
        if result.returncode != 0:
            raise SandboxError("cannot add the trace table: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        trace = TraceMonitor(self.in_srv([nft, "-a", "monitor", "trace"]))
        assert self.srv_agent is not None
        try:
            # `nft monitor` subscribes moments after it starts: a canary sent before is not
            # traced and is sent again, every 10 ms, until one is.
            trace.sync(self.srv_agent, timeout=5.0, each=0.01)
        except SandboxError:
            trace.stop()
            raise
        self.trace = trace
        return trace

    # -- teardown ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what we started (by PID) and delete both namespaces; never raises."""
        errors: list[str] = []
        for agent in (self.srv_agent, self.cli_agent):   # both end at once: end of input
            if agent is not None and agent.proc.stdin is not None:
                try:
                    agent.proc.stdin.close()
                except OSError:
                    pass
        for stop in (self.trace, self.srv_agent, self.cli_agent):
            if stop is None:
                continue
            try:
                stop.stop()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(str(exc))
        self.trace = self.srv_agent = self.cli_agent = None
        try:
            self.namespaces.close()
        except NetnsError as exc:
            errors.append(str(exc))
        if errors:
            print("fwsafe: warning: sandbox teardown: " + "; ".join(errors), file=sys.stderr)
