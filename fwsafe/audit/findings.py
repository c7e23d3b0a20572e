"""What the audit reports beside the listeners: services the world reaches that the config does
not expect, ports Docker publishes past the firewall, sshd taking passwords, no boot recovery
unit, a pending transaction.

Each finding has a severity (high, medium, low, info), what was found and how to fix it. The
findings that mark an *unexpected exposure* (``exposure``) make `fwsafe audit` exit 1.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fwsafe.audit.docker import DockerState
from fwsafe.audit.listeners import Listener
from fwsafe.audit.nat import Forward
from fwsafe.audit.plan import WORLD, is_world
from fwsafe.audit.reach import Reach
from fwsafe.core.config import OpenPort, parse_open_port

__all__ = [
    "SEVERITIES",
    "Finding",
    "docker_findings",
    "expected_ports",
    "forward_findings",
    "is_expected",
    "listener_findings",
    "parse_sshd_t",
    "pending_finding",
    "sshd_findings",
]

SEVERITIES = ("high", "medium", "low", "info")


@dataclass(frozen=True)
class Finding:
    severity: str
    what: str
    fix: str
    kind: str
    exposure: bool = False     # an unexpected exposure: `fwsafe audit` exits 1

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "what": self.what, "fix": self.fix, "kind": self.kind}


def expected_ports(entries: Iterable[str]) -> list[OpenPort]:
    return [parse_open_port(entry) for entry in entries]


def is_expected(expected: Sequence[OpenPort], proto: str, port: int) -> bool:
    return any(item.matches(proto, port) for item in expected)


def _expected_text(expected: Sequence[OpenPort]) -> str:
    return ", ".join(str(e) for e in expected) or "nothing"


def listener_findings(listeners: Sequence[Listener], reach: dict[tuple[str, int, str, int], Reach],
                      expected: Sequence[OpenPort]) -> list[Finding]:
    """Unexpected services the world reaches (high), or only local subnets (low); listeners
    that could not be checked (low). One finding per port and process."""
    world: dict[tuple[str, int, str], list[Listener]] = {}
    local: dict[tuple[str, int, str], list[str]] = {}
    unchecked: list[str] = []
    for listener in listeners:
        result = reach.get(listener.key(), Reach())
        if listener.loopback and not result.reached:
            continue   # reached only through a translation (DNAT to 127.0.0.1), if at all
        if result.problem:
            unchecked.append(f"{listener.proto} {listener.endpoint} ({listener.held_by}): "
                             f"{result.problem}")
            continue
        if is_expected(expected, listener.proto, listener.port):
            continue
        group = (listener.proto, listener.port, listener.held_by)
        if result.world is not False:   # reached from the world, or it may be (uncertain)
            world.setdefault(group, []).append(listener)
        elif result.reached:
            names = local.setdefault(group, [])
            names += [n for n in result.reached if n not in names]
    found: list[Finding] = []
    for (proto, port, owner), items in world.items():
        where = ", ".join(x.endpoint for x in items)
        results = [reach.get(x.key(), Reach()) for x in items]
        names = list(dict.fromkeys(n for r in results for n in r.reached if is_world(n)))
        if not names:
            how = ("may be reachable from the world (uncertain: "
                   + "; ".join(dict.fromkeys(r.uncertain or "" for r in results)).strip("; ")
                   + ")")
        elif WORLD in names:
            how = "is reachable from the world"
        else:
            how = ("is reachable from the world: from " + ", ".join(
                n.removeprefix(WORLD + " ") for n in names) + " (networks the rules name)")
        found.append(Finding(
            "high", f"{port}/{proto} ({owner}; listening on {where}) {how}, and expected_open "
            f"({_expected_text(expected)}) does not list it",
            f"bind it to 127.0.0.1 (or a private address), stop it, or drop {port}/{proto} in "
            f"the firewall; if it is meant to be public, add \"{port}/{proto}\" to "
            "expected_open in the config", "unexpected-service", exposure=True))
    for (proto, port, owner), names in local.items():
        if (proto, port, owner) in world:
            continue
        found.append(Finding(
            "low", f"{port}/{proto} ({owner}) is reachable from {', '.join(names)} (not from "
            "the world), and expected_open does not list it",
            f"if only this host needs it, bind it to 127.0.0.1; else add \"{port}/{proto}\" to "
            "expected_open", "local-service"))
    if unchecked:
        found.append(Finding(
            "low", f"{len(unchecked)} listener(s) could not be checked: " + "; ".join(unchecked),
            "see the reason given; the sandbox reproduces interfaces, addresses and the "
            "firewall, nothing more", "not-checked"))
    return found


def docker_findings(state: DockerState, expected: Sequence[OpenPort]) -> list[Finding]:
    """Ports Docker publishes: they pass through FORWARD, not INPUT (and, where FORWARD sends
    them to Docker's chains first, past ufw)."""
    found: list[Finding] = []
    if state.before_ufw:
        past = "past ufw (FORWARD sends them to Docker's chains before ufw's)"
    elif state.ufw:
        past = "through FORWARD, where ufw's route rules (not its INPUT rules) decide"
    else:
        past = "through FORWARD, past every INPUT rule"
    for item in state.published:
        if all(is_expected(expected, item.proto, p)
               for p in range(item.first_port, item.last_port + 1)):
            continue
        on = f"on {item.address}" if item.address else "on every address"
        what = (f"Docker publishes {item.label} {on} (IPv{item.family}) to {item.target}, "
                f"{past}; expected_open does not list it")
        fix = (f"publish it on 127.0.0.1 only (docker run -p 127.0.0.1:{item.ports}:...), or "
               "filter it in the DOCKER-USER chain; if it is meant to be public, add "
               f"\"{item.label}\" to expected_open")
        if state.docker_user_rules:
            found.append(Finding(
                "medium", what + f"; DOCKER-USER has {state.docker_user_rules} rule(s) that may "
                "restrict it (not checked: the sandbox has no containers)", fix,
                "docker-published"))
        else:
            found.append(Finding("high", what, fix, "docker-published", exposure=True))
    return found


def forward_findings(forwards: Sequence[Forward], expected: Sequence[OpenPort]
                     ) -> list[Finding]:
    """Ports forwarded to other hosts (DNAT to a VM, a container, another machine): past
    INPUT, reported from the rules (Docker's: `docker_findings`, and below when published on
    loopback only)."""
    found: list[Finding] = []
    for item in forwards:
        if all(is_expected(expected, item.proto, p)
               for p in range(item.first_port, item.last_port + 1)):
            continue
        if item.docker:
            if item.on and ipaddress.ip_address(item.on).is_loopback:
                found.append(Finding(
                    "low", f"Docker publishes {item.label} on {item.on} only, but the container "
                    f"({item.target}) is forwarded to by this host: hosts that route to its "
                    "network (the LAN, VMs) reach it directly",
                    "filter it in the DOCKER-USER chain if only this host may use it",
                    "docker-loopback"))
            continue
        what = (f"{item.label} is forwarded to {item.target} ({item.chain}: DNAT), past every "
                "INPUT rule; expected_open does not list it")
        fix = (f"drop the DNAT, or limit it (-s, -i) and filter FORWARD; if it is meant to be "
               f"public, add \"{item.label}\" to expected_open")
        if item.open:
            found.append(Finding("high", what, fix, "forwarded-port", exposure=True))
        else:
            found.append(Finding("medium", what + " (the rule limits who is forwarded: not "
                                 "tried, the sandbox has nothing behind it)", fix,
                                 "forwarded-port"))
    return found


def parse_sshd_t(text: str) -> dict[str, str]:
    """`sshd -T` output: lower-case keyword -> value (the first of repeated keywords)."""
    settings: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        key = key.lower()
        if key and key not in settings:
            settings[key] = value.strip()
    return settings


def sshd_findings(settings: dict[str, str]) -> list[Finding]:
    """Password logins (medium), root password logins (high), from sshd's effective global
    configuration (`Match` blocks are not evaluated)."""
    methods = settings.get("authenticationmethods", "any")
    key_first = methods != "any" and all("publickey" in chain.split(",")
                                         for chain in methods.split())
    password = settings.get("passwordauthentication") == "yes"
    keyboard = (settings.get("kbdinteractiveauthentication",
                             settings.get("challengeresponseauthentication")) == "yes"
                and settings.get("usepam") == "yes")
    if key_first or not (password or keyboard):
        return []
    how = " and ".join(n for n, on in (("PasswordAuthentication yes", password),
                                       ("KbdInteractiveAuthentication yes with UsePAM",
                                        keyboard)) if on)
    fix = ("set PasswordAuthentication no and KbdInteractiveAuthentication no (in "
           "/etc/ssh/sshd_config.d/), log in with keys, then reload sshd")
    if settings.get("permitrootlogin") == "yes":
        return [Finding("high", f"sshd lets root log in with a password ({how}, "
                        "PermitRootLogin yes): the usual way in for brute-force bots", fix
                        + "; and PermitRootLogin prohibit-password", "sshd-root-password")]
    return [Finding("medium", f"sshd allows password logins ({how})", fix, "sshd-password")]


def pending_finding(tx_id: str, state: str, remaining_s: float | None) -> Finding:
    if state == "revert-failed":
        return Finding("high", f"transaction {tx_id}: its revert FAILED, the firewall may "
                       "still hold the new rules", "run `fwsafe recover` now (see `fwsafe "
                       "status`)", "pending-transaction")
    left = f", {remaining_s:.0f} s left" if remaining_s is not None else ""
    return Finding("medium", f"transaction {tx_id} is {state}{left}: the rules audited may be "
                   "reverted at its deadline", "`fwsafe confirm` from a new SSH session, or "
                   "`fwsafe revert`", "pending-transaction")
