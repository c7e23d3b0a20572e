"""Real packets through the sandbox, and what the kernel says about them: each attempt (a new
connection, data on an established one) is followed by the iptables counters and the nft trace
it caused, which name the rule that dropped it (the culprit) and tell which rules the sandbox
cannot reproduce it met on its way (then the verdict is "not checked", never "safe")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fwsafe.check.host import ClientPath
from fwsafe.check.ipt_counters import counted_drops, counter_delta, evaluated_rules, reachable_chains
from fwsafe.check.loading import SandboxFirewall
from fwsafe.check.nft_listing import (
    NFT_DROP_VERDICTS,
    NFT_TERMINAL_VERDICTS,
    ChainKey,
    TraceEvent,
    nft_reachable,
    parse_trace_line,
)
from fwsafe.check.relevance import ipt_verdict_free, nft_verdict_free
from fwsafe.check.sandbox import TRACE_TABLE
from fwsafe.check.unreproducible import (
    ipt_excludes_tcp,
    ipt_interface_only,
    ipt_unreproducible,
    nft_excludes_tcp,
    nft_unreproducible,
)

__all__ = ["Attempt", "NotChecked", "Prober", "find_not_checked"]


@dataclass
class NotChecked:
    """A rule of the sandbox's firewall whose outcome the sandbox cannot reproduce."""

    where: str
    reasons: list[str]
    interface_only: bool
    excludes_tcp: bool
    family: int | None          # None: both (nft inet)
    ipt_key: tuple[int, str, str, int] | None = None   # (tool index, table, chain, rule index)
    nft_key: tuple[ChainKey, int] | None = None         # (chain, rule position)
    verdict_free: bool = False  # matched or not, the packet ends the same (fwsafe.check.relevance)

    def text(self) -> str:
        return f"{self.where}: {'; '.join(self.reasons)}"


@dataclass
class Attempt:
    ok: bool
    error: str | None
    culprits: list[str]
    relevant: list[str]     # rules it met whose outcome the sandbox cannot reproduce and that
                            # could change its verdict


def find_not_checked(firewall: SandboxFirewall, known_interfaces: list[str]) -> list[NotChecked]:
    """Every reachable rule of the loaded firewall (read by ``read_state``) that the sandbox
    cannot reproduce; ``known_interfaces`` are those it has."""
    namer, listing = firewall.namer, firewall.namer.listing
    found: list[NotChecked] = []
    for t_index, tool in enumerate(firewall.tools):
        tables = tool.snapshot
        for table, chain in sorted(reachable_chains(tables)):
            for rule in tables[table].chains[chain].each_rule():
                reasons = ipt_unreproducible(rule, known_interfaces)
                if not reasons:
                    continue
                found.append(NotChecked(
                    namer.ipt_where(tool, table, chain, rule.index), reasons,
                    ipt_interface_only(reasons), ipt_excludes_tcp(rule, tool.family),
                    tool.family, ipt_key=(t_index, table, chain, rule.index),
                    verdict_free=ipt_verdict_free(tables[table].chains, chain, rule.index)))
    skip = firewall.ipt_owned | {(f, n) for f, n in listing.tables if n == TRACE_TABLE}
    for key in sorted(nft_reachable(listing, skip)):
        for position, nft_rule in enumerate(listing.chains[key].rules, start=1):
            reasons = nft_unreproducible(nft_rule, key, listing, known_interfaces)
            if not reasons:
                continue
            found.append(NotChecked(
                namer.nft_where(key, nft_rule.handle), reasons,
                all(r.startswith("interface ") for r in reasons), nft_excludes_tcp(nft_rule),
                {"ip": 4, "ip6": 6}.get(key[0]), nft_key=(key, position),
                verdict_free=nft_verdict_free(nft_rule)))
    return found


class Prober:
    """Makes the attempts for the client paths and reads the kernel's answer to each."""

    def __init__(self, firewall: SandboxFirewall, timeout: float) -> None:
        self.firewall = firewall
        self.sandbox = firewall.sandbox
        self.timeout = timeout
        self.not_checked: list[NotChecked] = []

    def attempt(self, path: ClientPath, request: dict[str, Any]) -> Attempt:
        """Send ``request`` to the agent on the path's client side; what happened, and why."""
        sandbox, firewall = self.sandbox, self.firewall
        agent = sandbox.srv_agent if path.local else sandbox.cli_agent
        assert agent is not None
        family_tools = [(i, t) for i, t in enumerate(firewall.tools) if t.family == path.family]
        answer = agent.request(request, wait=self.timeout + 10)
        culprits: list[str] = []
        relevant: list[str] = []
        met: set[tuple[int, str, str, int]] = set()
        for t_index, tool in family_tools:
            after = firewall.snapshot(tool)
            deltas = counter_delta(tool.snapshot, after)
            tool.snapshot = after
            if not answer.get("ok"):
                for drop in counted_drops(after, deltas):
                    where = firewall.namer.ipt_where(tool, drop.table, drop.chain, drop.index)
                    culprits.append(f"{where} (kernel counter: {drop.packets} packet(s))")
            met |= {(t_index, *k) for k in evaluated_rules(after, deltas)}
        events: list[TraceEvent] = []
        if sandbox.trace is not None and sandbox.srv_agent is not None:
            events = self._trace_events(sandbox.trace.sync(sandbox.srv_agent))
            if not answer.get("ok"):
                culprits += self._trace_culprits(events)
        nft_met = self._nft_met(events)
        for item in self.not_checked:
            if item.interface_only or item.excludes_tcp or item.verdict_free:
                continue
            if item.family is not None and item.family != path.family:
                continue
            if (item.ipt_key and item.ipt_key in met) or (item.nft_key and item.nft_key in nft_met):
                relevant.append(item.text())
        return Attempt(bool(answer.get("ok")), answer.get("error"), culprits, relevant)

    def _trace_events(self, lines: list[str]) -> list[TraceEvent]:
        trace = self.sandbox.trace
        assert trace is not None
        events = [e for e in (parse_trace_line(line) for line in lines) if e is not None]
        canaries = set()
        for event in events:
            if event.kind == "packet":
                m = re.search(r"udp dport (\d+)", event.text)
                if m and int(m.group(1)) in trace.canary_ports:
                    canaries.add(event.trace_id)
        skip = self.firewall.ipt_owned
        return [e for e in events if e.trace_id not in canaries
                and (e.chain[0], e.chain[1]) not in skip and e.chain[1] != TRACE_TABLE]

    def _trace_culprits(self, events: list[TraceEvent]) -> list[str]:
        seen: list[str] = []
        for event in events:
            if event.verdict not in NFT_DROP_VERDICTS:
                continue
            where = self.firewall.namer.nft_where(
                event.chain, event.handle if event.kind == "rule" else None)
            where += " (nft trace: verdict " + event.verdict + ")"
            if where not in seen:
                seen.append(where)
        return seen

    def _nft_met(self, events: list[TraceEvent]) -> set[tuple[ChainKey, int]]:
        by_chain: dict[ChainKey, list[TraceEvent]] = {}
        for event in events:
            by_chain.setdefault(event.chain, []).append(event)
        met: set[tuple[ChainKey, int]] = set()
        for key, chain_events in by_chain.items():
            chain = self.firewall.namer.listing.chains.get(key)
            if chain is None:
                continue
            bound = len(chain.rules)
            terminal = [chain.position(e.handle) for e in chain_events
                        if e.kind == "rule" and e.handle is not None
                        and e.verdict in NFT_TERMINAL_VERDICTS]
            positions = [p for p in terminal if p is not None]
            if positions and not any(e.kind == "policy" for e in chain_events):
                bound = max(positions)
            met |= {(key, i) for i in range(1, bound + 1)}
        return met

    def diagnose_current(self, family: int) -> list[str]:
        """Why a connection could not be opened under the current rules (counters since load)."""
        culprits = []
        for tool in self.firewall.tools:
            if tool.family != family:
                continue
            after = self.firewall.snapshot(tool)
            for drop in counted_drops(after, counter_delta({}, after)):
                where = self.firewall.namer.ipt_where(tool, drop.table, drop.chain, drop.index)
                culprits.append(f"{where} ({drop.packets} packet(s))")
        return culprits
