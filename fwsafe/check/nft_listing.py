"""nft's answers read: ``nft -a list ruleset`` (chains, hooks, policies, rules with handles,
the chains local traffic reaches) and ``nft -a monitor trace`` events. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fwsafe.ondisk.nft_text import CHAIN_LINE, TABLE_LINE

# --------------------------------------------------------------------------------------------
# nft -a list ruleset
# --------------------------------------------------------------------------------------------
ChainKey = tuple[str, str, str]  # (family, table, chain)


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
            m = TABLE_LINE.match(line)
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
        m = CHAIN_LINE.match(line)
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
