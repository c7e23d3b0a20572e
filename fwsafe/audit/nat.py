"""Services reached through address translation, read from the nat table's rules.

* **Into this host** (``REDIRECT``, or ``DNAT`` to one of this host's addresses or to
  loopback with ``route_localnet``): the packet is sent to the *entry* port and lands on a
  listener of another port, perhaps one bound to 127.0.0.1. The audit sends to every entry
  port too, and credits the listener that received the packet (fwsafe.audit.reach).
* **Through this host** (``DNAT`` to another address: a VM, a container, another machine):
  the packet is routed on, past INPUT; the sandbox has nothing behind it, so these are
  reported from the rules, as *forwards*.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fwsafe.check.rules import SavedRule, parse_save

__all__ = ["Entry", "Forward", "nat_rules"]


@dataclass(frozen=True)
class Entry:
    """A port that is translated to this host: tried as a destination port of its own."""

    proto: str
    family: int
    port: int


@dataclass(frozen=True)
class Forward:
    """A port forwarded to another host: `proto` `ports` (on `on`, None: every address) to
    `target` ("10.0.0.5:80"). `open`: nothing in the rule limits who is forwarded (no source,
    no incoming interface but a negated one, not a loopback destination)."""

    proto: str
    family: int
    ports: str
    target: str
    chain: str
    on: str | None = None
    open: bool = True

    @property
    def address(self) -> str:
        host = self.target.rsplit(":", 1)[0] if self.target.count(":") == 1 \
            or self.target.startswith("[") else self.target
        return host.strip("[]")

    @property
    def target_port(self) -> int | None:
        if self.target.count(":") == 1 or self.target.startswith("["):
            port = self.target.rsplit(":", 1)[1].split("-")[0]
            return int(port) if port.isdigit() else None
        return None

    @property
    def first_port(self) -> int:
        return int(self.ports.replace("-", ":").split(":")[0])

    @property
    def last_port(self) -> int:
        return int(self.ports.replace("-", ":").split(":")[-1])

    @property
    def label(self) -> str:
        return f"{self.ports.replace(':', '-')}/{self.proto}"

    @property
    def docker(self) -> bool:
        return self.chain.startswith("DOCKER")

    def to_json(self, exposed: bool | None) -> dict[str, Any]:
        return {"proto": self.proto, "family": f"ipv{self.family}", "address": self.address,
                "port": self.target_port, "entry": self.label, "on": self.on,
                "chain": self.chain, "exposed": exposed, "world": exposed}


def nat_rules(saves: Iterable[tuple[int, str]], local: set[str], nft: str = ""
              ) -> tuple[list[Entry], list[Forward]]:
    """The entry ports into this host and the forwards through it, from iptables-save texts
    by family (each parsed apart) and an nft listing; `local`: this host's addresses."""
    entries: list[Entry] = []
    forwards: list[Forward] = []
    for family, text in saves:
        nat = parse_save(text).get("nat", {})
        for chain in nat.values():
            for rule in chain.rules:
                _one(rule, chain.name, family, local, entries, forwards)
    _nft(nft, local, entries, forwards)
    return list(dict.fromkeys(entries)), list(dict.fromkeys(forwards))


_NFT_DPORT = re.compile(r"\b(tcp|udp)\s+dport\s+(\d+)(?:-(\d+))?\b")
_NFT_REDIRECT = re.compile(r"\bredirect\b")
_NFT_DNAT = re.compile(r"\bdnat\s+(?:(ip6?)\s+)?to\s+(\[[0-9a-fA-F:]+\]|[0-9a-fA-F:.]+?)"
                       r"(?::(\d+))?(?=\s|$)")


def _nft(text: str, local: set[str], entries: list[Entry], forwards: list[Forward]) -> None:
    """`... tcp dport N ... redirect to :M` / `dnat [ip] to ADDR[:PORT]` in an nft listing
    (plain ports only; maps and sets of ports are not followed)."""
    table = ""
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["table"] and len(words) >= 3:
            table = f"{words[1]} {words[2]}"
        port = _NFT_DPORT.search(line)
        if port is None or ("redirect" not in line and "dnat" not in line):
            continue
        proto, first = port.group(1), int(port.group(2))
        ports = f"{first}:{port.group(3)}" if port.group(3) else str(first)
        families = [6] if table.startswith("ip6 ") else [4] if table.startswith("ip ") else [4, 6]
        if _NFT_REDIRECT.search(line):
            entries += [Entry(proto, f, first) for f in families]
            continue
        dnat = _NFT_DNAT.search(line)
        if dnat is None:
            continue
        address = dnat.group(2).strip("[]")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.is_loopback or str(ip) in local:
            entries.append(Entry(proto, ip.version, first))
            continue
        target = f"{address}:{dnat.group(3)}" if dnat.group(3) else address
        if ip.version == 6 and dnat.group(3):
            target = f"[{address}]:{dnat.group(3)}"
        limited = bool(re.search(r"\b(ip6?\s+saddr|iifname|iif)\b(?!\s*!=)", line))
        forwards.append(Forward(proto, ip.version, ports, target, f"nft {table}",
                                open=not limited))


def _one(rule: SavedRule, chain: str, family: int, local: set[str], entries: list[Entry],
         forwards: list[Forward]) -> None:
    target = rule.target
    if target not in ("DNAT", "REDIRECT"):
        return
    proto = rule.option("-p", "--protocol")
    ports = rule.option("--dport", "--destination-port")
    if proto not in ("tcp", "udp") or not ports or rule.negated("--dport"):
        return
    first = int(ports.split(":")[0]) if ports.split(":")[0].isdigit() else None
    if first is None:
        return
    to = rule.option("--to-destination") or ""
    if target == "REDIRECT":
        entries.append(Entry(proto, family, first))
        return
    forward = Forward(proto, family, ports, to, chain)
    address = forward.address
    try:
        ip = ipaddress.ip_address(address) if address else None
    except ValueError:
        return   # a range of targets: not followed
    if ip is None or ip.is_loopback or str(ip) in local:
        entries.append(Entry(proto, family, first))
        return
    destination = rule.option("-d", "--destination")
    on = destination.split("/")[0] if destination and not rule.negated("-d") else None
    inbound = rule.option("-i", "--in-interface")
    limited = bool(rule.option("-s", "--source")) and not rule.negated("-s") \
        or bool(inbound) and not rule.negated("-i") \
        or (on is not None and ipaddress.ip_address(on).is_loopback)
    forwards.append(Forward(proto, family, ports, to, chain, on, not limited))
