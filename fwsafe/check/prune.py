"""What the sandbox may leave out: rules that no packet of the sandbox can ever match.

Every packet in the check's (and the audit's) sandbox carries addresses from a known set: the
clients', the server's, the audit's sources, the host's own, loopback, link-local and
multicast. A rule whose only way to match is a source or destination address (``-s``/``-d``,
``ip saddr``/``ip6 daddr``) outside that set cannot match any of them, so loading it changes no
verdict, no counter and no trace: on a host with 50,000 per-address rules the sandbox then
loads a handful instead of all of them.

A rule of an iptables user chain that no sandbox packet reaches (every jump to it is from a
rule ruled out by its addresses, or from such a chain) cannot match either: kube-proxy's
``KUBE-SVC-*``/``KUBE-SEP-*`` chains behind cluster-IP ``-d`` matches are left out whole, and
a chain left empty that no loaded rule jumps to is not declared either.

Safety first:

* a rule is left out only when its address options are plain addresses or networks, not
  negated; quoted words (comments) are read as one word, a line with single quotes or a
  continuation is not read and its table is left alone;
* one rule of each *shape* is always kept, so the kernel still loads every distinct
  combination of matches, targets and jumps. The shape is the rule without its addresses,
  numbers (ports, probabilities, marks) and quoted words, with its chain as the built-in
  chains that reach it (a target valid in one hook may be refused in another) and a jump to a
  declared user chain as ``*``: a jump to a missing chain keeps its name and is refused in
  the sandbox as before;
* an iptables table that inserts, replaces, deletes or renames is not touched;
* an address translation (DNAT/SNAT/NETMAP/TPROXY to an address) that a sandbox packet may
  meet widens the set by the addresses it translates to, to a fixed point
  (:func:`sandbox_addresses`); nothing is left out when an nft layer translates addresses or
  an iptables translation cannot be read.

Left-out lines are blanked, not removed: line numbers, and so the naming of culprits as
``FILE:LINE``, stay as they were.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from fwsafe.backends import NFT_TABLES, RULES_FILE, iptsave, layer_has
from fwsafe.backends.families import FAMILIES
from fwsafe.check.address_set import (
    OCTET,
    V4_NETWORK,
    AddressSet,
    Option,
    address_span,
    option_ranges,
    v4_range,
)
from fwsafe.check.prune_ports import moved_to, tcp_dports, within

__all__ = ["AddressSet", "Pruned", "prune_iptables", "prune_nft", "rewrites_addresses",
           "unpruned_why", "warm"]

_IPT_ADDRESS = re.compile(r"(?:^|\s)(!\s+)?(-s|--source|--src|-d|--destination|--dst)\s+(\S+)")
_IPT_NAT = re.compile(r"--to-destination|--to-source|--to\s|\bNETMAP\b|\bTPROXY\b|--on-ip")
_IPT_NAT_WORDS = ("--to", "NETMAP", "TPROXY", "--on-ip")
_NFT_ADDRESS = re.compile(r"\b(ip6?)\s+(saddr|daddr)\s+(\S+)")
_NFT_NAT = re.compile(r"\b(dnat|snat|tproxy|netmap)\b")
_NFT_NAT_WORDS = ("dnat", "snat", "tproxy", "netmap")
_NFT_CHAIN = re.compile(r"^\s*chain\s+\S+\s*\{\s*$")
# an octet written with a leading zero is octal to iptables and nft (010 is 8): such a line
# goes the slow way, where ipaddress refuses it and the rule is kept
_NFT_SIMPLE_LINE = re.compile(rf"[ \t]*ip (saddr|daddr) {OCTET}\.{OCTET}\.{OCTET}\.{OCTET}"
                              r"(?:/(0|[1-9]\d?))? "
                              r"([^{}\";\\#\n]*[^{}\";\\#\s])")
_NFT_SLOW = re.compile(r"\bip6?\s+[sd]addr\b|[\\;\"#{}]")


class _Rule(NamedTuple):
    """A rule the sandbox might leave out: its line, its shape, its address options."""

    line: int
    shape: str
    options: tuple[Option, ...]


# The analysis of a text does not depend on the addresses: the lockout check and the exposure
# (two threads, the same current and candidate texts) share it.
_CACHE: OrderedDict[tuple[str, int, str], tuple[list[str], Any]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_T = TypeVar("_T")


def _analysed(kind: str, family: int, text: str,
              analyse: Callable[[list[str]], _T]) -> tuple[list[str], _T]:
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
    shapes: set[str] = set()
    blank: list[int] = []
    for rule in rules:
        if addresses.may_match(rule.options) or rule.shape not in shapes:
            shapes.add(rule.shape)
        else:
            blank.append(rule.line)
    return _blanked(lines, blank, len(blank))


def _blanked(lines: list[str], blank: list[int], left_out: int) -> Pruned:
    """The text with the lines `blank` emptied (line numbers stay)."""
    if not blank:
        return Pruned("\n".join(lines), left_out)
    out = list(lines)
    for index in blank:
        out[index] = ""
    return Pruned("\n".join(out), left_out)


@dataclass
class Pruned:
    text: str
    left_out: int = 0
    whole: list[str] = field(default_factory=list)   # tables loaded whole, and why


def rewrites_addresses(texts: Iterable[str]) -> bool:
    """Whether any of these rulesets (iptables-save or nft) translates addresses."""
    for text in texts:
        if any(word in text for word in _IPT_NAT_WORDS) and _IPT_NAT.search(text):
            return True
        if any(word in text for word in _NFT_NAT_WORDS) and _NFT_NAT.search(text):
            return True
    return False


def prune_iptables(text: str, addresses: AddressSet, family: int) -> Pruned:
    """``text`` (iptables-save format) without the ``-A`` rules no sandbox packet can match:
    their addresses rule every sandbox packet out, or their chain is reached by none (every
    jump to it is from such a rule)."""
    lines, found = _ipt_analysed(text, family)
    blank: list[int] = []
    left_out = 0
    whole = [f"table {t.name or '?'}: loaded whole (it inserts, replaces, deletes or renames, "
             "or holds a line that is not read here: single quotes, a continuation)"
             for t in found.tables if t.opaque]
    for table in found.tables:
        if table.opaque:
            continue
        live = table.live(addresses)
        shapes: set[str] = set()
        needed = set(live)   # chains a loaded rule is in or jumps to
        for rule in table.rules:
            if (rule.chain in live and rule.may_match(addresses)) or rule.shape not in shapes:
                shapes.add(rule.shape)
                needed.add(rule.chain)
                if rule.jump is not None:
                    needed.add(rule.jump)
                continue
            blank.append(rule.line)
            left_out += 1
        # Chains left empty and never jumped to are not declared either: iptables-nft lists
        # thousands of empty chains slowly (iptables-save after every attempt).
        blank += [line for chain, line in table.declared.items() if chain not in needed]
    pruned = _blanked(lines, blank, left_out) if blank else Pruned(text, 0)
    pruned.whole = whole
    return pruned


class _IptRule(NamedTuple):
    """One ``-A`` rule: its line, its shape, address options, chain, the user chain it jumps
    to (if any) and the addresses it translates to (DNAT/SNAT/NETMAP/TPROXY)."""

    line: int
    shape: str
    options: tuple[Option, ...]
    chain: str
    jump: str | None
    nat: tuple[str, ...]
    ifaces: tuple[str, ...] = ()   # the interfaces its -i/-o options name (not negated)
    dports: tuple[tuple[int, int], ...] | None = None   # a nat rule's TCP ports (prune_ports.tcp_dports)
    # a nat rule's translation to other destination ports (None: it keeps the port)
    moves_to: tuple[tuple[int, int], ...] | None = None

    def may_match(self, addresses: AddressSet) -> bool:
        return addresses.may_match(self.options) and addresses.may_pass(self.ifaces) \
            and addresses.may_open(self.dports)


@dataclass
class _IptTable:
    """One ``*table`` block. ``opaque``: it inserts, replaces, deletes, renames or holds a
    line not read here: nothing in it is left out, every chain counts as reached."""

    builtin: set[str] = field(default_factory=set)
    user: set[str] = field(default_factory=set)
    rules: list[_IptRule] = field(default_factory=list)
    opaque: bool = False
    name: str = ""
    declared: dict[str, int] = field(default_factory=dict)   # user chain -> its line
    jumps: dict[str, list[_IptRule]] = field(default_factory=dict)   # chain -> its jumps

    def live(self, addresses: AddressSet) -> set[str]:
        """The chains some sandbox packet may reach: the built-in ones, and those jumped to by
        a rule of a live chain whose addresses may match."""
        if self.opaque:
            return self.builtin | self.user
        jumps = self.jumps
        live = set(self.builtin)
        stack = list(live)
        while stack:
            for rule in jumps.get(stack.pop(), ()):
                if rule.jump not in live and rule.may_match(addresses):
                    live.add(rule.jump)   # type: ignore[arg-type]
                    stack.append(rule.jump)   # type: ignore[arg-type]
        return live


@dataclass
class _IptAnalysis:
    tables: list[_IptTable] = field(default_factory=list)
    unsure_nat: bool = False   # an address translation not read: packets could carry any


_IPT_FAST_V4 = re.compile(rf"-A (\S+) -s {OCTET}\.{OCTET}\.{OCTET}\.{OCTET}/(0|[1-9]\d?)( .*)")
_IPT_SLOW = re.compile(r"""["'\\]|\s(?:-s|-d|--source|--src|--destination|--dst|-g|--goto"""
                       r"""|--jump|-i|-o|--in-interface|--out-interface)\s""")
_IPT_IFACE = re.compile(r"(?:^|\s)(!\s+)?(-i|--in-interface|-o|--out-interface)\s+(\S+)")
# an interface name as the kernel allows it (1-15 characters) from the letters iptables-save
# prints plainly, or such a prefix with iptables' wildcard "+"; not one that starts with "-"
# (`--comment -o -j DROP`: "-o" is the comment, "-j" no interface)
_IFACE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,14}\+?")
_IPT_QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_IPT_JUMP = re.compile(r"(?:^|\s)(?:-j|--jump|-g|--goto)\s+(\S+)")
_IPT_NAT_VALUE = re.compile(r"(?:^|\s)(?:--to-destination|--to-source|--to|--on-ip)\s+(\S+)")
_NUMBER = re.compile(r"(?<=\s)[0-9][0-9.:,/-]*(?=\s|$)")
_IPT_NEW = re.compile(r"^(?:-N|--new-chain)\s+(\S+)\s*$")
_IPT_POLICY = re.compile(r"^(?:-P|--policy)\s+\S+\s+\S+\s*$")


# one -A rule as read: line, chain, the rule after its chain (addresses, interfaces and quoted
# words masked), address options, jump targets, translated-to addresses, interfaces named
_Parsed = tuple[int, str, str, tuple[Option, ...], list[str], tuple[str, ...], tuple[str, ...]]


def _ipt_analysed(text: str, family: int) -> tuple[list[str], _IptAnalysis]:
    return _analysed("ipt", family, text, functools.partial(_ipt_rules, family=family))


def _ipt_rules(lines: list[str], family: int) -> _IptAnalysis:
    found = _IptAnalysis()
    for block in iptsave.blocks(lines):
        found.tables.append(_ipt_table(lines, block, family, found))
    return found


def _ipt_table(lines: list[str], block: iptsave.Block, family: int, found: _IptAnalysis
               ) -> _IptTable:
    table = _IptTable(name=block.table)
    # a table that another `*table` line opens inside is not read (iptables-restore refuses it)
    table.opaque = not block.closed and block.end < len(lines)
    parsed: list[_Parsed] = []
    for i, line in block.body(lines):
        if line.startswith(":"):
            declared = iptsave.declaration(line)
            if declared is None or declared[1] is None:
                table.opaque = True
            elif declared[1] == "-":
                table.user.add(declared[0])
                table.declared[declared[0]] = i
            else:
                table.builtin.add(declared[0])
            continue
        body = iptsave.uncounted(line)
        if not body.startswith(("-A ", "--append ")):
            m = _IPT_NEW.match(body)
            if m is not None:
                table.user.add(m.group(1))
            elif not _IPT_POLICY.match(body):
                table.opaque = True   # -I/-R/-D/-E/-F/-X...: positions or chains would move
            continue
        fast = _IPT_FAST_V4.fullmatch(body) if family == 4 else None
        if fast is not None and not _IPT_SLOW.search(fast.group(7)):
            # "-A C -s a.b.c.d/n REST", iptables-save's own order: most rules of a large set
            span = v4_range(*fast.group(2, 3, 4, 5, 6))
            if span is not None:
                rest = " -s *" + fast.group(7)
                at = rest.find(" -j ")
                nat = _nat_targets(rest, family) if any(
                    w in rest for w in _IPT_NAT_WORDS) and _IPT_NAT.search(rest) else ()
                parsed.append((i, fast.group(1), rest, ((4, (span,)),),
                               [rest[at + 4:].split(" ", 1)[0]] if at >= 0 else [],
                               () if nat is None else nat, ()))
                found.unsure_nat = found.unsure_nat or nat is None
                continue
        rule = _ipt_parse(body, family)
        if rule is None:
            table.opaque = True
            if any(word in body for word in _IPT_NAT_WORDS) and _IPT_NAT.search(body):
                found.unsure_nat = True
            continue
        chain, rest, options, jumps, nat, ifaces = rule
        if nat is None:
            found.unsure_nat = True
            nat = ()
        parsed.append((i, chain, rest, options, jumps, nat, ifaces))
    # A chain with rules that is not declared as a user chain is a built-in one (a hand-written
    # file may append to INPUT without `:INPUT ACCEPT`): packets reach it.
    table.builtin.update(p[1] for p in parsed if p[1] not in table.user)
    hooks = _hooks(table, parsed)
    shapes: dict[tuple[str, str], str] = {}
    for i, chain, rest, options, jumps, nat, ifaces in parsed:
        jump = jumps[0] if len(jumps) == 1 and jumps[0] in table.user else None
        if len(jumps) > 1:
            table.opaque = True
        if jump is not None:
            rest = _IPT_JUMP.sub(lambda m: m.group(0)[:m.start(1) - m.start(0)] + "*", rest)
        where = chain if chain in table.builtin else hooks.get(chain, "~")
        shape = shapes.get((where, rest))
        if shape is None:
            shape = shapes[(where, rest)] = f"{where} {_NUMBER.sub('#', rest)}"
        dports = tcp_dports(rest) if table.name == "nat" else None
        moves = moved_to(rest) if table.name == "nat" and "--to" in rest else None
        table.rules.append(_IptRule(i, shape, options, chain, jump, nat, ifaces, dports, moves))
        if jump is not None:
            table.jumps.setdefault(chain, []).append(table.rules[-1])
    return table


def _hooks(table: _IptTable, parsed: list[_Parsed]) -> dict[str, str]:
    """Per user chain, the built-in chains it is reached from (whatever the addresses), as a
    label: rules of user chains reached from the same hooks share a shape (a target valid in
    one hook may be refused in another)."""
    jumps: dict[str, set[str]] = {}
    for _, chain, _, _, targets, _, _ in parsed:
        for target in targets:
            if target in table.user:
                jumps.setdefault(chain, set()).add(target)
    reached: dict[str, set[str]] = {}
    for hook in table.builtin:
        seen = {hook}
        stack = [hook]
        while stack:
            for target in jumps.get(stack.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
                    reached.setdefault(target, set()).add(hook)
    return {chain: "~" + ",".join(sorted(found)) for chain, found in reached.items()}


def _ipt_parse(body: str, family: int) -> tuple[str, str, tuple[Option, ...], list[str],
                                                 tuple[str, ...] | None, tuple[str, ...]] | None:
    """(chain, the rule after its chain with quoted words, addresses and interfaces masked,
    address options, jump targets, translated-to addresses (None: not readable), the
    interfaces its -i/-o options name (not negated, plain names only)); None if the line
    cannot be read safely (single quotes, an open quote, a continuation)."""
    _, _, rest = body.partition(" ")
    chain, _, rest = rest.partition(" ")
    if not chain:
        return None
    rest = " " + rest
    if '"' in rest:
        rest = _IPT_QUOTED.sub('"-"', rest)
        if '"' in rest.replace('"-"', ""):
            return None
    if "'" in rest or "\\" in rest:
        return None
    options: list[Option] = []
    if "-s" in rest or "-d" in rest:
        def mask(m: re.Match[str]) -> str:
            if m.group(3).startswith("-"):   # `--comment -s -j X`: "-s" a comment's word
                return m.group(0)
            if m.group(1) is None:   # not negated
                ranges = option_ranges(m.group(3), family)
                if ranges is not None:
                    options.append((family, ranges))
            return f" {m.group(1) or ''}{m.group(2)} *"
        rest = _IPT_ADDRESS.sub(mask, rest)
    ifaces: list[str] = []
    if "-i" in rest or "-o" in rest or "-interface" in rest:
        def hide(m: re.Match[str]) -> str:
            if not _IFACE_NAME.fullmatch(m.group(3)):
                return m.group(0)   # not read (quoted, odd, `--comment -o -j X`): may match
            if m.group(1) is None:
                ifaces.append(m.group(3))
            return f" {m.group(1) or ''}{m.group(2)} *"
        rest = _IPT_IFACE.sub(hide, rest)
    if " -g " in rest or " --g" in rest or " --j" in rest:
        jumps = _IPT_JUMP.findall(rest)
    else:
        at = rest.find(" -j ")
        jumps = [rest[at + 4:].split(" ", 1)[0]] if at >= 0 else []
    nat: tuple[str, ...] | None = ()
    if any(word in rest for word in _IPT_NAT_WORDS) and _IPT_NAT.search(rest):
        nat = _nat_targets(rest, family)
    return chain, rest, tuple(options), jumps, nat, tuple(ifaces)


def _nat_targets(rest: str, family: int) -> tuple[str, ...] | None:
    """The addresses (networks) a translation rule rewrites to; None if one is not readable."""
    values = _IPT_NAT_VALUE.findall(rest)
    if not values and re.search(r"\bNETMAP\b", rest):
        return None
    found: list[str] = []
    for value in values:
        if value.startswith("["):              # [v6]:port or [a]-[b]:port
            address = value.split("]:", 1)[0].replace("[", "").replace("]", "")
        elif family == 4 or value.count(":") == 1:
            address = value.split(":", 1)[0]
        else:
            address = value
        if not address:
            continue                            # a port only: the address stays
        first, _, last = address.partition("-")
        if not last and V4_NETWORK.match(first):
            if address_span(first) is None:
                return None
            found.append(first)
            continue
        try:
            if last:
                found += [str(n) for n in ipaddress.summarize_address_range(
                    ipaddress.ip_address(first), ipaddress.ip_address(last))]
            else:
                found.append(str(ipaddress.ip_network(first, strict=False)))
        except (ValueError, TypeError):
            return None
    return tuple(found)


def unpruned_why(nft: Iterable[str]) -> str:
    """Why `sandbox_addresses` gave None (for these nft texts and iptables texts it was given):
    what `check -v` says."""
    if rewrites_addresses(list(nft)):
        return ("an nft table translates addresses (dnat, snat, ...): the addresses its packets "
                "carry after it are not read, so every rule is loaded")
    return ("an iptables address translation could not be read (a --to-destination that is "
            "not an address, NETMAP, a quoted or continued line): every rule is loaded")


def sandbox_addresses(addresses: Iterable[str], iptables: Iterable[tuple[str, int]],
                      nft: Iterable[str], interfaces: Iterable[str] | None = None,
                      ports: Iterable[int] | None = None) -> AddressSet | None:
    """The addresses sandbox packets may carry: ``addresses`` (the sandbox's own), and those
    an address translation that such a packet may meet rewrites them to (iptables: DNAT/SNAT
    rules in chains the packets reach, whose own addresses may match), to a fixed point.
    None (nothing may be left out) when an nft file translates addresses, or a translation is
    not readable. ``interfaces``: the sandbox's (its packets arrive and leave by no other);
    ``ports``: the TCP destination ports of the connections it opens (a nat rule for another
    port never sees them: Docker's published ports); None: any."""
    if rewrites_addresses([t for t in nft]):
        return None
    texts = list(iptables)
    found = _translated(list(addresses), texts, interfaces, ports)
    if found is not None and ports is not None and _ports_moved(texts, found):
        # a translation the sandbox's packets meet may move them to another port, which nat
        # rules after it see: no rule is left out for its port
        return _translated(list(addresses), texts, interfaces, None)
    return found


def _ports_moved(texts: list[tuple[str, int]], found: AddressSet) -> bool:
    """A nat rule that may translate the destination port is reached by a sandbox packet."""
    for text, family in texts:
        if "--to" not in text:
            continue
        for table in _ipt_analysed(text, family)[1].tables:
            moving = [r for r in table.rules if r.moves_to is not None
                      and not within(r.moves_to, found.ports or frozenset())]
            if moving:
                live = table.live(found)
                if any(r.chain in live and r.may_match(found) for r in moving):
                    return True
    return False


def _translated(base: list[str], texts: list[tuple[str, int]],
                interfaces: Iterable[str] | None, ports: Iterable[int] | None
                ) -> AddressSet | None:
    """sandbox_addresses' fixed point (its translations not read: None)."""
    names = None if interfaces is None else sorted(interfaces)
    opened = None if ports is None else sorted(set(ports))
    found = AddressSet.of(base, names, opened)
    extra: set[str] = set()
    for _ in range(16):
        new: set[str] = set()
        for text, family in texts:
            if not (any(word in text for word in _IPT_NAT_WORDS) and _IPT_NAT.search(text)):
                continue
            analysis = _ipt_analysed(text, family)[1]
            if analysis.unsure_nat:
                return None
            for table in analysis.tables:
                nat = [r for r in table.rules if r.nat]
                if not nat:
                    continue
                live = table.live(found)
                new.update(a for r in nat if r.chain in live and r.may_match(found)
                           for a in r.nat)
        if new <= extra:
            found.translated = len(extra)
            return found
        extra |= new
        found = AddressSet.of([*base, *sorted(extra)], names, opened)
    return None


def prune_nft(text: str, addresses: AddressSet) -> Pruned:
    """``text`` (an nft file or listing) without the chain rules no sandbox packet can match."""
    lines, rules = _analysed("nft", 0, text, _nft_rules)
    return _apply(lines, rules, addresses)


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
                    span = v4_range(a, b, c, d, prefix)
                    if span is not None:
                        found.append(_Rule(i, _NUMBER.sub("#", f"ip {way} * {rest}"),
                                           ((4, (span,)),)))
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
        ranges = option_ranges(value, family)
        if ranges is not None:
            options.append((family, ranges))
    if not options:
        return None
    shape = _NFT_ADDRESS.sub(lambda m: f"{m.group(1)} {m.group(2)} *", rule)
    return _Rule(index, _NUMBER.sub("#", shape), tuple(options))


def warm(layers: Mapping[str, tuple[bytes, str]]) -> None:
    """Analyse a candidate's files ahead of time (layer -> (content, source), as the check
    loads them), e.g. in a thread while the host's firewall is read and the change validated:
    the sandbox's pruning then finds the work done."""
    for name, (content, _) in layers.items():
        text = content.decode(errors="replace")
        if layer_has(name, RULES_FILE):
            _ipt_analysed(text, FAMILIES[name].ip_version)
        elif layer_has(name, NFT_TABLES):
            _analysed("nft", 0, text, _nft_rules)
