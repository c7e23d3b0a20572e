"""Pure helpers of `fwsafe check`: reading the kernel's answers and mapping them to file lines.

Nothing here runs a program. The kernel's verdict comes from elsewhere (packet counters in
``iptables-save -c`` output, ``nft monitor trace`` events); this module only

* parses ``iptables-save -c`` output and diffs two of them (which rule counted packets),
* maps "the Nth rule of chain C in table T" back to the line of the rules file that made it,
* scans an nftables file for its rule statements, and maps rule handles (from ``nft --echo
  --handle``) back to file lines,
* parses ``nft -a list ruleset`` and ``nft -a monitor trace`` output,
* names the matches the sandbox cannot reproduce (rate limits, owners, marks, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fwsafe.backends.iptsave import BUILTIN_CHAIN_NAMES, Rule, Tables

# --------------------------------------------------------------------------------------------
# What the sandbox cannot reproduce
# --------------------------------------------------------------------------------------------

#: iptables match modules (``-m NAME``) whose outcome depends on something the sandbox lacks.
IPT_UNREPRODUCIBLE: dict[str, str] = {
    "owner": "owner: the process owning a local socket",
    "cgroup": "cgroup: the cgroup of a local socket",
    "socket": "socket: lookups of local sockets",
    "limit": "limit: a rate limit (the sandbox sends a single connection)",
    "hashlimit": "hashlimit: a rate limit (the sandbox sends a single connection)",
    "recent": "recent: the address history (empty in the sandbox)",
    "connlimit": "connlimit: connection counts (the sandbox holds only its own)",
    "set": "set: ipset contents (not copied into the sandbox)",
    "time": "time: the time of day or date",
    "physdev": "physdev: bridge ports (the sandbox has no bridge)",
    "mark": "mark: packet marks (may be set outside the firewall: tc, routing, daemons)",
    "connmark": "connmark: connection marks (may be set outside the firewall)",
    "statistic": "statistic: random or every-nth sampling",
    "quota": "quota: the quota used so far",
    "quota2": "quota2: the quota used so far",
    "connbytes": "connbytes: traffic counted so far on the connection",
    "string": "string: payload content (the sandbox does not speak SSH)",
    "u32": "u32: raw packet bytes",
    "bpf": "bpf: a BPF program on packet bytes",
    "length": "length: packet lengths (the sandbox's packets differ from SSH's)",
    "ttl": "ttl: the TTL of packets from the real client (hops away)",
    "hl": "hl: the hop limit of packets from the real client (hops away)",
    "tos": "tos: TOS marking by the real client",
    "dscp": "dscp: DSCP marking by the real client",
    "tcpmss": "tcpmss: the MSS the real client announces",
    "mac": "mac: MAC addresses of the real neighbours",
    "policy": "policy: IPsec policies",
    "geoip": "geoip: the GeoIP database",
    "devgroup": "devgroup: interface groups",
    "cpu": "cpu: the CPU that receives the packet",
    "cluster": "cluster: cluster hashing",
    "rateest": "rateest: rate estimators",
    "realm": "realm: routing realms",
    "ipvs": "ipvs: IPVS state",
    "osf": "osf: OS fingerprinting",
    "condition": "condition: run-time condition flags",
    "psd": "psd: port-scan history",
}
#: iptables targets whose verdict comes from outside the kernel's rules.
IPT_UNREPRODUCIBLE_TARGETS: dict[str, str] = {
    "NFQUEUE": "NFQUEUE: the verdict of a userspace program (none runs in the sandbox)",
    "QUEUE": "QUEUE: the verdict of a userspace program (none runs in the sandbox)",
}
#: nft expressions (regex on the canonical listing) the sandbox cannot reproduce.
NFT_UNREPRODUCIBLE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(meta\s+)?sk(uid|gid)\b"), "skuid/skgid: the process owning a local socket"),
    (re.compile(r"\bsocket\s+cgroupv2\b|\bmeta\s+cgroup\b"), "cgroup: the cgroup of a local socket"),
    (re.compile(r"\bsocket\s+(transparent|mark|wildcard)\b"), "socket: lookups of local sockets"),
    (re.compile(r"\blimit\s+rate\b"), "limit rate: a rate limit (the sandbox sends a single connection)"),
    (re.compile(r"\bct\s+count\b"), "ct count: connection counts (the sandbox holds only its own)"),
    (re.compile(r"\bmeta\s+(time|day|hour)\b"), "meta time/day/hour: the time of day or date"),
    (re.compile(r"\bqueue\b"), "queue: the verdict of a userspace program (none runs in the sandbox)"),
    (re.compile(r"\bmeter\b|\b(add|update)\s+@"), "meter/dynamic set: history built at run time"),
    (re.compile(r"\bnumgen\s+random\b"), "numgen random: random sampling"),
    (re.compile(r"\b(meta|ct)\s+mark\b(?!\s+set)"),
     "mark: packet or connection marks (may be set outside the firewall)"),
    (re.compile(r"\bquota\b"), "quota: the quota used so far"),
    (re.compile(r"\bct\s+(bytes|packets|avgpkt)\b"), "ct bytes/packets: traffic counted so far"),
    (re.compile(r"\bip\s+ttl\b|\bip6\s+hoplimit\b"), "ttl/hoplimit: packets from the real client"),
    (re.compile(r"\b(meta|ip|ip6)\s+length\b"), "length: packet lengths differ from SSH's"),
    (re.compile(r"\bosf\b"), "osf: OS fingerprinting"),
    (re.compile(r"\bipsec\b|\bmeta\s+secpath\b"), "ipsec: IPsec policies"),
    (re.compile(r"\bether\s+(saddr|daddr)\b"), "ether: MAC addresses of the real neighbours"),
    (re.compile(r"\bmeta\s+cpu\b"), "meta cpu: the CPU that receives the packet"),
    (re.compile(r"\bmeta\s+(iif|oif)group\b"), "interface groups"),
    (re.compile(r"\bmeta\s+rtclassid\b"), "rtclassid: routing realms"),
    (re.compile(r"@ih,"), "@ih: payload content (the sandbox does not speak SSH)"),
]

#: The general limits, reported in every JSON answer.
LIMITS: list[str] = [
    "rate limits (iptables limit/hashlimit, nft limit rate): the sandbox sends one connection",
    "history (recent, connlimit, quota, connbytes, nft meters and dynamic sets): starts empty",
    "socket owner and cgroup matches (owner, cgroup, socket, nft skuid/skgid/cgroupv2)",
    "time of day (iptables time, nft meta time/day/hour)",
    "ipset contents and nft set contents changed at run time",
    "interfaces other than the one the management traffic arrives on; bridge ports (physdev)",
    "packet and connection marks set outside the firewall (tc, ip rule, daemons)",
    "NFQUEUE/queue verdicts of userspace programs",
    "what the real client's packets carry: TTL/hop limit, TOS/DSCP, MSS, MAC address, payload",
    "IPsec policies, GeoIP, OS fingerprints, CPU, cluster hashing, random sampling",
    "ARP and IPv6 neighbour discovery (the sandbox uses static neighbour entries)",
    "routes and addresses other than those of the management path; sysctls other than "
    "nf_conntrack_tcp_loose / nf_conntrack_tcp_be_liberal",
]


def interface_known(name: str, known: Iterable[str]) -> bool:
    """Whether an iptables (``eth+``) or nft (``eth*``) interface name matches a known one."""
    if name.endswith(("+", "*")):
        return any(k.startswith(name[:-1]) for k in known)
    return name in known


# --------------------------------------------------------------------------------------------
# iptables-save output (with -c counters)
# --------------------------------------------------------------------------------------------
_COUNTED = re.compile(r"^\[(\d+):(\d+)\]\s+(.*)$")
_CHAIN_DECL = re.compile(r"^:(\S+)\s+(\S+)(?:\s+\[(\d+):(\d+)\])?")

DROP_TARGETS = frozenset({"DROP", "REJECT", "TARPIT", "NFQUEUE", "QUEUE"})
TERMINAL_TARGETS = DROP_TARGETS | {"ACCEPT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "REDIRECT",
                                   "NETMAP"}


@dataclass
class ChainDelta:
    policy_packets: int = 0
    rules: dict[int, int] = field(default_factory=dict)  # rule index -> packets counted


def counter_delta(before: Tables, after: Tables) -> dict[tuple[str, str], ChainDelta]:
    """Packets each rule and chain policy counted between two ``iptables-save -c`` outputs
    (parsed with counters).

    A chain whose rules changed in between (different rule texts) counts from zero.
    """
    deltas: dict[tuple[str, str], ChainDelta] = {}
    for table, saved in after.items():
        old_table = before.get(table)
        for name, chain in saved.chains.items():
            old = old_table.chains.get(name) if old_table is not None else None
            same = old is not None and old.rules == chain.rules
            delta = ChainDelta()
            base_policy = old.policy_packets if (old is not None and same) else 0
            delta.policy_packets = max(0, chain.policy_packets - base_policy)
            bases = old.packets if old is not None and same else []
            for index, packets in enumerate(chain.packets, start=1):
                base = bases[index - 1] if index <= len(bases) else 0
                if packets > base:
                    delta.rules[index] = packets - base
            deltas[(table, name)] = delta
    return deltas


@dataclass(frozen=True)
class CountedDrop:
    """A rule or chain policy that counted packets and drops them."""

    table: str
    chain: str
    index: int | None       # None: the chain policy
    text: str
    packets: int


def counted_drops(after: Tables, deltas: dict[tuple[str, str], ChainDelta]) -> list[CountedDrop]:
    """Rules with a dropping target (DROP, REJECT, ...) and DROP policies that counted packets.

    Rules come first (in table and chain order), then policies: a REJECT's answer dropped by a
    policy is reported after the REJECT that caused it.
    """
    rules: list[CountedDrop] = []
    policies: list[CountedDrop] = []
    for table, saved in after.items():
        for name, chain in saved.chains.items():
            delta = deltas.get((table, name))
            if delta is None:
                continue
            for index, packets in delta.rules.items():
                rule = chain.rule(index)
                if rule.target in DROP_TARGETS:
                    rules.append(CountedDrop(table, name, index, rule.text, packets))
            if chain.policy == "DROP" and delta.policy_packets > 0:
                policies.append(CountedDrop(table, name, None, f":{name} DROP",
                                            delta.policy_packets))
    return rules + policies


def evaluated_rules(after: Tables, deltas: dict[tuple[str, str], ChainDelta]
                    ) -> set[tuple[str, str, int]]:
    """(table, chain, index) of every rule the traffic between two snapshots may have met.

    Conservative: the built-in chains of the local paths (all but FORWARD) are entered; a
    user chain is entered when a jump to it counted. In an entered chain, every rule up to the
    last counted rule with a terminal target was met; all rules when the policy counted or
    no terminal rule counted.
    """
    entered: set[tuple[str, str]] = {
        (table, name) for table, saved in after.items() for name in saved.chains
        if name in BUILTIN_CHAIN_NAMES and name != "FORWARD"
    }
    changed = True
    while changed:
        changed = False
        for table, saved in after.items():
            chains = saved.chains
            for name, chain in chains.items():
                if (table, name) not in entered:
                    continue
                delta = deltas.get((table, name), ChainDelta())
                for index in delta.rules:
                    rule = chain.rule(index)
                    for jump in (rule.target, rule.goto):
                        if jump and jump in chains and (table, jump) not in entered:
                            entered.add((table, jump))
                            changed = True
    met: set[tuple[str, str, int]] = set()
    for table, name in entered:
        chain = after[table].chains[name]
        delta = deltas.get((table, name), ChainDelta())
        terminal = [i for i in delta.rules if chain.rule(i).target in TERMINAL_TARGETS]
        bound = len(chain.rules)
        if terminal and delta.policy_packets == 0:
            bound = max(terminal)
        met.update((table, name, i) for i in range(1, bound + 1))
    return met


def reachable_chains(tables: Tables) -> set[tuple[str, str]]:
    """Chains a packet to or from this host can reach: built-in chains except FORWARD, and
    the user chains they (transitively) jump or go to."""
    reach: set[tuple[str, str]] = {
        (table, name) for table, saved in tables.items() for name in saved.chains
        if name in BUILTIN_CHAIN_NAMES and name != "FORWARD"
    }
    todo = list(reach)
    while todo:
        table, name = todo.pop()
        chains = tables[table].chains
        for rule in chains[name].each_rule():
            for jump in (rule.target, rule.goto):
                if jump and jump in chains and (table, jump) not in reach:
                    reach.add((table, jump))
                    todo.append((table, jump))
    return reach


def ipt_unreproducible(rule: Rule, known_interfaces: Iterable[str]) -> list[str]:
    """Why the sandbox cannot reproduce this rule's outcome ([] = it can)."""
    reasons = [IPT_UNREPRODUCIBLE[m] for m in rule.modules() if m in IPT_UNREPRODUCIBLE]
    target = rule.target
    if target in IPT_UNREPRODUCIBLE_TARGETS:
        reasons.append(IPT_UNREPRODUCIBLE_TARGETS[target])
    known = list(known_interfaces)
    for option in ("-i", "-o", "--in-interface", "--out-interface"):
        name = rule.option(option)
        if name and not interface_known(name, known):
            reasons.append(f"interface {name}: not in the sandbox")
    return reasons


def ipt_excludes_tcp(rule: Rule, family: int) -> bool:
    """True when the rule's protocol match can never match the TCP management traffic."""
    proto = rule.option("-p", "--protocol")
    if proto is None:
        return False
    tcp = proto.lower() in ("tcp", "6", "all", "0")
    return tcp == rule.negated("-p")


def ipt_interface_only(reasons: list[str]) -> bool:
    return all(r.startswith("interface ") for r in reasons)


# --------------------------------------------------------------------------------------------
# iptables-save files: which line made the Nth rule of a chain
# --------------------------------------------------------------------------------------------
@dataclass
class IptFileMap:
    source: str
    lines: list[str]
    tables: list[str] = field(default_factory=list)
    rules: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    policies: dict[tuple[str, str], int] = field(default_factory=dict)
    uncertain: set[tuple[str, str]] = field(default_factory=set)

    def text(self, line: int) -> str:
        return self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""

    def rule_line(self, table: str, chain: str, index: int, expected_count: int | None = None
                  ) -> int | None:
        """The file line of rule `index` (1-based) of `chain` in `table`, None if unknown.

        `expected_count`, the number of rules the kernel holds in that chain, guards against a
        mapping that went wrong (a file that edits chains in ways this map does not follow).
        """
        key = (table, chain)
        lines = self.rules.get(key)
        if lines is None or key in self.uncertain:
            return None
        if expected_count is not None and expected_count != len(lines):
            return None
        return lines[index - 1] if 0 < index <= len(lines) else None

    def policy_line(self, table: str, chain: str) -> int | None:
        return self.policies.get((table, chain))


def map_iptables_file(text: str, source: str) -> IptFileMap:
    """Follow an iptables-save file the way iptables-restore does, keeping line numbers.

    ``-A`` appends, ``-I CHAIN [N]`` inserts, ``-R CHAIN N`` replaces, ``-D CHAIN N`` deletes,
    ``-F`` flushes; a ``-D`` by rule text makes that chain's mapping uncertain.
    """
    lines = text.splitlines()
    fmap = IptFileMap(source, lines)
    table: str | None = None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            if table not in fmap.tables:
                fmap.tables.append(table)
            continue
        if table is None:
            continue
        if line == "COMMIT":
            table = None
            continue
        declared = _CHAIN_DECL.match(line)
        if declared:
            fmap.rules.setdefault((table, declared.group(1)), [])
            if declared.group(2) != "-":
                fmap.policies[(table, declared.group(1))] = number
            continue
        counted = _COUNTED.match(line)
        if counted:
            line = counted.group(3)
        tokens = line.split(None, 3)  # the command, the chain, maybe a position
        if not tokens:
            continue
        command, chain = tokens[0], (tokens[1] if len(tokens) > 1 else "")
        key = (table, chain)
        rules = fmap.rules.setdefault(key, [])
        position = tokens[2] if len(tokens) > 2 and tokens[2].isdigit() else None
        if command in ("-A", "--append"):
            rules.append(number)
        elif command in ("-I", "--insert"):
            at = int(position) - 1 if position else 0
            rules.insert(min(max(at, 0), len(rules)), number)
        elif command in ("-R", "--replace") and position and 0 < int(position) <= len(rules):
            rules[int(position) - 1] = number
        elif command in ("-D", "--delete") and position and 0 < int(position) <= len(rules):
            del rules[int(position) - 1]
        elif command in ("-D", "--delete", "-R", "--replace"):
            fmap.uncertain.add(key)
        elif command in ("-F", "--flush"):
            if not chain or chain.startswith("-"):
                fmap.rules.pop(key, None)
                for other in [k for k in fmap.rules if k[0] == table]:
                    fmap.rules[other] = []
            else:
                rules.clear()
        elif command in ("-P", "--policy"):
            fmap.policies[key] = number
        elif command in ("-X", "--delete-chain"):
            fmap.rules.pop(key, None)
    return fmap


# --------------------------------------------------------------------------------------------
# nftables files: rule statements and their lines
# --------------------------------------------------------------------------------------------
NFT_FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
_CHAIN_PROPERTIES = frozenset({"type", "policy", "comment", "devices", "priority", "hook"})

ChainKey = tuple[str, str, str]  # (family, table, chain)


@dataclass(frozen=True)
class NftFileRule:
    chain: ChainKey
    line: int
    text: str


@dataclass
class NftFileInfo:
    rules: list[NftFileRule] = field(default_factory=list)
    policies: dict[ChainKey, int] = field(default_factory=dict)
    #: the file includes others, replaces or deletes rules: positions are not reliable
    uncertain: bool = False


@dataclass
class _Tok:
    kind: str  # "word", "str", "nl", ";", "{", "}"
    text: str
    line: int


_BLANKS = re.compile(r"[ \t\r\n]*")
_WORD = re.compile(r"[^ \t\r\n;{}#\"]+")


def _nft_tokens(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] == "\n":
            i += 2
            line += 1
        elif c == "\n":
            # One token for a run of newlines and blanks: the lines a pruned file blanked out
            # (tens of thousands) end no more statements than one newline does.
            tokens.append(_Tok("nl", "\n", line))
            blanks = _BLANKS.match(text, i + 1)
            end = blanks.end() if blanks else i + 1
            line += 1 + text.count("\n", i + 1, end)
            i = end
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in ";{}":
            tokens.append(_Tok(c, c, line))
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"' and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            tokens.append(_Tok("str", text[i:j + 1], line))
            i = j + 1
        else:
            word = _WORD.match(text, i)
            j = word.end() if word else i + 1
            tokens.append(_Tok("word", text[i:j], line))
            i = j
    return tokens


def _table_name(words: list[str]) -> tuple[str, str] | None:
    """(family, name) of ``table [family] name`` (the family defaults to ip)."""
    if len(words) >= 2 and words[0] in NFT_FAMILIES:
        return words[0], words[1]
    if len(words) == 1:
        return "ip", words[0]
    return None


class _NftScanner:
    def __init__(self, text: str) -> None:
        self.tokens = _nft_tokens(text)
        self.pos = 0
        self.info = NftFileInfo()

    def peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def skip_block(self) -> None:
        """After a '{': skip to its matching '}'."""
        depth = 1
        while self.pos < len(self.tokens) and depth:
            kind = self.tokens[self.pos].kind
            depth += 1 if kind == "{" else -1 if kind == "}" else 0
            self.pos += 1

    def statement(self, chain_level: bool) -> tuple[list[_Tok], str]:
        """Tokens up to the end of a statement; in a chain, braces belong to the rule.

        Returns the tokens and what ended it: "nl", ";", "{" (a block opens), "}" or "eof".
        """
        toks: list[_Tok] = []
        depth = 0
        while self.pos < len(self.tokens):
            tok = self.tokens[self.pos]
            if tok.kind == "{":
                if not chain_level or not toks:
                    self.pos += 1
                    return toks, "{"
                depth += 1
            elif tok.kind == "}":
                if depth == 0:
                    return toks, "}"
                depth -= 1
            elif tok.kind in ("nl", ";") and depth == 0:
                self.pos += 1
                return toks, tok.kind
            if tok.kind != "nl":
                toks.append(tok)
            self.pos += 1
        return toks, "eof"

    def block(self, level: str, context: tuple[str, ...]) -> None:
        """Read statements until the closing '}' (or the end, at top level)."""
        while self.pos < len(self.tokens):
            tok = self.peek()
            if tok is not None and tok.kind == "}":
                self.pos += 1
                return
            toks, end = self.statement(chain_level=(level == "chain"))
            words = [t.text for t in toks]
            if end == "{":
                self.open_block(level, context, words)
                continue
            if not toks:
                continue
            if level == "chain":
                self.chain_statement(context, toks, words)
            elif level == "top":
                self.top_statement(toks, words)

    def open_block(self, level: str, context: tuple[str, ...], words: list[str]) -> None:
        if level == "top":
            if words[:1] in (["add"], ["create"]):
                words = words[1:]
            if words[:1] == ["table"] and (name := _table_name(words[1:])):
                self.block("table", name)
                return
            if words[:1] == ["chain"] and len(words) >= 3:
                fam, rest = (words[1], words[2:]) if words[1] in NFT_FAMILIES else ("ip", words[1:])
                if len(rest) >= 2:
                    self.block("chain", (fam, rest[0], rest[1]))
                    return
        elif level == "table" and words[:1] == ["chain"] and len(words) >= 2:
            self.block("chain", (context[0], context[1], words[1]))
            return
        self.skip_block()

    def chain_statement(self, context: tuple[str, ...], toks: list[_Tok], words: list[str]) -> None:
        key: ChainKey = (context[0], context[1], context[2])
        if words[0] in _CHAIN_PROPERTIES:
            if words[0] == "policy":
                self.info.policies[key] = toks[0].line
            return
        self.info.rules.append(NftFileRule(key, toks[0].line, " ".join(words)))

    def top_statement(self, toks: list[_Tok], words: list[str]) -> None:
        if words[0] == "include":
            self.info.uncertain = True
            return
        if len(words) >= 2 and words[1] == "rule":
            if words[0] in ("replace", "delete", "destroy"):
                self.info.uncertain = True
                return
            if words[0] not in ("add", "insert"):
                return
            rest = words[2:]
            if rest and rest[0] in NFT_FAMILIES:
                fam, rest = rest[0], rest[1:]
            else:
                fam = "ip"
            if len(rest) >= 3:
                self.info.rules.append(NftFileRule((fam, rest[0], rest[1]), toks[0].line,
                                                   " ".join(rest[2:])))


def scan_nft_file(text: str) -> NftFileInfo:
    """The rule statements of an nftables file, in order, with their chain and line."""
    scanner = _NftScanner(text)
    scanner.block("top", ())
    return scanner.info


_ECHO_RULE = re.compile(
    r"^(?:add|insert) rule (\S+) (\S+) (\S+) (?:(?:handle|position|index) \d+ )?(.*?)"
    r"\s*# handle (\d+)\s*$")


@dataclass(frozen=True)
class EchoedRule:
    chain: ChainKey
    handle: int
    text: str


def parse_nft_echo(text: str) -> list[EchoedRule]:
    """The rules ``nft --echo --handle -f FILE`` reports as added, in order."""
    found = []
    for line in text.splitlines():
        m = _ECHO_RULE.match(line.strip())
        if m:
            found.append(EchoedRule((m.group(1), m.group(2), m.group(3)), int(m.group(5)),
                                    m.group(4)))
    return found


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("{ ", "{").replace(" }", "}")).strip()


def map_nft_handles(info: NftFileInfo, echoed: list[EchoedRule]) -> dict[tuple[ChainKey, int], int]:
    """{(chain, handle): file line} for the rules the file added.

    The k-th rule statement of the file is the k-th rule nft echoes; where the two lists do
    not line up (includes, rules replaced), rules are matched by their text within the chain.
    """
    mapping: dict[tuple[ChainKey, int], int] = {}
    if not info.uncertain and [r.chain for r in info.rules] == [e.chain for e in echoed]:
        for rule, echo in zip(info.rules, echoed):
            mapping[(echo.chain, echo.handle)] = rule.line
        return mapping
    for echo in echoed:
        want = _squash(echo.text)
        for rule in info.rules:
            if rule.chain == echo.chain and _squash(rule.text) == want:
                mapping[(echo.chain, echo.handle)] = rule.line
                break
    return mapping


# --------------------------------------------------------------------------------------------
# nft -a list ruleset
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NftRule:
    handle: int
    text: str

    def jumps(self) -> list[str]:
        return re.findall(r"\b(?:jump|goto)\s+(\S+)", self.text)


@dataclass
class NftChain:
    key: ChainKey
    hook: str | None = None
    policy: str | None = None
    rules: list[NftRule] = field(default_factory=list)

    def position(self, handle: int) -> int | None:
        for i, rule in enumerate(self.rules, start=1):
            if rule.handle == handle:
                return i
        return None


@dataclass
class NftListing:
    chains: dict[ChainKey, NftChain] = field(default_factory=dict)
    dynamic_sets: set[tuple[str, str, str]] = field(default_factory=set)
    tables: list[tuple[str, str]] = field(default_factory=list)
    table_text: dict[tuple[str, str], str] = field(default_factory=dict)


_LIST_TABLE = re.compile(r"^table (\S+) (\S+) \{")
_LIST_CHAIN = re.compile(r"^\tchain (\S+) \{")
_LIST_SET = re.compile(r"^\t(?:set|map) (\S+) \{")
_LIST_HOOK = re.compile(r"\bhook (\w+)\b.*?(?:policy (\w+);)?\s*$")
_LIST_RULE = re.compile(r"^\t\t(.*?)\s*# handle (\d+)\s*$")


def parse_nft_listing(text: str) -> NftListing:
    """Parse ``nft [-a] list ruleset`` output: chains (hook, policy, rules with handles),
    sets that change at run time, and each table's own text."""
    listing = NftListing()
    table: tuple[str, str] | None = None
    chain: NftChain | None = None
    current_set: tuple[str, str, str] | None = None
    table_lines: list[str] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if table is None:
            m = _LIST_TABLE.match(line)
            if m:
                table = (m.group(1), m.group(2))
                listing.tables.append(table)
                table_lines = [line]
            continue
        table_lines.append(line)
        if line == "}":
            listing.table_text[table] = "\n".join(table_lines) + "\n"
            table, chain, current_set = None, None, None
            continue
        if line == "\t}":
            chain, current_set = None, None
            continue
        m = _LIST_CHAIN.match(line)
        if m:
            key = (table[0], table[1], m.group(1))
            chain = listing.chains.setdefault(key, NftChain(key))
            continue
        m = _LIST_SET.match(line)
        if m:
            current_set = (table[0], table[1], m.group(1))
            continue
        if current_set is not None:
            stripped = line.strip()
            if (stripped.startswith("flags") and "dynamic" in stripped) or \
                    stripped.startswith("timeout"):
                listing.dynamic_sets.add(current_set)
            continue
        if chain is None:
            continue
        rule = _LIST_RULE.match(line)
        if rule:
            chain.rules.append(NftRule(int(rule.group(2)), rule.group(1)))
            continue
        hook = _LIST_HOOK.search(line)
        if hook and line.strip().startswith("type "):
            chain.hook = hook.group(1)
            chain.policy = hook.group(2)
    # sets that rules add to or update from the packet path also change at run time
    for key, ch in listing.chains.items():
        for listed in ch.rules:
            for name in re.findall(r"\b(?:add|update)\s+@(\S+)", listed.text):
                listing.dynamic_sets.add((key[0], key[1], name))
    return listing


def nft_reachable(listing: NftListing, skip_tables: set[tuple[str, str]]) -> set[ChainKey]:
    """Chains that local traffic can reach: base chains on every hook but forward (and the
    netdev/bridge hooks), plus what they jump or go to."""
    local_hooks = {"prerouting", "input", "output", "postrouting", "ingress", "egress"}
    reach = {k for k, c in listing.chains.items()
             if c.hook in local_hooks and (k[0], k[1]) not in skip_tables}
    todo = list(reach)
    while todo:
        key = todo.pop()
        for rule in listing.chains[key].rules:
            for name in rule.jumps():
                target = (key[0], key[1], name)
                if target in listing.chains and target not in reach:
                    reach.add(target)
                    todo.append(target)
    return reach


def _strip_comment(text: str) -> str:
    return re.sub(r'\bcomment\s+"(?:[^"\\]|\\.)*"', "", text)


def nft_unreproducible(rule: NftRule, chain: ChainKey, listing: NftListing,
                       known_interfaces: Iterable[str]) -> list[str]:
    """Why the sandbox cannot reproduce this nft rule's outcome ([] = it can)."""
    text = _strip_comment(rule.text)
    reasons = [why for pattern, why in NFT_UNREPRODUCIBLE if pattern.search(text)]
    for name in re.findall(r"@(\w+)", text):
        if (chain[0], chain[1], name) in listing.dynamic_sets:
            reasons.append(f"set @{name}: its contents change at run time")
            break
    known = list(known_interfaces)
    for m in re.finditer(r'\b(?:meta\s+)?(iifname|oifname|iif|oif)\s+(?:!=\s*)?(\{[^}]*\}|"[^"]*"|\S+)',
                         text):
        for name in re.findall(r'"([^"]*)"|([\w.*+-]+)', m.group(2)):
            value = name[0] or name[1]
            if value and not interface_known(value, known):
                reasons.append(f"interface {value}: not in the sandbox")
    return reasons


def nft_excludes_tcp(rule: NftRule) -> bool:
    """True when the rule clearly matches only non-TCP traffic."""
    text = _strip_comment(rule.text)
    if re.search(r"\btcp\b|\bth\b", text):
        return False
    return bool(re.search(r"\b(udp|icmp|icmpv6|ip6?\s+nexthdr\s+(udp|icmp)|meta\s+l4proto\s+"
                          r"(udp|icmp|ipv6-icmp|icmpv6)|ip\s+protocol\s+(udp|icmp))\b", text))


# --------------------------------------------------------------------------------------------
# nft -a monitor trace
# --------------------------------------------------------------------------------------------
_TRACE = re.compile(r"^trace id (\S+) (\S+) (\S+) (\S+) (.*)$")
_TRACE_RULE = re.compile(r"^rule (.*?)\s*# handle (\d+) \(verdict (\w+)(?: (\S+))?\)\s*$")
_TRACE_POLICY = re.compile(r"^policy (\w+)\s*$")


@dataclass(frozen=True)
class TraceEvent:
    trace_id: str
    chain: ChainKey
    kind: str               # "packet", "rule", "policy"
    verdict: str | None = None
    handle: int | None = None
    text: str = ""


def parse_trace_line(line: str) -> TraceEvent | None:
    m = _TRACE.match(line.strip())
    if not m:
        return None
    trace_id, chain, rest = m.group(1), (m.group(2), m.group(3), m.group(4)), m.group(5)
    if rest.startswith("packet:"):
        return TraceEvent(trace_id, chain, "packet", text=rest[len("packet:"):].strip())
    rule = _TRACE_RULE.match(rest)
    if rule:
        return TraceEvent(trace_id, chain, "rule", rule.group(3), int(rule.group(2)),
                          rule.group(1))
    policy = _TRACE_POLICY.match(rest)
    if policy:
        return TraceEvent(trace_id, chain, "policy", policy.group(1))
    return None


NFT_DROP_VERDICTS = frozenset({"drop", "queue", "stolen"})
NFT_TERMINAL_VERDICTS = NFT_DROP_VERDICTS | {"accept", "return"}
