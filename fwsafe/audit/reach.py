"""Which outside addresses reach each listener: the kernel's answer, in the check's sandbox.

The sandbox of `fwsafe check` (fwsafe.check.sandbox) is built with this host's interfaces
(fwsafe.audit.plan), the host's current firewall is loaded into its server namespace
(fwsafe.check.loading, as `check` does), and a copy of every listener that is not bound to
loopback listens there: the same protocol, address, port and IPV6_V6ONLY. Then the sources
send real packets, all at once: a TCP connection attempt to each TCP listener (reached when
the handshake completes) and a UDP datagram to each UDP listener (reached when the copy
receives it), to every address of this host they would use. A batch is over when the
server's packet tap saw every probe arrive and what the kernel did with it (a SYN-ACK, a RST
or an ICMP error left, the datagram was received), or GRACE s later for those it dropped
silently: no probe waits a whole timeout unless its packet never arrives. With a candidate
ruleset the same is done again after loading it on top, exactly as `fwsafe apply` would
(each attempt from a source port of its own, so conntrack knows none of them from the first
round).

The probes cover the space the rules tell apart (fwsafe.audit.space): a source in every
network a rule names and one anywhere else, an ephemeral source port and every one a rule
names, every address of this host; rate limits and connection counts are loaded as a quiet
host answers them (the first connection after idle). The ipsets and the xt_recent lists are
copied into the sandbox.

What the sandbox cannot reproduce (socket owners, marks, random sampling, ...) is listed in
``not_checked``; a listener such a rule may concern that no probe reached is *uncertain*
(``problem`` starts with "uncertain"), never "not exposed". A current layer the sandbox could
not copy is in ``notes``. The firewall of the namespace that runs the audit is only read.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.audit.listeners import Listener
from fwsafe.audit.nat import Forward, nat_rules
from fwsafe.audit.plan import Plan, Source, is_world, make_plan
from fwsafe.audit.space import MAX_CELLS, PER_SHAPE, idle, named_space
from fwsafe.backends import NFT_TABLES, first_with
from fwsafe.check.attempts import NotChecked, find_not_checked
from fwsafe.check.host import IptTool, current_state, host_interfaces
from fwsafe.check.loading import SandboxFirewall
from fwsafe.check.predict import scratch_sandbox
from fwsafe.check.sandbox import Sandbox, SandboxError
from fwsafe.errors import EnvironmentProblem
from fwsafe.runner import find_binary, require_binary, run

__all__ = ["CANDIDATE", "CURRENT", "DEFAULT_TIMEOUT", "Reach", "ReachReport", "reachability"]

CURRENT, CANDIDATE = "current", "candidate"
DEFAULT_TIMEOUT = 1.0
GRACE = 0.15   # s after a probe's packet arrived: its fate is decided in that pass of the kernel,
               # so one still undecided then was dropped
_FIRST_PORT, _LAST_PORT = 20000, 60999
Key = tuple[str, int, str, int]


@dataclass
class Reach:
    """One listener under one ruleset: the sources that reached it, as (name, family), or why
    it was not tried."""

    pairs: list[tuple[str, int]] = field(default_factory=list)
    problem: str | None = None
    # a rule the sandbox cannot reproduce may let in what no probe reached (the rule named)
    uncertain: str | None = None

    @property
    def world(self) -> bool | None:
        """Reached from the world (at large or a network a rule names); None: uncertain."""
        if any(is_world(name) for name, _ in self.pairs):
            return True
        return None if (self.uncertain or self.problem) else False

    @property
    def reached(self) -> list[str]:
        """The names of the sources that reached it ("world", subnets), in the plan's order."""
        return list(dict.fromkeys(name for name, _ in self.pairs))

    def families(self, name: str) -> list[int]:
        return sorted({family for n, family in self.pairs if n == name})


@dataclass
class ReachReport:
    sources: list[Source] = field(default_factory=list)
    sports: list[int] = field(default_factory=list)
    forwards: dict[str, list[Forward]] = field(default_factory=dict)   # by round
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
    if first_with(NFT_TABLES, layers) is not None:   # an nft script to load
        require_binary("nft")
    tools, native = current_state(layers, captured)
    avoid = "\n".join(t.current.decode(errors="replace") for t in tools) \
        + native.decode(errors="replace")
    sets = _ipsets()
    recent = _recent_lists()
    texts = [avoid, sets, *(c.decode(errors="replace") for c, _ in layers.values()),
             "\n".join(f"recent {name} {a}" for name, found in recent.items() for a in found)]
    space = named_space(texts)
    _idle(tools, layers)
    native = idle(native.decode(errors="replace")).encode()
    interfaces = host_interfaces()
    plan = make_plan(interfaces, avoid, space)
    plan.sports = space.sports
    local = {a for i in interfaces.values() for a, _, _ in i.addresses}
    native_text = native.decode(errors="replace")
    entries, forwards = nat_rules([(t.family, t.current.decode(errors="replace"))
                                   for t in tools], local, native_text)
    forwards_by_round = {CURRENT: forwards}
    if candidate is not None:
        nft = first_with(NFT_TABLES, layers)
        nft_candidate = layers[nft][0].decode(errors="replace") if nft is not None else ""
        more, forwards_by_round[CANDIDATE] = nat_rules(
            [(t.family, (t.candidate[0] if t.candidate else t.current).decode(errors="replace"))
             for t in tools], local, native_text + "\n" + nft_candidate)
        entries = list(dict.fromkeys([*entries, *more]))
    plan.entries = entries
    if space.collapsed:
        plan.notes.append(f"{space.collapsed} network(s) the rules name were tried through "
                          f"another of the same rule shape (at most {PER_SHAPE} of a shape, "
                          f"{MAX_CELLS} per family)")
    report = ReachReport(sources=plan.sources, sports=list(space.sports),
                         notes=list(plan.notes), forwards=forwards_by_round)
    rounds = [CURRENT, CANDIDATE] if candidate is not None else [CURRENT]
    # loopback listeners: only a translation (DNAT to 127.0.0.1, route_localnet) reaches them
    outside = [x for x in listeners if not x.loopback or entries]
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
        rounds_ = _Rounds(sandbox, firewall, plan, timeout)
        rounds_.ipsets = sets
        rounds_.recent = recent
        rounds_.knocks = _knocks([avoid, *(c.decode(errors="replace")
                                           for c, _ in layers.values())])
        rounds_.run(outside, rounds, report, sandbox_addresses)
    return report


def _idle(tools: list[IptTool], layers: dict[str, tuple[bytes, str]]) -> None:
    """Every ruleset the sandbox loads, as a quiet host answers it (fwsafe.audit.space)."""
    for tool in tools:
        tool.current = idle(tool.current.decode(errors="replace")).encode()
        if tool.candidate is not None:
            content, source = tool.candidate
            tool.candidate = (idle(content.decode(errors="replace")).encode(), source)
    nft = first_with(NFT_TABLES, layers)
    if nft is not None:
        content, source = layers[nft]
        layers[nft] = (idle(content.decode(errors="replace")).encode(), source)


def _recent_lists(root: Path = Path("/proc/net/xt_recent")) -> dict[str, list[str]]:
    """The addresses in each xt_recent list of this namespace (`-m recent`): the sandbox gets
    the same lists, and each address is a source of its own."""
    found: dict[str, list[str]] = {}
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError:
        return found
    for name in names:
        try:
            text = (root / name).read_text()
        except OSError:
            continue
        found[name] = [m.group(1) for m in re.finditer(r"^src=(\S+)", text, re.M)]
    return found


_RECENT_NAME = re.compile(r"--name\s+(\S+)")


def _knocks(texts: Sequence[str]) -> dict[str, str]:
    """list name -> the first rule that adds addresses to it (`-m recent --set`): a packet
    that rule matches opens whatever checks the list (port knocking)."""
    found: dict[str, str] = {}
    for text in texts:
        for line in text.splitlines():
            if "-m recent" in line and "--set" in line.split():
                name = _RECENT_NAME.search(line)
                found.setdefault(name.group(1) if name else "DEFAULT", line.strip())
    return found


def _ipsets() -> str:
    """`ipset save` of this host ("" where there is none): the sandbox gets the same sets."""
    ipset = find_binary("ipset")
    if ipset is None:
        return ""
    try:
        result = run([ipset, "save"], timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.decode(errors="replace") if result.returncode == 0 else ""


class _Rounds:
    """The sandbox, its listeners, and one round of attempts per ruleset."""

    ipsets = ""
    recent: dict[str, list[str]] = {}    # xt_recent lists of the host: name -> addresses
    knocks: dict[str, str] = {}          # lists a rule fills (--set): name -> that rule

    def __init__(self, sandbox: Sandbox, firewall: SandboxFirewall, plan: Plan,
                 timeout: float) -> None:
        self.sandbox = sandbox
        self.firewall = firewall
        self.plan = plan
        self.timeout = timeout
        self.ports = itertools.cycle(range(_FIRST_PORT, _LAST_PORT + 1))
        self.numbers = itertools.count()
        self.labels: dict[str, Key] = {}

    def run(self, listeners: list[Listener], rounds: list[str], report: ReachReport,
            addresses: list[str]) -> None:
        problems = {x.key(): self.plan.unplaced(x) for x in listeners}
        try:
            self.sandbox.build(self.plan.links, self.plan.lo_addresses, agents=True,
                               client_agent=True)
            # After the build: the pruning analysis may still be running ahead in a thread.
            self.firewall.prune_to(addresses, ["lo", *(link.name for link in self.plan.links)])
            for listener in listeners:
                if problems[listener.key()] is None:
                    problems[listener.key()] = self._serve(listener)
            if self.plan.entries:
                self._copy_sysctls()
            if self.ipsets.strip():
                loaded = self.sandbox.srv_run([require_binary("ipset"), "restore", "-exist"],
                                              input=self.ipsets.encode(), timeout=120)
                if loaded.returncode != 0:
                    report.notes.append("the ipsets could not be copied into the sandbox: "
                                        + loaded.stderr.decode(errors="replace").strip()[:200])
            self.firewall.load_current()
            self._copy_recent(report)
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
                    self._copy_recent(report)
                results.update(self._attempts(name, placed))
                report.rounds[name] = results
            self.firewall.read_state()
            known = ["lo", *(link.name for link in self.plan.links)]
            items = [item for item in (dataclasses.replace(i, reasons=self._recent_reasons(i))
                                       for i in find_not_checked(self.firewall, known))
                     if item.reasons]
            report.not_checked = [item.text() for item in items]
            for name in rounds:
                self._uncertain(report.rounds.get(name, {}), placed, items)
        except SandboxError as exc:
            raise EnvironmentProblem(f"the audit's sandbox failed: {exc}") from exc
        report.notes += self.firewall.degraded + self.firewall.notes

    def _copy_recent(self, report: ReachReport) -> None:
        """The host's xt_recent lists into the sandbox (the rules that check them are loaded,
        so the lists exist there): whoever is in one now is let in as on the host."""
        agent = self.sandbox.srv_agent
        assert agent is not None
        for name, addresses in self.recent.items():
            if addresses:
                answer = agent.request({"op": "recent", "name": name, "addresses": addresses})
                if not answer.get("ok") and f"the recent list {name}" not in " ".join(
                        report.notes):
                    report.notes.append(f"the recent list {name} could not be copied into the "
                                        f"sandbox: {answer.get('error')}")

    def _recent_reasons(self, item: NotChecked) -> list[str]:
        """`item`'s reasons, with `recent` decided where the sandbox has the host's lists: a
        rule that only adds (--set) is reproduced; one that checks a list (--rcheck,
        --update) is reproduced unless another rule fills that list (port knocking: the
        sandbox's probes do not knock), which is then said precisely."""
        if not any(r.startswith("recent:") for r in item.reasons) or item.ipt_key is None:
            return item.reasons
        t_index, table, chain, index = item.ipt_key
        rule = self.firewall.tools[t_index].snapshot[table].chains[chain].rule(index)
        words = rule.tokens
        name = rule.option("--name") or "DEFAULT"
        reasons = [r for r in item.reasons if not r.startswith("recent:")]
        if not {"--rcheck", "--update"} & set(words):
            return reasons
        knock = self.knocks.get(name)
        if knock is not None:
            reasons.append(f"recent: port knocking (the list {name} is filled by `{knock}`: "
                           "whoever first sends what that rule matches is let in; the "
                           "audit's probes do not knock)")
        return reasons

    def _uncertain(self, results: dict[Key, Reach], listeners: list[Listener],
                   items: list[NotChecked]) -> None:
        """A listener that no probe (or no world probe) reached, and that a rule the
        sandbox cannot reproduce may concern, is uncertain: that rule may let others in."""
        for listener in listeners:
            result = results.get(listener.key())
            if result is None or result.problem or result.world:
                continue
            why = [item.text() for item in items
                   if _concerns(item, self.firewall, listener, bool(self.ipsets.strip()))]
            if why:
                result.uncertain = "; ".join(why[:3]) + (f" (and {len(why) - 3} more)"
                                                          if len(why) > 3 else "")

    def _copy_sysctls(self) -> None:
        """route_localnet (a DNAT to 127.0.0.1 reaches loopback listeners only with it)."""
        agent = self.sandbox.srv_agent
        assert agent is not None
        for name in ["all", "default", *(link.name for link in self.plan.links)]:
            key = f"ipv4/conf/{name}/route_localnet"
            try:
                value = Path("/proc/sys/net", key).read_text().strip()
            except OSError:
                continue
            agent.request({"op": "sysctl", "name": key, "value": value})

    def _serve(self, listener: Listener) -> str | None:
        agent = self.sandbox.srv_agent
        assert agent is not None
        label = _label(listener.key())
        self.labels[label] = listener.key()
        answer = agent.request({"op": "serve", "proto": listener.proto,
                                "address": listener.address, "port": listener.port,
                                "v6only": listener.v6only is True,
                                "device": listener.device, "label": label})
        return None if answer.get("ok") else str(answer.get("error"))

    def _send(self, attempts: list[dict[str, Any]]) -> set[str]:
        """Send the attempts in batches; the ids that reached their listener. A batch is over
        as soon as the sandbox's server saw each attempt's packet arrive (its tap) and what
        the kernel did with it (a SYN-ACK, a RST or an ICMP error left, the datagram was
        received), or GRACE s after: a dropped probe costs no more than that (only a packet
        that never arrives waits the whole timeout)."""
        client, server = self.sandbox.cli_agent, self.sandbox.srv_agent
        assert client is not None and server is not None
        reached: set[str] = set()
        index = 0
        size = int(client.request({"op": "start", "attempts": []}).get("batch", 400))
        while index < len(attempts):
            batch = attempts[index:index + size]
            tapped = bool(server.request({"op": "tap"}).get("ok"))
            started = client.request({"op": "start", "attempts": batch})
            if not started.get("ok"):
                raise SandboxError(f"the client-side agent failed: {started.get('error')}")
            index += len(batch)
            failed: dict[str, str | None] = started["results"]
            sent = [a for a in batch if failed.get(str(a["id"])) is None]
            keys = {str(a["id"]): _tap_key(a) for a in sent}
            settled = server.request(
                {"op": "settle", "probes": [[i, *k] for i, k in keys.items()],
                 "wait": self.timeout if tapped else 0, "grace": GRACE if tapped
                 else self.timeout}, wait=self.timeout + GRACE + 10)
            reached |= set(settled.get("heard", []))
            tcp = [str(a["id"]) for a in sent if a["proto"] == "tcp"]
            if settled.get("arrived"):   # a SYN-ACK left for these: they complete
                answered = {tuple(k) for k in settled.get("answered", [])}
                expect, wait = [i for i in tcp if tuple(keys[i]) in answered], self.timeout
            else:   # no tap, or a packet never came: every connect had the timeout, and more
                expect, wait = tcp, GRACE
            finished = client.request({"op": "finish", "expect": expect, "wait": wait},
                                      wait=wait + 10)
            if not finished.get("ok"):
                raise SandboxError(f"the client-side agent failed: {finished.get('error')}")
            reached |= {i for i, error in finished["results"].items() if error is None}
        return reached

    def _attempts(self, round_name: str, listeners: list[Listener]) -> dict[Key, Reach]:
        """One attempt per listener, source and destination address, all at once."""
        attempts: list[dict[str, Any]] = []
        who: dict[str, tuple[Key | None, tuple[str, int]]] = {}
        assert self.sandbox.srv_agent is not None
        self.sandbox.srv_agent.request({"op": "peers", "settle": 0})   # forget the last round
        for listener in listeners:
            for source in self.plan.sources:
                for destination in self.plan.destinations(listener, source):
                    for sport in [next(self.ports), *self.plan.sports]:
                        ident = f"{round_name}-{next(self.numbers)}"
                        who[ident] = (listener.key(), (source.name, source.family))
                        attempts.append({"id": ident, "proto": listener.proto,
                                         "src": source.address, "sport": sport,
                                         "dst": destination, "port": listener.port})
        for entry in self.plan.entries:   # translated ports: the receiving listener counts
            for source in self.plan.sources:
                if source.family != entry.family:
                    continue
                for destination in self.plan.host_addresses(entry.family):
                    for sport in [next(self.ports), *self.plan.sports]:
                        ident = f"{round_name}-{next(self.numbers)}"
                        who[ident] = (None, (source.name, source.family))
                        attempts.append({"id": ident, "proto": entry.proto,
                                         "src": source.address, "sport": sport,
                                         "dst": destination, "port": entry.port})
        reached = self._send(attempts) if attempts else set()
        reached = {i for i in reached if who[i][0]}
        by_key: dict[Key, set[tuple[str, int]]] = {}
        for ident in reached:
            key, pair = who[ident]
            if key is not None:
                by_key.setdefault(key, set()).add(pair)
        if self.plan.entries:   # who each listener heard from, also through a translation
            sources = {s.address: (s.name, s.family) for s in self.plan.sources}
            heard_from = self.sandbox.srv_agent.request({"op": "peers", "settle": 0.2})
            for label, peers in heard_from.get("peers", {}).items():
                known = self.labels.get(label)
                if known is not None:
                    by_key.setdefault(known, set()).update(
                        sources[p] for p in peers if p in sources)
        order = list(dict.fromkeys((s.name, s.family) for s in self.plan.sources))
        return {x.key(): Reach([p for p in order if p in by_key.get(x.key(), set())])
                for x in listeners}


# Reasons the audit's sandbox does reproduce (fwsafe.audit.space's idle state; ipsets copied).
_REPRODUCED = ("limit:", "hashlimit:", "connlimit:", "limit rate:", "ct count:")
_NFT_PORTS = re.compile(r"\b(tcp|udp|th)\s+dport\s+(!=\s*)?(\{[^}]*\}|\S+)")


def _concerns(item: NotChecked, firewall: SandboxFirewall, listener: Listener,
              ipsets: bool) -> bool:
    """May the rule `item` change whether packets reach `listener`?"""
    reasons = [r for r in item.reasons if not r.startswith(_REPRODUCED)
               and not (ipsets and r.startswith("set:"))]
    if not reasons or item.interface_only:
        return False
    if item.family is not None and item.family not in listener.families:
        return False
    if item.ipt_key is not None:
        t_index, table, chain, index = item.ipt_key
        rule = firewall.tools[t_index].snapshot[table].chains[chain].rule(index)
        proto = rule.option("-p", "--protocol")
        if proto and not rule.negated("-p") and proto.lower() not in (listener.proto, "all"):
            return False
        ports = rule.option("--dport", "--destination-port", "--dports", "--destination-ports")
        if ports and not rule.negated("--dport") and not rule.negated("--dports"):
            return _port_in(listener.port, ports)
        return True
    if item.nft_key is not None:
        key, position = item.nft_key
        text = firewall.namer.listing.chains[key].rules[position - 1].text
        match = _NFT_PORTS.search(text)
        if match and not match.group(2):
            if match.group(1) in ("tcp", "udp") and match.group(1) != listener.proto:
                return False
            return _port_in(listener.port, match.group(3))
    return True


def _port_in(port: int, spec: str) -> bool:
    """`port` in an iptables/nft port list ("22", "80,443", "1000:2000", "{ 22, 80-90 }")."""
    for part in re.split(r"[,\s{}]+", spec):
        if not part:
            continue
        low, _, high = part.replace("-", ":").partition(":")
        try:
            if int(low or 0) <= port <= int(high or low or 65535):
                return True
        except ValueError:
            return True   # a name or a set: it may
    return False


def _tap_key(attempt: Mapping[str, Any]) -> list[Any]:
    """The attempt as the server's tap sees its packet: (proto, src, sport, dst, port)."""
    return [str(attempt["proto"]), ipaddress.ip_address(str(attempt["src"])).compressed,
            int(attempt["sport"]), ipaddress.ip_address(str(attempt["dst"])).compressed,
            int(attempt["port"])]


def _label(key: Key) -> str:
    return "|".join(str(part) for part in key)
