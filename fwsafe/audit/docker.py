"""Ports Docker publishes, read from the live iptables rules.

A port published with ``docker run -p 8080:80`` is a DNAT rule in the nat table's DOCKER
chain: the packets are rewritten in PREROUTING and go through FORWARD to the container, never
through INPUT, where ufw's (and most hand-written) rules filter. Where FORWARD sends them to
Docker's chains before ufw's, ufw never sees them at all. The sandbox
cannot reproduce a container, so this is read from the rules, not tried with packets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fwsafe.backends.iptsave import Tables, parse_ruleset

__all__ = ["DockerState", "Published", "docker_state"]

_DOCKER_CHAINS = frozenset({"DOCKER", "DOCKER-USER", "DOCKER-FORWARD", "DOCKER-CT",
                            "DOCKER-BRIDGE", "DOCKER-ISOLATION-STAGE-1"})


@dataclass(frozen=True)
class Published:
    """One published port: `ports` on the host ("8080" or "8000:8010") to `target`."""

    proto: str
    ports: str
    target: str
    family: int
    address: str | None = None       # the host address it is published on (None: all)

    @property
    def label(self) -> str:
        return f"{self.ports.replace(':', '-')}/{self.proto}"

    @property
    def first_port(self) -> int:
        return int(self.ports.split(":")[0])

    @property
    def last_port(self) -> int:
        return int(self.ports.split(":")[-1])


@dataclass
class DockerState:
    published: list[Published] = field(default_factory=list)
    ufw: bool = False                 # ufw's chains are in FORWARD
    before_ufw: bool = False          # FORWARD jumps to Docker's chains before ufw's
    docker_user_rules: int = 0        # DOCKER-USER rules other than the final RETURN

    def targets(self) -> dict[tuple[str, int], str]:
        """(proto, host port) -> where Docker sends it ("172.17.0.2:80")."""
        found: dict[tuple[str, int], str] = {}
        for item in self.published:
            for port in range(item.first_port, item.last_port + 1):
                found.setdefault((item.proto, port), item.target)
        return found


def docker_state(saves: Mapping[int, str] | Iterable[tuple[int, str]]) -> DockerState:
    """From iptables-save texts by family (4, 6), each flavour's parsed apart (iptables-nft's
    and a legacy one's: a chain of the same name in the second must not hide the first's
    rules): what Docker publishes, and how FORWARD orders Docker's chains and ufw's."""
    state = DockerState()
    items = sorted(saves.items()) if isinstance(saves, Mapping) else list(saves)
    for family, text in items:
        tables = parse_ruleset(text)
        state.published += _published(tables, family)
        _order(tables, state)
    return state


def _published(tables: Tables, family: int) -> list[Published]:
    nat = tables.get("nat")
    chain = nat.chains.get("DOCKER") if nat is not None else None
    found: list[Published] = []
    for rule in chain.each_rule() if chain else []:
        if rule.target != "DNAT":
            continue
        ports = rule.option("--dport", "--destination-port")
        proto = rule.option("-p", "--protocol")
        target = rule.option("--to-destination")
        if not ports or proto not in ("tcp", "udp") or not target or rule.negated("--dport"):
            continue
        destination = rule.option("-d", "--destination")
        address = destination.split("/")[0] if destination and not rule.negated("-d") else None
        if address and ipaddress.ip_address(address).is_loopback:
            continue   # published on 127.0.0.1 / ::1: this host only
        item = Published(proto, ports, target, family, address)
        if item not in found:
            found.append(item)
    return found


def _order(tables: Tables, state: DockerState) -> None:
    saved = tables.get("filter")
    filter_table = saved.chains if saved is not None else {}
    forward = filter_table.get("FORWARD")
    docker_at = ufw_at = None
    for rule in forward.each_rule() if forward else []:
        target = rule.target or rule.goto or ""
        if target in _DOCKER_CHAINS and docker_at is None:
            docker_at = rule.index
        if target.startswith("ufw-") and ufw_at is None:
            ufw_at = rule.index
    if ufw_at is not None:
        state.ufw = True
        if docker_at is not None and docker_at < ufw_at:
            state.before_ufw = True
    user = filter_table.get("DOCKER-USER")
    if user:
        state.docker_user_rules += sum(1 for r in user.each_rule() if r.target != "RETURN")
