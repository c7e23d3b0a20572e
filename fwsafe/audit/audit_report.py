"""The audit's answers: every listener with who reaches it, and the findings (`AuditReport`);
and what a candidate ruleset opens or closes (`ExposureChange`, what `fwsafe check` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fwsafe.audit.findings import SEVERITIES, Finding, is_expected
from fwsafe.audit.listeners import Listener
from fwsafe.audit.nat import Forward
from fwsafe.audit.plan import WORLD, is_world
from fwsafe.audit.reach import CANDIDATE, CURRENT, Reach, ReachReport
from fwsafe.check.check_report import left_out_line, plural, sources_label
from fwsafe.core.config import OpenPort

__all__ = ["AuditReport", "ExposureChange"]


def _reached_text(listener: Listener, reach: Reach) -> str:
    names = []
    for name in reach.reached:
        families = reach.families(name)
        if is_world(name) and len(families) == 1 and len(listener.families) > 1:
            name = f"{name} (IPv{families[0]} only)"
        names.append(name)
    return ", ".join(names)


@dataclass
class AuditReport:
    listeners: list[Listener]
    reach: ReachReport
    round: str                                  # CURRENT, or CANDIDATE (RULES given)
    expected: list[OpenPort]
    findings: list[Finding] = field(default_factory=list)
    rules: dict[str, str] = field(default_factory=dict)   # layer -> RULES file (none: live)
    change: ExposureChange | None = None        # RULES given: what they open and close
    docker: dict[tuple[str, int], str] = field(default_factory=dict)   # published ports
    docker_user_rules: int = 0

    def result(self, listener: Listener) -> Reach:
        """Who reaches it; a port Docker publishes is not checked here (its packets go to the
        container, past this socket: see the findings)."""
        target = self.docker.get((listener.proto, listener.port))
        if target and not listener.loopback:
            return Reach(problem=f"not checked: Docker publishes this port to {target} (the "
                                 "packets go to the container: see the findings)")
        return self.reach.reach(self.round, listener)

    def exposed(self, listener: Listener) -> bool | None:
        """Reached from outside (the world or a local subnet); None: not checked. A loopback
        listener is reached only through a translation (DNAT to 127.0.0.1)."""
        result = self.result(listener)
        if result.reached:
            return True
        if listener.loopback:
            return False
        return None if (result.problem or result.uncertain) else False

    @property
    def exit_code(self) -> int:
        return 1 if any(f.exposure for f in self.findings) else 0

    @property
    def forwards(self) -> list[Forward]:
        """Ports this host forwards to others (DNAT), under the rules audited."""
        return self.reach.forwards.get(self.round, [])

    def forward_exposed(self, forward: Forward) -> bool | None:
        """True: nothing in the rule limits who is forwarded (the world is, if it is routed
        here); None: a source, interface or DOCKER-USER rule may (not tried: the sandbox
        has no host behind it)."""
        if forward.docker and self.docker_user_rules:
            return None
        return True if forward.open else None

    def listener_json(self, listener: Listener) -> dict[str, Any]:
        result = self.result(listener)
        data = listener.to_json()
        data.update({
            "exposed": self.exposed(listener),
            "reachable_from": result.reached,
            "expected": is_expected(self.expected, listener.proto, listener.port),
            "not_checked": None if listener.loopback else result.problem,
            "world": bool(result.reached) and bool(result.world) if listener.loopback
            else result.world,
            "uncertain": None if listener.loopback else result.uncertain,
        })
        over = sorted({f for n, f in result.pairs if is_world(n)})
        if over:
            data["world_over"] = [f"ipv{f}" for f in over]
        return data

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "rules": self.rules or "live",
            "expected_open": [str(e) for e in self.expected],
            "listeners": [self.listener_json(x) for x in self.listeners],
            "forwards": [f.to_json(self.forward_exposed(f)) for f in self.forwards],
            "findings": [f.to_json() for f in self.findings],
            "sources": self.reach.sources_json(),
            "notes": self.reach.notes,
            "not_checked": self.reach.not_checked,
        }
        if self.change is not None:
            data["exposure"] = self.change.to_json()
        return data

    def describe(self, verbose: bool = False) -> str:
        """One screen by default: the result first, the listeners, what the rules change, the
        findings, then one line of what was left out; ``verbose``: everything."""
        what = ("the live firewall" if not self.rules else
                sources_label(self.rules) + ", before applying")
        unexpected = sum(1 for f in self.findings if f.exposure)
        if unexpected:
            lines = [f"Result: {unexpected} unexpected exposure(s): the world reaches what "
                     "expected_open does not list (exit 1)."]
        else:
            lines = ["Result: nothing unexpected is reachable from the world."]
        lines.append(f"  audited: {what}; expected open: "
                     f"{', '.join(str(e) for e in self.expected) or 'nothing'}")
        lines += _sources_lines(self.reach)
        lines.append(f"  {'proto':<5} {'address:port':<29} {'process (pid)':<23} reachable from")
        for listener in self.listeners:
            lines.append(f"  {listener.proto:<5} {listener.endpoint:<29} "
                         f"{listener.owner:<23} {self._reach_cell(listener)}")
        for forward in self.forwards:
            state = {True: "reachable by whoever is routed here", None: "may be limited "
                     "(not tried: nothing behind it in the sandbox)"}[
                         self.forward_exposed(forward)]
            on = f" on {forward.on}" if forward.on else ""
            lines.append(f"  forward {forward.label}{on} -> {forward.target} "
                         f"({forward.chain}): {state}")
        left_out: list[str] = []
        if self.change is not None:
            # The rules not checked are the audit's own (listed below with -v), not again here.
            change_lines, _ = replace(self.change, rules_not_checked=[], notes=[]).summary(
                verbose)
            lines += change_lines
        if self.findings:
            lines.append("Findings:")
            order = {s: i for i, s in enumerate(SEVERITIES)}
            for finding in sorted(self.findings, key=lambda f: order.get(f.severity, 9)):
                lines.append(f"  {finding.severity.upper():<8}{finding.what}")
                lines.append(f"  {'':<8}fix: {finding.fix}")
        if verbose:
            lines += [f"Note: {note}" for note in self.reach.notes]
            if self.reach.not_checked:
                lines.append("Rules the sandbox cannot reproduce (their effect was NOT checked; "
                             "a listener one may hide is marked UNCERTAIN above):")
                lines += [f"  {item}" for item in self.reach.not_checked]
        else:
            if self.reach.not_checked:
                left_out.append(f"{plural(len(self.reach.not_checked), 'unreproducible rule')}"
                                " (a listener one may hide is marked UNCERTAIN above)")
            if self.reach.notes:
                left_out.append(plural(len(self.reach.notes), "note"))
        line = left_out_line(left_out)
        return "\n".join(lines + ([line] if line else []))

    def _reach_cell(self, listener: Listener) -> str:
        result = self.result(listener)
        if listener.loopback and not result.reached:
            return "- (loopback only)"
        if result.problem:
            return result.problem
        if not result.reached:
            return f"UNCERTAIN: {result.uncertain}" if result.uncertain else "nobody outside"
        text = _reached_text(listener, result)
        if result.world is not False and not is_expected(self.expected, listener.proto,
                                                         listener.port):
            text += "   UNEXPECTED"
        if result.uncertain and result.world is not True:
            text += f"; the world: UNCERTAIN ({result.uncertain})"
        return text


def _sources_lines(reach: ReachReport) -> list[str]:
    world = [f"{s.address} on {s.link}" for s in reach.sources if s.name == WORLD]
    named = [s.name.removeprefix(WORLD + " ") for s in reach.sources
             if is_world(s.name) and s.name != WORLD]
    subnets = [f"{s.name} ({s.link})" for s in reach.sources if not is_world(s.name)]
    lines = [f"  the world: {', '.join(world) or 'no route to it'}; local subnets: "
             f"{', '.join(subnets) or 'none'}"]
    if named:
        lines.append(f"  networks the rules name, each tried: {', '.join(named)}")
    if reach.sports:
        lines.append("  source ports the rules name, each tried (and an ephemeral one): "
                     + ", ".join(str(p) for p in reach.sports))
    return lines


@dataclass
class ExposureChange:
    """What a candidate ruleset changes in who reaches each listener (from the same sandbox:
    the current rules, then the candidate on top)."""

    opens: list[tuple[Listener, list[tuple[str, int]]]] = field(default_factory=list)
    closes: list[tuple[Listener, list[tuple[str, int]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)    # listeners that could not be tried
    rules_not_checked: list[str] = field(default_factory=list)  # rules the sandbox cannot reproduce
    # ports forwarded to other hosts (DNAT) that the change adds or opens to everyone / takes
    # away (the forward as it was: open) or limits (as it will be: not open); read from the
    # nat rules (nothing stands behind them in the sandbox)
    forwards_opened: list[Forward] = field(default_factory=list)
    forwards_closed: list[Forward] = field(default_factory=list)

    @classmethod
    def between(cls, listeners: Sequence[Listener], reach: ReachReport) -> ExposureChange:
        change = cls(notes=list(reach.notes), rules_not_checked=list(reach.not_checked))
        change.forwards_opened, change.forwards_closed = _forward_change(
            reach.forwards.get(CURRENT, []), reach.forwards.get(CANDIDATE, []))
        for listener in listeners:
            before, after = reach.reach(CURRENT, listener), reach.reach(CANDIDATE, listener)
            if listener.loopback and not (before.reached or after.reached):
                continue
            if before.problem or after.problem:
                change.not_checked.append(f"{listener.proto} {listener.endpoint} "
                                          f"({listener.held_by}): "
                                          f"{after.problem or before.problem}")
                continue
            opened = [p for p in after.pairs if p not in before.pairs]
            closed = [p for p in before.pairs if p not in after.pairs]
            if opened:
                change.opens.append((listener, opened))
            if closed:
                change.closes.append((listener, closed))
        return change

    def to_json(self) -> dict[str, Any]:
        def items(entries: list[tuple[Listener, list[tuple[str, int]]]]) -> list[dict[str, Any]]:
            return [{**listener.to_json(),
                     "from": [{"source": name, "family": f"ipv{family}"}
                              for name, family in pairs]}
                    for listener, pairs in entries]

        return {"opens": items(self.opens), "closes": items(self.closes),
                "forwards": {"opens": [f.to_json(True if f.open else None)
                                       for f in self.forwards_opened],
                             "closes": [f.to_json(False if f.open else None)
                                        for f in self.forwards_closed]},
                "notes": self.notes, "not_checked": self.rules_not_checked + self.not_checked}

    def lines(self) -> list[str]:
        if not (self.opens or self.closes or self.forwards_opened or self.forwards_closed):
            return ["Exposure: no change: the same services are reachable from the same places"]
        lines = ["Exposure (who outside reaches this host's listeners: now -> with the change):"]
        for label, entries in (("opens", self.opens), ("closes", self.closes)):
            for listener, pairs in entries:
                sources = ", ".join(f"{name} over IPv{family}" if is_world(name) else name
                                    for name, family in pairs)
                lines.append(f"  {label:<7} {listener.label} on {listener.endpoint} "
                             f"({listener.held_by}): {sources}")
        for label, forwards in (("opens", self.forwards_opened),
                                ("closes", self.forwards_closed)):
            for forward in forwards:
                on = f" on {forward.on}" if forward.on else ""
                who = ("whoever is routed here" if label == "opens" else "no longer forwarded") \
                    if forward.open else "limited by the rule (source or interface)"
                lines.append(f"  {label:<7} forward {forward.label}{on} -> {forward.target} "
                             f"({forward.chain}): {who}")
        return lines

    def summary(self, verbose: bool, *, rules_listed: bool = False
                ) -> tuple[list[str], list[str]]:
        """The section's lines, and (by default) what it left out for the report's one "Left
        out" line. The listeners that could not be tried are always shown: they may be what
        the change opens. ``rules_listed``: the report lists the rules the sandbox cannot
        reproduce already (fwsafe check -v), so this section only counts its own."""
        lines = self.lines()
        lines += [f"  not checked: {n}" for n in self.not_checked]
        left_out: list[str] = []
        rules = self.rules_not_checked
        if verbose:
            lines += [f"  note: {n}" for n in self.notes]
            if rules and rules_listed:
                lines.append(f"  not checked: {plural(len(rules), 'rule')} the sandbox cannot "
                             "reproduce, as listed above (--json: exposure.not_checked)")
            else:
                lines += [f"  not checked: {n}" for n in rules]
        else:
            counted = ([plural(len(rules), "unreproducible rule")] if rules else []) + (
                [plural(len(self.notes), "note")] if self.notes else [])
            if counted:
                left_out.append("exposure: " + ", ".join(counted))
        return lines, left_out

    def describe(self, verbose: bool = False) -> str:
        lines, left_out = self.summary(verbose)
        line = left_out_line(left_out)
        return "\n".join(lines + ([line] if line else []))


def _forward_change(before: Sequence[Forward], after: Sequence[Forward]
                    ) -> tuple[list[Forward], list[Forward]]:
    """The forwards `after` adds or opens to everyone (its rule no longer limits who), and
    those it takes away (as in `before`: open) or limits (as in `after`: not open), compared
    with `before` (by protocol, ports, target and the address they are on)."""
    def key(f: Forward) -> tuple[str, int, str, str, str | None]:
        return f.proto, f.family, f.ports, f.target, f.on

    def by_key(forwards: Sequence[Forward]) -> dict[tuple[str, int, str, str, str | None],
                                                    Forward]:
        found: dict[tuple[str, int, str, str, str | None], Forward] = {}
        for f in forwards:   # one open rule of several makes the forward open
            if key(f) not in found or (f.open and not found[key(f)].open):
                found[key(f)] = f
        return found

    old, new = by_key(before), by_key(after)
    opened = [f for k, f in new.items() if k not in old or (f.open and not old[k].open)]
    closed = [new.get(k, f) for k, f in old.items()
              if k not in new or (f.open and not new[k].open)]
    return opened, closed
