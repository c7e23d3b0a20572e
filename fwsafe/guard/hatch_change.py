"""The escape hatch loaded with a rules-file change, in the same transaction: the
`iptables-restore` payload or the `nft -f` script made to carry it (`with_change`, used by
fwsafe.guard.applying).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from fwsafe.backends import IPTABLES_SAVE, iptsave, layer_has
from fwsafe.guard.hatch_chains import nft_declared_base_chains, parse_nft
from fwsafe.guard.hatch_spec import (
    IN_HOOKS,
    IPTABLES_CHAINS,
    NFT_FAMILIES,
    NFT_LAYER,
    NFT_TYPES,
    OUT_HOOKS,
    Spec,
    iptables_rules,
    is_ipv6_layer,
    nft_rules,
)

_RULE = re.compile(r"^-[AI]\s+(\S+)")


def _iptables_block_chains(table: str, lines: Iterable[str]) -> list[str]:
    """The chains of one `*table` block (its lines) that can drop: a policy other than
    ACCEPT, or rules."""
    relevant = IPTABLES_CHAINS.get(table, ())
    dropping: list[str] = []
    for line in lines:
        if line.startswith(":"):
            declared = iptsave.declaration(line)
            if declared and declared[0] in relevant and declared[1] not in (None, "ACCEPT"):
                dropping.append(declared[0])
        else:   # a file saved with `iptables-save -c`: iptables-restore skips the counters
            match = _RULE.match(iptsave.uncounted(line))
            if match and match.group(1) in relevant:
                dropping.append(match.group(1))
    return [c for c in relevant if c in dropping]


def with_iptables_change(payload: bytes, spec: Spec, v6: bool) -> bytes:
    """An iptables-restore payload that also loads the hatch at the top of each chain of its
    tables that can drop (`-I CHAIN 1` right before each COMMIT: atomic with the change)."""
    if not spec.sources(v6):
        return payload
    lines = payload.decode(errors="replace").splitlines()
    before: dict[int, list[str]] = {}   # a COMMIT line's index -> the hatch loaded before it
    for block in iptsave.blocks(lines):
        if block.closed:
            chains = _iptables_block_chains(block.table, (line for _, line in block.body(lines)))
            before[block.end] = [f"-I {chain} 1 {rule}" for chain in chains
                                 for rule in reversed(iptables_rules(spec, v6, chain))]
    out: list[str] = []
    for index, line in enumerate(lines):
        out += before.get(index, ())
        out.append(line)
    return ("\n".join(out) + "\n").encode()


def _nft_live_base_chains(listing: str) -> list[tuple[str, str, str, str, str]]:
    return [(c.family, c.table, c.name, c.type, c.hook) for c in parse_nft(listing)
            if c.hook and not c.owned]   # an owned table refuses the whole script


def with_nft_change(script: bytes, spec: Spec, before: bytes | None) -> bytes:
    """An `nft -f` script that also loads the hatch into the base chains that exist once it has
    run: those it declares, and (unless it flushes the ruleset or deletes their table) those
    of the tables before it. A wrong guess makes nft refuse the whole script: the caller then
    loads the change alone and puts the hatch in afterwards (`sync`)."""
    text = script.decode(errors="replace")
    chains = nft_declared_base_chains(text)
    if not re.search(r"^\s*flush\s+ruleset\b", text, re.M) and before:
        gone = {f"{m.group(2)} {m.group(3)}" for m in re.finditer(
            r"^\s*(delete|destroy)\s+table\s+(\S+)\s+(\S+)", text, re.M)}
        chains += [c for c in _nft_live_base_chains(before.decode(errors="replace"))
                   if f"{c[0]} {c[1]}" not in gone]
    extra: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for family, table, chain, kind, hook in chains:
        if (family, table, chain) in seen or family not in NFT_FAMILIES \
                or kind not in NFT_TYPES or hook not in (*IN_HOOKS, *OUT_HOOKS):
            continue
        seen.add((family, table, chain))
        extra += [f"insert rule {family} {table} {chain} {rule}"
                  for rule in reversed(nft_rules(spec, family, hook))]
    if not extra:
        return script
    return (text.rstrip("\n") + "\n" + "\n".join(extra) + "\n").encode()


def with_change(layer: str, content: bytes, spec: Spec,
                before: Mapping[str, bytes]) -> bytes:
    """`content` (a layer's complete change, as loaded) with the hatch in the same
    transaction; unchanged for layers without one."""
    if layer_has(layer, IPTABLES_SAVE):
        return with_iptables_change(content, spec, is_ipv6_layer(layer))
    if layer == NFT_LAYER:
        return with_nft_change(content, spec, before.get(NFT_LAYER))
    return content


