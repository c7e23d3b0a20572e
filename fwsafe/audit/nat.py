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

from fwsafe.backends.iptsave import Rule, parse_ruleset

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
        if "*nat" not in text:
            continue   # no nat table: not read (100,000 filter rules: 0.1 s)
        nat = parse_ruleset(text).get("nat")
        for chain in nat.chains.values() if nat is not None else []:
            for rule in chain.each_rule():
                _one(rule, chain.name, family, local, entries, forwards)
    _nft(nft, local, entries, forwards)
    return list(dict.fromkeys(entries)), list(dict.fromkeys(forwards))


_NFT_DPORT = re.compile(r"\b(tcp|udp)\s+dport\s+(\d+)(?:-(\d+))?\b")
_NFT_REDIRECT = re.compile(r"\bredirect\b")
_NFT_DNAT = re.compile(r"\bdnat\s+(?:(ip6?)\s+)?to\s+(\[[0-9a-fA-F:]+\]|[0-9a-fA-F:.]+?)"
                       r"(?::(\d+))?(?=\s|$)")
# `dnat [ip] to tcp dport map { 8080 : 127.0.0.1 . 8004, ... }`, `redirect to :tcp dport map
# { 80 : 8001 }`, or the same with a named map (`map @fwd`)
_NFT_PORT_MAP = re.compile(r"\b(dnat|redirect)\s+(?:(ip6?)\s+)?to\s+:?(tcp|udp|th)\s+dport\s+"
                           r"map\s+(\{[^}]*\}|@[\w-]+)")
_NFT_NAMED_MAP = re.compile(r"^\s*map\s+([\w-]+)\s*\{(.*?)^\s*\}", re.M | re.S)
_NFT_TABLE = re.compile(r"^table\s+(\S+)\s+(\S+)", re.M)


def _named_maps(text: str) -> dict[tuple[str, str], str]:
    """(table, name) -> the elements of every named map in an nft listing."""
    maps: dict[tuple[str, str], str] = {}
    for match in _NFT_NAMED_MAP.finditer(text):
        tables = [t for t in _NFT_TABLE.finditer(text, 0, match.start())]
        table = f"{tables[-1].group(1)} {tables[-1].group(2)}" if tables else ""
        elements = re.search(r"elements\s*=\s*\{(.*?)\}", match.group(2), re.S)
        maps[(table, match.group(1))] = elements.group(1) if elements else ""
    return maps


def _nft(text: str, local: set[str], entries: list[Entry], forwards: list[Forward]) -> None:
    """`... tcp dport N ... redirect to :M` / `dnat [ip] to ADDR[:PORT]` in an nft listing,
    and port maps (`dnat [ip] to tcp dport map { PORT : ADDR [. PORT], ... }`, `redirect to
    :tcp dport map { PORT : PORT }`, anonymous or named); sets of ports are not followed."""
    table = ""
    maps = _named_maps(text) if "map" in text else {}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["table"] and len(words) >= 3:
            table = f"{words[1]} {words[2]}"
        families = [6] if table.startswith("ip6 ") else [4] if table.startswith("ip ") else [4, 6]
        mapped = _NFT_PORT_MAP.search(line)
        if mapped is not None:
            _nft_port_map(mapped, line, table, families, maps, local, entries, forwards)
            continue
        port = _NFT_DPORT.search(line)
        if port is None or ("redirect" not in line and "dnat" not in line):
            continue
        proto, first = port.group(1), int(port.group(2))
        ports = f"{first}:{port.group(3)}" if port.group(3) else str(first)
        if _NFT_REDIRECT.search(line):
            entries += [Entry(proto, f, first) for f in families]
            continue
        dnat = _NFT_DNAT.search(line)
        if dnat is None:
            continue
        _nft_dnat(proto, ports, dnat.group(2).strip("[]"), dnat.group(3), line, table, local,
                  entries, forwards)


def _nft_dnat(proto: str, ports: str, address: str, port: str | None, line: str, table: str,
              local: set[str], entries: list[Entry], forwards: list[Forward]) -> None:
    """A DNAT of `ports` to `address`[:`port`]: an entry when it lands on this host, else a
    forward."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return
    if ip.is_loopback or str(ip) in local:
        entries.append(Entry(proto, ip.version, int(ports.split(":")[0])))
        return
    target = f"{address}:{port}" if port else address
    if ip.version == 6 and port:
        target = f"[{address}]:{port}"
    limited = bool(re.search(r"\b(ip6?\s+saddr|iifname|iif)\b(?!\s*!=)", line))
    forwards.append(Forward(proto, ip.version, ports, target, f"nft {table}",
                            open=not limited))


def _nft_port_map(mapped: re.Match[str], line: str, table: str, families: list[int],
                  maps: dict[tuple[str, str], str], local: set[str], entries: list[Entry],
                  forwards: list[Forward]) -> None:
    """Every element of a port map: its key an entry port, its value where it goes."""
    kind, proto, body = mapped.group(1), mapped.group(3), mapped.group(4)
    elements = maps.get((table, body[1:]), "") if body.startswith("@") else body.strip("{}")
    if proto == "th":   # the protocol from the rule's own match, else both
        named = re.search(r"\bl4proto\s+(tcp|udp)\b", line)
        protos = [named.group(1)] if named else ["tcp", "udp"]
    else:
        protos = [proto]
    for element in elements.split(","):
        key, colon, value = element.partition(":")
        low, _, high = key.strip().partition("-")
        if not colon or not low.isdigit() or (high and not high.isdigit()):
            continue   # a set or an expression as the key: not followed
        ports = f"{low}:{high}" if high else low
        for proto_ in protos:
            if kind == "redirect":
                entries += [Entry(proto_, f, int(low)) for f in families]
                continue
            address, _, port = (part.strip() for part in value.partition(" . "))
            _nft_dnat(proto_, ports, address, port or None, line, table, local, entries,
                      forwards)


def _one(rule: Rule, chain: str, family: int, local: set[str], entries: list[Entry],
         forwards: list[Forward]) -> None:
    if "DNAT" not in rule.text and "REDIRECT" not in rule.text:
        return   # not split into words (kube-proxy's nat table: 20,000 rules, most jumps)
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
