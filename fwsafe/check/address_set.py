"""The addresses a packet of the check's (and the audit's) sandbox may carry, as merged
ranges per family (:class:`AddressSet`), and an address option's value read as ranges: what
the pruning (fwsafe.check.prune) asks of every address match of a rule."""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["OCTET", "AddressSet", "Option", "Ranges", "V4_NETWORK", "address_span", "option_ranges",
           "v4_range"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Always in the set: what a namespace's own stack may send or receive by itself.
_ALWAYS = ("127.0.0.0/8", "0.0.0.0/32", "255.255.255.255/32", "224.0.0.0/4", "::1/128",
           "::/128", "fe80::/10", "ff00::/8")

# no octet with a leading zero: iptables and nft read 010 as octal (8); ipaddress refuses it
OCTET = r"(0|[1-9]\d{0,2})"   # as ipaddress reads one; also the pruning's fast paths
V4_NETWORK = re.compile(rf"^{OCTET}\.{OCTET}\.{OCTET}\.{OCTET}(?:/(0|[1-9]\d?))?$")


@dataclass
class AddressSet:
    """Every address a packet in the sandbox may carry, and the interfaces it may arrive on
    or leave by (``interfaces``; None: any)."""

    networks: list[Network] = field(default_factory=list)
    interfaces: frozenset[str] | None = None
    translated: int = 0   # of the networks: those address translations lead packets to
    # the TCP destination ports of the connections its packets open (None: any); the nat
    # table sees a connection's first packet only
    ports: frozenset[int] | None = None

    def __post_init__(self) -> None:
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for net in self.networks:
            spans[net.version].append((int(net.network_address), int(net.broadcast_address)))
        # Per family, the spans merged and sorted: (starts, ends), for a bisection (asked once
        # per address option of every rule: 100,000 times for two rulesets of 50,000 rules).
        self.merged: dict[int, tuple[list[int], list[int]]] = {}
        for family, found in spans.items():
            starts: list[int] = []
            ends: list[int] = []
            for lo, hi in sorted(found):
                if ends and lo <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], hi)
                else:
                    starts.append(lo)
                    ends.append(hi)
            self.merged[family] = (starts, ends)

    @classmethod
    def of(cls, addresses: Iterable[str], interfaces: Iterable[str] | None = None,
           ports: Iterable[int] | None = None) -> AddressSet:
        found = [ipaddress.ip_network(a, strict=False) for a in _ALWAYS]
        for address in addresses:
            try:
                found.append(ipaddress.ip_network(address, strict=False))
            except ValueError:
                continue
        return cls(found, None if interfaces is None else frozenset(interfaces),
                   ports=None if ports is None else frozenset(ports))

    def overlaps(self, family: int, ranges: Ranges) -> bool:
        starts, ends = self.merged[family]
        for first, last in ranges:
            # The first span that ends at or after `first` is the only one that can start
            # before `last` ends (the spans are disjoint and sorted).
            i = bisect.bisect_left(ends, first)
            if i < len(ends) and starts[i] <= last:
                return True
        return False

    def may_match(self, options: tuple[Option, ...]) -> bool:
        """Whether a rule with these address options (all must match) may match a packet."""
        for option in options:  # noqa: SIM110 - no generator per call: 100,000 calls
            if option is not None and not self.overlaps(option[0], option[1]):
                return False
        return True

    def may_pass(self, names: tuple[str, ...]) -> bool:
        """Whether a rule whose interface options (``-i``/``-o``, not negated; all must match)
        name these may match a packet: each is one of the sandbox's interfaces, or a prefix
        of one (``eth+``). Names not read as plain ones are never given (they may match)."""
        if not names or self.interfaces is None:
            return True
        for name in names:
            if name.endswith("+"):
                if not any(i.startswith(name[:-1]) for i in self.interfaces):
                    return False
            elif name not in self.interfaces:
                return False
        return True

    def may_open(self, dports: tuple[tuple[int, int], ...] | None) -> bool:
        """Whether a nat rule matching these TCP destination port ranges (None: any port, or
        not a TCP match read here) may see the first packet of a connection the sandbox
        opens."""
        if dports is None or self.ports is None:
            return True
        return any(first <= port <= last for first, last in dports for port in self.ports)

    def meets(self, value: str, family: int) -> bool:
        """Whether the option value (``a``, ``a/n``, ``a/mask``, comma-separated) may match an
        address of the set; True when it cannot be read."""
        ranges = option_ranges(value, family)
        return ranges is None or self.overlaps(family, ranges)


Ranges = tuple[tuple[int, int], ...]      # (first, last) of each address of one option
Option = tuple[int, Ranges] | None        # (family, ranges); None: unreadable, may match


def v4_range(a: str, b: str, c: str, d: str, prefix: str | None) -> tuple[int, int] | None:
    """(first, last) of the IPv4 network a.b.c.d/prefix (digits as matched); None if invalid.
    (Called once per rule of a large ruleset: plain arithmetic, no list.)"""
    w, x, y, z = int(a), int(b), int(c), int(d)
    bits = 32 if prefix is None else int(prefix)
    if w > 255 or x > 255 or y > 255 or z > 255 or bits > 32:
        return None
    host = (1 << (32 - bits)) - 1
    first = ((w << 24) | (x << 16) | (y << 8) | z) & (0xFFFFFFFF ^ host)
    return first, first | host


def address_span(item: str) -> tuple[int, int, int] | None:
    """(family, first, last) of an address or network; None if it is not one."""
    m = V4_NETWORK.match(item)
    if m:
        found = v4_range(*m.group(1, 2, 3, 4, 5))
        return (4, *found) if found is not None else None
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return None
    return net.version, int(net.network_address), int(net.broadcast_address)


def option_ranges(value: str, family: int) -> Ranges | None:
    """The ranges of a comma-separated option value; None if any part cannot be read (a host
    name, a range, a set, a variable) or is of another family."""
    found = []
    for item in value.split(","):
        found_span = address_span(item)
        if found_span is None or found_span[0] != family:
            return None
        found.append((found_span[1], found_span[2]))
    return tuple(found)
