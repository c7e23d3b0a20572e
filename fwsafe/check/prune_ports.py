"""The ports a nat rule of an iptables-save text matches and translates to, as the check's
pruning (fwsafe.check.prune) reads them: nat sees a connection's first packet only, and the
lockout check opens TCP connections to the SSH port only."""

from __future__ import annotations

import re

__all__ = ["moved_to", "tcp_dports", "within"]

_TCP = re.compile(r"(?:^|\s)(!\s+)?(?:-p|--protocol)\s+(\S+)")
_DPORTS = re.compile(r"(?:^|\s)(!\s+)?(?:--dport|--destination-port|--dports|"
                     r"--destination-ports)\s+(\S+)")
# no leading zero: iptables reads 026 as octal (22); such a port is not read (the rule kept)
_PORT_RANGE = re.compile(r"(0|[1-9]\d{0,4})?(?::(0|[1-9]\d{0,4})?)?")
# a translation to other destination ports (REDIRECT --to-ports, DNAT to ADDRESS:PORT): nat
# rules after it, in the same first packet, see those
_TO_PORTS = re.compile(r"(?:^|\s)--to-ports?\s+(\S+)")
_TO_ADDRESS_PORT = re.compile(r"(?:^|\s)(?:--to-destination|--to)\s+(?:\S*?(?:\]|[^\s:\]]))?:"
                              r"(\d[\d-]*)(?=\s|$)")


def moved_to(rest: str) -> tuple[tuple[int, int], ...] | None:
    """The destination ports a nat rule translates to (None: it keeps the port; every port
    when they are not read here)."""
    found = [m.group(1) for m in _TO_PORTS.finditer(rest)]
    found += [m.group(1) for m in _TO_ADDRESS_PORT.finditer(rest)]
    if not found:
        return None
    ranges: list[tuple[int, int]] = []
    for value in found:
        first, _, last = value.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) \
                or (first.startswith("0") and first != "0") or last.startswith("0"):
            return ((0, 65535),)   # (a leading zero: octal to iptables)
        ranges.append((int(first), int(last or first)))
    return tuple(ranges)


def tcp_dports(rest: str) -> tuple[tuple[int, int], ...] | None:
    """The TCP destination port ranges a rule matches (`-p tcp` with one `--dport(s)`, not
    negated: "22", "1000:2000", "80,443", "1024:"); None for any other rule, or one not
    read here (it may see any port)."""
    if "port" not in rest:
        return None
    protocols = _TCP.findall(rest)
    ports = _DPORTS.findall(rest)
    if len(protocols) != 1 or protocols[0][0] or protocols[0][1] not in ("tcp", "6") \
            or len(ports) != 1 or ports[0][0]:
        return None
    ranges: list[tuple[int, int]] = []
    for item in ports[0][1].split(","):
        m = _PORT_RANGE.fullmatch(item)
        if m is None or not item or item == ":":
            return None
        first = int(m.group(1)) if m.group(1) else 0
        last = (int(m.group(2)) if m.group(2) else 65535) if ":" in item else first
        if last > 65535 or first > last:
            return None
        ranges.append((first, last))
    return tuple(ranges)


def within(ranges: tuple[tuple[int, int], ...], ports: frozenset[int]) -> bool:
    """Every port of `ranges` is one of `ports` (a translation to the SSH port itself)."""
    return all(last - first < len(ports) and all(p in ports for p in range(first, last + 1))
               for first, last in ranges)
