"""The space of packets the rules tell apart, so that the audit's probes cover it: the source
networks and source ports any rule (or set) names, each with a representative, and the rules
rewritten into the state a host is in after a quiet moment (rate limits and connection counts
untouched), which a single real connection meets.

* **Source networks.** Every address or network written anywhere in the rules (``-s``,
  ``ip saddr``, ipset and nft set elements, ...) splits the addresses into cells; the audit
  sends from one address of each cell, and from one address outside every one of them
  ("anywhere else", the world at large). The cost is bounded by the rules' *shapes* (a line
  with its addresses taken out): at most :data:`PER_SHAPE` networks of one shape get a
  representative of their own, so 50,000 per-address bans of one shape are two cells, not
  50,000; at most :data:`MAX_CELLS` per family in all.
* **Source ports.** Every port a rule names as a source port (``--sport``, ``--sports``,
  ``sport``) is a probe's source port too, beside an ephemeral one.
* **Idle state.** ``-m limit``, ``-m hashlimit`` (packets or bytes), ``-m connlimit``, nft
  ``limit rate`` (packets or bytes) and ``ct count`` are rewritten to the answer they give
  the first connection after a quiet moment (under every limit, no connection counted), so
  the simultaneous probes are not taken for a flood.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

__all__ = ["MAX_CELLS", "PER_SHAPE", "NamedSpace", "Network", "idle", "named_space", "representative"]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
PER_SHAPE = 2
MAX_CELLS = 64
MAX_SPORTS = 16

# (?<![\w.:/-]) before the first digit, written after it: a pattern that starts with a digit
# skips the other characters fast (a third of the time over a 7 MB ruleset)
_V4 = re.compile(r"(\d(?<![\w.:/-]\d)\d{0,2}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?(?![\w.])")
_V6 = re.compile(r"(?<![\w:./-])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?:/(\d{1,3}))?"
                 r"(?![\w:.])")
_SPORT = re.compile(r"(?:--sport|--source-port|--sports|--source-ports|\bsport)\s+"
                    r"(?:!\s*)?(\{[^}]*\}|\S+)")
_PORT = re.compile(r"\d+")
_ALL_V4 = 0xFFFFFFFF


@dataclass
class NamedSpace:
    """What the rules name: networks by family (each a cell of its own), source ports."""

    networks: dict[int, list[Network]] = field(default_factory=lambda: {4: [], 6: []})
    sports: list[int] = field(default_factory=list)
    collapsed: int = 0          # networks without a representative of their own (same shape)

    def contains(self, address: str) -> bool:
        """`address` lies in a network some rule names (not counting /0)."""
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self.networks[ip.version] if net.prefixlen > 0)


def _network(text: str, prefix: str | None) -> Network | None:
    try:
        return ipaddress.ip_network(f"{text}/{prefix}" if prefix else text, strict=False)
    except ValueError:
        return None


def named_space(texts: Iterable[str]) -> NamedSpace:
    """The networks and source ports the rule texts name (iptables-save, nft listings,
    `ipset save`), bounded as the module says."""
    space = NamedSpace()
    seen: set[tuple[int, int, int] | Network] = set()
    per_shape: dict[tuple[int, str], int] = {}
    networks = space.networks
    for text in texts:
        # Each line with its IPv4 addresses as "A", all lines at once: the pattern matches no
        # line break, and its look-arounds see one as they see a line's end.
        for line, shape in zip(text.splitlines(), _V4.sub("A", text).splitlines()):
            stripped = line.lstrip()
            if not stripped or stripped[0] == "#":
                continue
            if "sport" in line or "source-port" in line:
                _add_sports(line, space.sports)
            v6 = line.count(":") > 1   # an IPv6 address has two at least
            if shape == line and not v6:
                continue   # no address
            # an IPv4 network as (4, first address, prefix length), read without ipaddress
            # (a set of 100,000 elements: 0.4 s of CPU instead of 1.0 s); an IPv6 one as parsed
            found: list[tuple[int, int, int] | Network] = []
            if shape != line:
                for match in _V4.finditer(line):
                    cell = _v4_cell(match.group(1), match.group(2))
                    if cell is not None and cell[2] > 0 \
                            and not _v4_local_only(cell[1], cell[2]):
                        found.append(cell)
            if v6:
                for match in _V6.finditer(line):
                    net = _network(match.group(1), match.group(2))
                    if net is not None and net.prefixlen > 0 and not _local_only(net):
                        found.append(net)
                if found:
                    shape = _V6.sub("A", shape)
            for key in found:
                if key in seen:
                    continue
                seen.add(key)
                version = 4 if isinstance(key, tuple) else key.version
                count_key = (version, shape)
                count = per_shape.get(count_key, 0)
                if count >= PER_SHAPE or len(networks[version]) >= MAX_CELLS:
                    space.collapsed += 1
                    continue
                per_shape[count_key] = count + 1
                networks[version].append(
                    ipaddress.IPv4Network(key[1:]) if isinstance(key, tuple) else key)
    return space


def _add_sports(line: str, sports: list[int]) -> None:
    """The source ports `line` names, to `sports` (at most MAX_SPORTS in all)."""
    for match in _SPORT.finditer(line):
        for port in _PORT.findall(match.group(1))[:MAX_SPORTS]:
            number = int(port)
            if 0 < number < 65536 and number not in sports and len(sports) < MAX_SPORTS:
                sports.append(number)


def _v4_cell(text: str, prefix: str | None) -> tuple[int, int, int] | None:
    """(4, first address, prefix length) of `text`[/`prefix`] as ipaddress.ip_network(...,
    strict=False) reads it (what _V4 matched: four groups of 1-3 digits, a prefix of 1-2);
    None where ipaddress refuses it (an octet over 255 or with a leading zero, a prefix over
    32, digits that are not ASCII)."""
    if not text.isascii() or (prefix and not prefix.isascii()):
        return None   # \d and int() take other scripts' digits too; ipaddress does not
    value = 0
    for octet in text.split("."):
        if octet[0] == "0" and octet != "0":
            return None
        number = int(octet)
        if number > 255:
            return None
        value = value << 8 | number
    length = 32 if not prefix else int(prefix)
    if length > 32:
        return None
    return 4, value & (_ALL_V4 << (32 - length)) & _ALL_V4, length


def _v4_local_only(first: int, length: int) -> bool:
    """_local_only of the IPv4 network (`first`, `length`): a network is loopback, link-local,
    multicast or reserved when its first and last addresses both are; 0.0.0.0/8 (and so the
    unspecified address) by its first."""
    last = first | (_ALL_V4 >> length)
    top, top_last = first >> 24, last >> 24
    return (top == top_last == 127 or (first >> 16 == last >> 16 == 0xA9FE)
            or first >> 28 == last >> 28 == 0xE
            or first >> 28 == last >> 28 == 0xF or top == 0)


def _local_only(net: Network) -> bool:
    """Loopback, link-local, multicast, and what no packet comes from (class E with the
    broadcast address, as in recent's `--mask 255.255.255.255`; 0.0.0.0/8): no outside
    sender carries them (a probe from one never arrives, and would wait a timeout)."""
    first = net.network_address
    return net.is_loopback or net.is_link_local or net.is_multicast or net.is_unspecified \
        or (first.version == 4 and (net.is_reserved or first.packed[0] == 0))


def representative(net: Network, space: NamedSpace, taken: set[str]) -> str | None:
    """An address of `net` in no smaller network the rules name, and not `taken`."""
    inner = [n for n in space.networks[net.version]
             if n != net and n.prefixlen > net.prefixlen and n.subnet_of(net)]  # type: ignore[arg-type]
    size = net.num_addresses
    offsets = [0] if size == 1 else [1, size - 2, size // 2 + 1, size // 4 + 1, 2]
    for offset in offsets:
        if not 0 <= offset < size:
            continue
        candidate = net[offset]
        if str(candidate) in taken or any(candidate in n for n in inner):
            continue
        return str(candidate)
    return None


# --------------------------------------------------------------------------------------------
# The idle state
# --------------------------------------------------------------------------------------------
_IPT_LIMIT = re.compile(r"-m limit(?: --limit \S+)?(?: --limit-burst \d+)?")
_IPT_HASHLIMIT_RATE = re.compile(r"(--hashlimit-upto|--hashlimit-above|--hashlimit)\s+\S+")
_IPT_HASHLIMIT_BURST = re.compile(r"--hashlimit-burst\s+\d+")
_IPT_CONNLIMIT = re.compile(r"(--connlimit-upto|--connlimit-above)\s+\d+")
_NFT_LIMIT = re.compile(r"\blimit rate (over )?\d+/(second|minute|hour|day|week)"
                        r"(?: burst \d+ packets)?")
_NFT_BYTES = re.compile(r"\blimit rate (over )?\d+ [kmg]?bytes/(second|minute|hour|day|week)"
                        r"(?: burst \d+ [kmg]?bytes)?")
_HASHLIMIT_BYTES = re.compile(r"^\d+[kmg]?b/")   # hashlimit's byte mode: 512b/s, 1kb/s, 2mb/s
_NFT_COUNT = re.compile(r"\bct count (over )?\d+")
_HIGH = "10000"


def _hashlimit(line: str) -> str:
    if "--hashlimit" not in line:
        return line
    rate = _IPT_HASHLIMIT_RATE.search(line)
    if rate is not None and _HASHLIMIT_BYTES.match(rate.group(0).split()[-1]):
        # bytes: 100 MB/s with the burst its default (which iptables requires to be at least
        # a second's worth)
        line = re.sub(r"\s--hashlimit-burst\s+\S+", "", line)
        return _IPT_HASHLIMIT_RATE.sub(lambda m: f"{m.group(1)} 100mb/s", line, count=1)
    burst = "--hashlimit-burst" in line
    line = _IPT_HASHLIMIT_BURST.sub(f"--hashlimit-burst {_HIGH}", line)
    return _IPT_HASHLIMIT_RATE.sub(
        lambda m: f"{m.group(1)} {_HIGH}/sec" + ("" if burst else f" --hashlimit-burst {_HIGH}"),
        line, count=1)


def idle(text: str) -> str:
    """The rules as they answer after a quiet moment: every rate limit far away (packets or
    bytes), no connection counted (nft's named limit objects stay as they are)."""
    if "limit" not in text and "ct count" not in text:
        return text
    text = _IPT_LIMIT.sub(f"-m limit --limit {_HIGH}/sec --limit-burst {_HIGH}", text)
    if "--hashlimit" in text:
        text = "\n".join(_hashlimit(line) for line in text.split("\n"))
    text = _IPT_CONNLIMIT.sub(lambda m: f"{m.group(1)} 1000000", text)
    text = _NFT_LIMIT.sub(lambda m: f"limit rate {m.group(1) or ''}{_HIGH}/second "
                                    f"burst {_HIGH} packets", text)
    text = _NFT_BYTES.sub(lambda m: f"limit rate {m.group(1) or ''}1000 mbytes/second "
                                    "burst 1000 mbytes", text)
    return _NFT_COUNT.sub(lambda m: f"ct count {m.group(1) or ''}1000000", text)
