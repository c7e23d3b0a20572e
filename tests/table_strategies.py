"""Hypothesis strategies for whole iptables filter tables: chains (INPUT and user chains
U1..U3, fail2ban-like: bans then RETURN) created, edited and deleted by the change and then by
others, with counters and odd spacing in the text that the parser must normalise."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

Tables = dict[str, list[str]]          # chain -> rules (without "-A CHAIN ")
USER = ("U1", "U2", "U3")


@dataclass
class TableStory:
    before: Tables
    after: Tables
    live: Tables


def _rule(draw: st.DrawFn, chain: str, chains: Tables) -> str:
    kinds = ["ban", "accept"] + (["jump"] if chain == "INPUT" and set(chains) & set(USER)
                                 else []) + (["return"] if chain != "INPUT" else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "ban":
        return f"-s 10.0.{draw(st.integers(0, 2))}.{draw(st.integers(1, 4))}/32 -j DROP"
    if kind == "accept":
        return f"-p tcp -m tcp --dport {draw(st.sampled_from([22, 80, 443]))} -j ACCEPT"
    if kind == "return":
        return "-j RETURN"
    return f"-j {draw(st.sampled_from(sorted(set(chains) & set(USER))))}"


def _edit(draw: st.DrawFn, tables: Tables) -> Tables:
    out = {c: list(r) for c, r in tables.items()}
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["add", "add", "delete", "reappend", "create", "drop"]))
        chain = draw(st.sampled_from(sorted(out)))
        rules = out[chain]
        if kind == "add":
            rules.insert(draw(st.integers(0, len(rules))), _rule(draw, chain, out))
        elif kind in ("delete", "reappend") and rules:
            rule = rules.pop(draw(st.integers(0, len(rules) - 1)))
            if kind == "reappend":
                rules.append(rule)
        elif kind == "create":
            free = [u for u in USER if u not in out]
            if free:
                name = draw(st.sampled_from(free))
                out[name] = ["-j RETURN"]
                out["INPUT"].insert(0, f"-j {name}")
        elif kind == "drop" and chain != "INPUT":
            del out[chain]                       # its owner removes the jumps, then the chain
            for name in out:
                out[name] = [r for r in out[name] if r != f"-j {chain}"]
    return out


@st.composite
def table_stories(draw: st.DrawFn) -> TableStory:
    before: Tables = {"INPUT": []}
    before = _edit(draw, before)
    after = _edit(draw, before)
    live = _edit(draw, after)
    return TableStory(before, after, live)


def table_text(tables: Tables, counters: bool = False) -> str:
    """iptables-save text of a filter table (counters and doubled spaces as some tools print:
    the parser normalises them)."""
    lines = ["*filter", ":INPUT ACCEPT [12:345]" if counters else ":INPUT ACCEPT [0:0]",
             ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":{c} - [0:0]" for c in sorted(tables) if c != "INPUT"]
    lines += [f"-A {c} {r}" for c in sorted(tables) for r in tables[c]]
    return "\n".join([*lines, "COMMIT"]) + "\n"
