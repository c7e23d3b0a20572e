"""Which iptables rule counted packets: two ``iptables-save -c`` outputs (read by the one model,
fwsafe.backends.iptsave, counters kept) diffed, the dropping rules and policies that counted,
the rules the traffic met, the chains local traffic reaches. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from fwsafe.backends.iptsave import BUILTIN_CHAIN_NAMES, Tables

# --------------------------------------------------------------------------------------------
# iptables-save output (with -c counters)
# --------------------------------------------------------------------------------------------

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
