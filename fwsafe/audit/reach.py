"""Which outside addresses reach each listener: the kernel's answer, in the check's sandbox.

The sandbox of `fwsafe check` (fwsafe.check.sandbox) is built with this host's interfaces
(fwsafe.audit.plan), the host's current firewall is loaded into its server namespace
(fwsafe.check.loading, as `check` does), and a copy of every listener that is not bound to
loopback listens there: the same protocol, address, port and IPV6_V6ONLY. Then the sources
send real packets, all at once: a TCP connection attempt to each TCP listener (reached when
the handshake completes) and a UDP datagram to each UDP listener (reached when the copy
receives it), to every address of this host they would use. With a candidate ruleset the
same is done again after loading it on top, exactly as `fwsafe apply` would (each attempt
from a source port of its own, so conntrack knows none of them from the first round).

What the sandbox cannot reproduce (rate limits, socket owners, marks, ...) is listed in
``not_checked``; a current layer it could not copy is in ``notes``. The firewall of the
namespace that runs the audit is only read.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.audit.listeners import Listener
from fwsafe.audit.plan import Plan, Source, make_plan
from fwsafe.check.attempts import find_not_checked
from fwsafe.check.host import current_state, host_interfaces
from fwsafe.check.loading import SandboxFirewall
from fwsafe.check.predict import scratch_sandbox
from fwsafe.check.sandbox import Sandbox, SandboxError
from fwsafe.errors import EnvironmentProblem
from fwsafe.runner import require_binary

__all__ = ["CANDIDATE", "CURRENT", "DEFAULT_TIMEOUT", "Reach", "ReachReport", "reachability"]

AGENT = Path(__file__).with_name("agent.py")
CURRENT, CANDIDATE = "current", "candidate"
DEFAULT_TIMEOUT = 1.0
_FIRST_PORT, _LAST_PORT = 20000, 60999
Key = tuple[str, int, str, int]


@dataclass
class Reach:
    """One listener under one ruleset: the sources that reached it, as (name, family), or why
    it was not tried."""

    pairs: list[tuple[str, int]] = field(default_factory=list)
    problem: str | None = None

    @property
    def reached(self) -> list[str]:
        """The names of the sources that reached it ("world", subnets), in the plan's order."""
        return list(dict.fromkeys(name for name, _ in self.pairs))

    def families(self, name: str) -> list[int]:
        return sorted({family for n, family in self.pairs if n == name})


@dataclass
class ReachReport:
    sources: list[Source] = field(default_factory=list)
    rounds: dict[str, dict[Key, Reach]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)

    def reach(self, round_name: str, listener: Listener) -> Reach:
        return self.rounds.get(round_name, {}).get(listener.key(), Reach())

    def sources_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.sources]


def reachability(listeners: Sequence[Listener], *,
                 candidate: Mapping[str, tuple[bytes, str]] | None = None,
                 timeout: float = DEFAULT_TIMEOUT,
                 captured: Mapping[str, bytes] | None = None) -> ReachReport:
    """Which sources reach each listener under the current rules ("current") and, with
    `candidate` (layer -> (content, source) as `fwsafe check` loads it), under the candidate
    loaded on top ("candidate"). Loopback listeners are never tried (never reached).

    Raises EnvironmentProblem when the sandbox cannot be built, InvalidRulesError when the
    kernel refuses the candidate."""
    if os.geteuid() != 0:
        raise EnvironmentProblem("the audit must run as root (it builds network namespaces "
                                 "and reads every process's sockets)",
                                 hint="try: sudo fwsafe audit")
    layers = dict(candidate or {})
    if "nft" in layers:
        require_binary("nft")
    tools, native = current_state(layers, captured)
    avoid = "\n".join(t.current.decode(errors="replace") for t in tools) \
        + native.decode(errors="replace")
    interfaces = host_interfaces()
    plan = make_plan(interfaces, avoid)
    report = ReachReport(sources=plan.sources, notes=list(plan.notes))
    rounds = [CURRENT, CANDIDATE] if candidate is not None else [CURRENT]
    outside = [x for x in listeners if not x.loopback]
    if not outside:
        report.rounds = {name: {} for name in rounds}
        return report
    # its own sandbox: it may run beside the check's
    with scratch_sandbox(f"{os.getpid()}x") as sandbox:
        firewall = SandboxFirewall(sandbox, layers, tools, native)
        sandbox_addresses = [*(a for i in interfaces.values() for a, _, _ in i.addresses),
                             *(s.address for s in plan.sources), *plan.lo_addresses,
                             *(a for link in plan.links for a, _ in link.addresses),
                             *(c for link in plan.links for c in link.clients)]
        _Rounds(sandbox, firewall, plan, timeout).run(outside, rounds, report,
                                                      sandbox_addresses)
    return report


class _Rounds:
    """The sandbox, its listeners, and one round of attempts per ruleset."""

    def __init__(self, sandbox: Sandbox, firewall: SandboxFirewall, plan: Plan,
                 timeout: float) -> None:
        self.sandbox = sandbox
        self.firewall = firewall
        self.plan = plan
        self.timeout = timeout
        self.ports = itertools.cycle(range(_FIRST_PORT, _LAST_PORT + 1))
        self.numbers = itertools.count()

    def run(self, listeners: list[Listener], rounds: list[str], report: ReachReport,
            addresses: list[str]) -> None:
        problems = {x.key(): self.plan.unplaced(x) for x in listeners}
        try:
            self.sandbox.build(self.plan.links, self.plan.lo_addresses, agents=(True, AGENT))
            # After the build: the pruning analysis may still be running ahead in a thread.
            self.firewall.prune_to(addresses)
            for listener in listeners:
                if problems[listener.key()] is None:
                    problems[listener.key()] = self._serve(listener)
            self.firewall.load_current()
            placed = [x for x in listeners if problems[x.key()] is None]
            for name in rounds:
                results = {k: Reach(problem=f"not checked: {p}") for k, p in problems.items()
                           if p is not None}
                if name == CANDIDATE:
                    failed = self.firewall.load_candidate()
                    if failed is not None:
                        report.notes.append(f"the sandbox could not load the candidate: {failed}")
                        results.update({x.key(): Reach(problem=f"not checked: {failed}")
                                        for x in placed})
                        report.rounds[name] = results
                        break
                results.update(self._attempts(name, placed))
                report.rounds[name] = results
            self.firewall.read_state()
            known = ["lo", *(link.name for link in self.plan.links)]
            report.not_checked = [item.text()
                                  for item in find_not_checked(self.firewall, known)]
        except SandboxError as exc:
            raise EnvironmentProblem(f"the audit's sandbox failed: {exc}") from exc
        report.notes += self.firewall.degraded + self.firewall.notes

    def _serve(self, listener: Listener) -> str | None:
        agent = self.sandbox.srv_agent
        assert agent is not None
        answer = agent.request({"op": "serve", "proto": listener.proto,
                                "address": listener.address, "port": listener.port,
                                "v6only": listener.v6only is True})
        return None if answer.get("ok") else str(answer.get("error"))

    def _attempts(self, round_name: str, listeners: list[Listener]) -> dict[Key, Reach]:
        """One attempt per listener, source and destination address, all at once."""
        attempts: list[dict[str, Any]] = []
        who: dict[str, tuple[Key, tuple[str, int]]] = {}
        for listener in listeners:
            for source in self.plan.sources:
                for destination in self.plan.destinations(listener, source):
                    ident = f"{round_name}-{next(self.numbers)}"
                    who[ident] = (listener.key(), (source.name, source.family))
                    attempts.append({"id": ident, "proto": listener.proto,
                                     "src": source.address, "sport": next(self.ports),
                                     "dst": destination, "port": listener.port})
        reached: set[str] = set()
        if attempts:
            assert self.sandbox.cli_agent is not None and self.sandbox.srv_agent is not None
            batches = len(attempts) // 400 + 1
            answer = self.sandbox.cli_agent.request(
                {"op": "reach", "attempts": attempts, "timeout": self.timeout},
                wait=batches * (self.timeout + 5) + 10)
            if not answer.get("ok"):
                raise SandboxError(f"the client-side agent failed: {answer.get('error')}")
            results: dict[str, str | None] = answer["results"]
            reached = {i for i, error in results.items()
                       if error is None and who[i][0][0] == "tcp"}
            sent = [i for i, error in results.items() if error is None and who[i][0][0] == "udp"]
            if sent:
                heard = self.sandbox.srv_agent.request(
                    {"op": "heard", "ids": sent, "wait": self.timeout},
                    wait=self.timeout + 10)
                reached |= set(heard.get("heard", []))
        by_key: dict[Key, set[tuple[str, int]]] = {}
        for ident in reached:
            key, pair = who[ident]
            by_key.setdefault(key, set()).add(pair)
        order = list(dict.fromkeys((s.name, s.family) for s in self.plan.sources))
        return {x.key(): Reach([p for p in order if p in by_key.get(x.key(), set())])
                for x in listeners}
