"""What the sandbox may leave out: rules that no packet of the sandbox can ever match.

Every packet in the check's (and the audit's) sandbox carries addresses from a known set: the
clients', the server's, the audit's sources, the host's own, loopback, link-local and
multicast. A rule whose only way to match is a source or destination address (``-s``/``-d``,
``ip saddr``/``ip6 daddr``) outside that set cannot match any of them, so loading it changes no
verdict, no counter and no trace: on a host with 50,000 per-address rules the sandbox then
loads a handful instead of all of them.

Safety first:

* a rule is left out only when its address options are plain addresses or networks, not
  negated, and the line has no quotes (a comment could fake an option) and no continuation;
* one rule of each *shape* (the line with its addresses taken out) is always kept, so the
  kernel still loads every distinct combination of matches, targets and jumps: a jump to a
  missing chain or an unknown match is refused in the sandbox as before;
* an iptables table that inserts, replaces or deletes by position is not touched (positions
  would move);
* nothing is left out at all when any layer rewrites addresses (DNAT/SNAT/NETMAP/TPROXY to an
  address): packets could then carry addresses outside the set.

Left-out lines are blanked, not removed: line numbers, and so the naming of culprits as
``FILE:LINE``, stay as they were.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["AddressSet", "Pruned", "prune_iptables", "prune_nft", "rewrites_addresses", "warm"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Always in the set: what a namespace's own stack may send or receive by itself.
_ALWAYS = ("127.0.0.0/8", "0.0.0.0/32", "255.255.255.255/32", "224.0.0.0/4", "::1/128",
           "::/128", "fe80::/10", "ff00::/8")

_IPT_ADDRESS = re.compile(r"(?:^|\s)(!\s+)?(-s|--source|--src|-d|--destination|--dst)\s+(\S+)")
_IPT_NAT = re.compile(r"--to-destination|--to-source|--to\s|\bNETMAP\b|\bTPROXY\b|--on-ip")
_IPT_NAT_WORDS = ("--to", "NETMAP", "TPROXY", "--on-ip")
_NFT_ADDRESS = re.compile(r"\b(ip6?)\s+(saddr|daddr)\s+(\S+)")
_NFT_NAT = re.compile(r"\b(dnat|snat|tproxy|netmap)\b")
_NFT_NAT_WORDS = ("dnat", "snat", "tproxy", "netmap")
_NFT_CHAIN = re.compile(r"^\s*chain\s+\S+\s*\{\s*$")
_NFT_SIMPLE_LINE = re.compile(r"[ \t]*ip (saddr|daddr) (\d+)\.(\d+)\.(\d+)\.(\d+)(?:/(\d+))? "
                              r"([^{}\";\\#\n]*[^{}\";\\#\s])")
_NFT_SLOW = re.compile(r"\bip6?\s+[sd]addr\b|[\\;\"#{}]")
_IPT_COUNTERS = re.compile(r"^\s*\[\d+:\d+\]\s*")
_IPT_FAST_V4 = re.compile(r"-A (\S+) -s (\d+)\.(\d+)\.(\d+)\.(\d+)/(\d+) (.*)")
_IPT_SLOW = re.compile(r"""["'\\]|(?:^|\s)(?:-s|-d|--source|--src|--destination|--dst)\s""")
_IPT_POSITIONAL = re.compile(r"^\s*(-I|--insert|-R|--replace|-D|--delete)\s")


_V4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:/(\d{1,2}))?$")


@dataclass
class AddressSet:
    """Every address a packet in the sandbox may carry."""

    networks: list[Network] = field(default_factory=list)

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
    def of(cls, addresses: Iterable[str]) -> AddressSet:
        found = [ipaddress.ip_network(a, strict=False) for a in _ALWAYS]
        for address in addresses:
            try:
                found.append(ipaddress.ip_network(address, strict=False))
            except ValueError:
                continue
        return cls(found)

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

    def meets(self, value: str, family: int) -> bool:
        """Whether the option value (``a``, ``a/n``, ``a/mask``, comma-separated) may match an
        address of the set; True when it cannot be read."""
        ranges = _ranges(value, family)
        return ranges is None or self.overlaps(family, ranges)


Ranges = tuple[tuple[int, int], ...]      # (first, last) of each address of one option
Option = tuple[int, Ranges] | None        # (family, ranges); None: unreadable, may match


def _v4_range(a: str, b: str, c: str, d: str, prefix: str | None) -> tuple[int, int] | None:
    """(first, last) of the IPv4 network a.b.c.d/prefix (digits as matched); None if invalid.
    (Called once per rule of a large ruleset: plain arithmetic, no list.)"""
    w, x, y, z = int(a), int(b), int(c), int(d)
    bits = 32 if prefix is None else int(prefix)
    if w > 255 or x > 255 or y > 255 or z > 255 or bits > 32:
        return None
    host = (1 << (32 - bits)) - 1
    first = ((w << 24) | (x << 16) | (y << 8) | z) & (0xFFFFFFFF ^ host)
    return first, first | host


def _span(item: str) -> tuple[int, int, int] | None:
    """(family, first, last) of an address or network; None if it is not one."""
    m = _V4.match(item)
    if m:
        found = _v4_range(*m.group(1, 2, 3, 4, 5))
        return (4, *found) if found is not None else None
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return None
    return net.version, int(net.network_address), int(net.broadcast_address)


def _ranges(value: str, family: int) -> Ranges | None:
    """The ranges of a comma-separated option value; None if any part cannot be read (a host
    name, a range, a set, a variable) or is of another family."""
    found = []
    for item in value.split(","):
        span = _span(item)
        if span is None or span[0] != family:
            return None
        found.append((span[1], span[2]))
    return tuple(found)


class _Rule(NamedTuple):
    """A rule the sandbox might leave out: its line, its shape, its address options."""

    line: int
    shape: str
    options: tuple[Option, ...]


# The analysis of a text does not depend on the addresses: the lockout check and the exposure
# (two threads, the same current and candidate texts) share it.
_CACHE: OrderedDict[tuple[str, int, str], tuple[list[str], list[_Rule]]] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _analysed(kind: str, family: int, text: str,
              analyse: Callable[[list[str]], list[_Rule]]) -> tuple[list[str], list[_Rule]]:
    key = (kind, family, text)
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is None:
            lines = text.split("\n")
            found = (lines, analyse(lines))
            _CACHE[key] = found
            while len(_CACHE) > 8:
                _CACHE.popitem(last=False)
        return found


def _apply(lines: list[str], rules: list[_Rule], addresses: AddressSet) -> Pruned:
    """Blank the rules that cannot match, but keep the first of each shape."""
    out: list[str] | None = None
    shapes: set[str] = set()
    left_out = 0
    for rule in rules:
        if addresses.may_match(rule.options) or rule.shape not in shapes:
            shapes.add(rule.shape)
            continue
        if out is None:
            out = list(lines)
        out[rule.line] = ""
        left_out += 1
    return Pruned("\n".join(out) if out is not None else "\n".join(lines), left_out)


@dataclass
class Pruned:
    text: str
    left_out: int = 0


def rewrites_addresses(texts: Iterable[str]) -> bool:
    """Whether any of these rulesets (iptables-save or nft) translates addresses."""
    for text in texts:
        if any(word in text for word in _IPT_NAT_WORDS) and _IPT_NAT.search(text):
            return True
        if any(word in text for word in _NFT_NAT_WORDS) and _NFT_NAT.search(text):
            return True
    return False


def prune_iptables(text: str, addresses: AddressSet, family: int) -> Pruned:
    """``text`` (iptables-save format) without the ``-A`` rules no sandbox packet can match."""
    return _apply(*_analysed("ipt", family, text, functools.partial(_ipt_rules, family=family)),
                  addresses)


def _ipt_rules(lines: list[str], family: int) -> list[_Rule]:
    found: list[_Rule] = []
    start = 0
    while start < len(lines):
        if not lines[start].startswith("*"):
            start += 1
            continue
        end = start + 1
        while end < len(lines) and lines[end].strip() != "COMMIT":
            end += 1
        block = range(start + 1, end)
        if not any(_IPT_POSITIONAL.match(lines[i]) for i in block):   # positions would move
            for i in block:
                if lines[i].lstrip().startswith(("-A ", "--append ", "[")):
                    rule = _ipt_rule(i, lines[i], family)
                    if rule is not None:
                        found.append(rule)
        start = end + 1
    return found


def _ipt_rule(index: int, line: str, family: int) -> _Rule | None:
    """The rule's shape and address options; None if it has none the sandbox can rule out."""
    fast = _IPT_FAST_V4.fullmatch(line) if family == 4 else None
    if fast and not _IPT_SLOW.search(fast.group(7)):   # "-A C -s a.b.c.d/n REST", iptables-save's
        span = _v4_range(*fast.group(2, 3, 4, 5, 6))    # own order: most rules of a big set
        if span is not None:
            return _Rule(index, f"-A {fast.group(1)} -s * {fast.group(7)}", ((4, (span,)),))
    body = _IPT_COUNTERS.sub("", line) if line.lstrip().startswith("[") else line
    if '"' in body or "'" in body or body.rstrip().endswith("\\"):
        return None
    found = [m for m in _IPT_ADDRESS.finditer(body) if m.group(1) is None]   # not negated
    options = [(family, r) for r in (_ranges(m.group(3), family) for m in found) if r is not None]
    if not options:
        return None
    shape = _IPT_ADDRESS.sub(lambda m: f" {m.group(1) or ''}{m.group(2)} *", body)
    return _Rule(index, shape, tuple(options))


def prune_nft(text: str, addresses: AddressSet) -> Pruned:
    """``text`` (an nft file or listing) without the chain rules no sandbox packet can match."""
    return _apply(*_analysed("nft", 0, text, _nft_rules), addresses)


def _nft_rules(lines: list[str]) -> list[_Rule]:
    found: list[_Rule] = []
    in_chain = False
    depth = 0
    continued = False
    simple = _NFT_SIMPLE_LINE.fullmatch
    for i, line in enumerate(lines):
        if in_chain and depth == 1 and not continued:
            # Most lines of a large ruleset: "ip saddr a.b.c.d/n REST" with no brace, quote,
            # semicolon, comment or continuation, so the chain's state stays as it is.
            m = simple(line)
            if m is not None:
                way, a, b, c, d, prefix, rest = m.groups()
                if not _NFT_SLOW.search(rest):
                    span = _v4_range(a, b, c, d, prefix)
                    if span is not None:
                        found.append(_Rule(i, f"ip {way} * {rest}", ((4, (span,)),)))
                        continue
        was_continued, continued = continued, line.rstrip().endswith("\\")
        opens, closes = line.count("{"), line.count("}")
        if _NFT_CHAIN.match(line):
            in_chain, depth = True, 1
            continue
        if in_chain:
            depth += opens - closes
            if depth <= 0:
                in_chain = False
                continue
        if not in_chain or depth != 1 or opens or closes or was_continued or continued:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ";" in stripped or '"' in stripped:
            continue
        rule = _nft_rule(i, stripped)
        if rule is not None:
            found.append(rule)
    return found


def _nft_rule(index: int, rule: str) -> _Rule | None:
    options: list[Option] = []
    for m in _NFT_ADDRESS.finditer(rule):
        value = m.group(3)
        if value in ("!=", "==", "ne", "eq") or value.startswith(("@", "$")):
            continue
        family = 6 if m.group(1) == "ip6" else 4
        ranges = _ranges(value, family)
        if ranges is not None:
            options.append((family, ranges))
    if not options:
        return None
    return _Rule(index, _NFT_ADDRESS.sub(lambda m: f"{m.group(1)} {m.group(2)} *", rule),
                 tuple(options))


def warm(layers: Mapping[str, tuple[bytes, str]]) -> None:
    """Analyse a candidate's files ahead of time (layer -> (content, source), as the check
    loads them), e.g. in a thread while the host's firewall is read and the change validated:
    the sandbox's pruning then finds the work done."""
    for name, (content, _) in layers.items():
        text = content.decode(errors="replace")
        if name in ("ipv4", "ipv6"):
            family = 4 if name == "ipv4" else 6
            _analysed("ipt", family, text, functools.partial(_ipt_rules, family=family))
        elif name == "nft":
            _analysed("nft", 0, text, _nft_rules)
