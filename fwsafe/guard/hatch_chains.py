"""The chains the escape hatch goes in, as the tools list them: iptables-save output and
`nft -a list` listings parsed into `Chain`s (their rules, the hatch's among them), and the base
chains an nft script declares. Pure: nothing is read or run here (fwsafe.guard.hatch_sync reads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fwsafe.backends import iptsave
from fwsafe.guard.hatch_spec import IPTABLES_CHAINS
from fwsafe.ondisk.hatch_rules import MARK
from fwsafe.ondisk.nft_text import CHAIN_LINE, TABLE_LINE

_NFT_BASE_CHAIN = re.compile(r"type\s+(\w+)\s+hook\s+(\w+)")


def nft_declared_base_chains(text: str) -> list[tuple[str, str, str, str, str]]:
    """(family, table, chain, type, hook) of the base chains an nft script declares, in
    `table X Y { chain Z { type ... hook ...` blocks and `add chain X Y Z { type ... }` lines."""
    found: list[tuple[str, str, str, str, str]] = []
    family = table = chain = ""
    depth = 0
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        single = re.match(r"^(?:add|create)\s+chain\s+(\S+)\s+(\S+)\s+([^\s{]+)\s*\{(.*)\}", line)
        if single:
            hooked = _NFT_BASE_CHAIN.search(single.group(4))
            if hooked:
                found.append((single.group(1), single.group(2), single.group(3),
                              hooked.group(1), hooked.group(2)))
            continue
        opened = re.match(r"^(?:add\s+|create\s+)?table\s+(\S+)\s+([^\s{]+)\s*\{", line)
        if opened and depth == 0:
            family, table = opened.group(1), opened.group(2)
        elif depth == 1:
            named = re.match(r"^chain\s+([^\s{]+)\s*\{", line)
            if named:
                chain = named.group(1)
        elif depth == 2 and chain:
            hooked = _NFT_BASE_CHAIN.search(line)
            if hooked:
                found.append((family, table, chain, hooked.group(1), hooked.group(2)))
        depth += line.count("{") - line.count("}")
        if depth <= 1:
            chain = ""
        depth = max(depth, 0)
    return found


@dataclass
class Chain:
    """A chain the hatch may go in, as listed: its rules, the hatch's among them."""

    family: str        # iptables: the table's layer; nft: the family
    table: str
    name: str
    hook: str = ""     # nft only ("" for a regular chain); iptables: from the chain's name
    type: str = ""
    policy: str = "accept"
    rules: list[str] = field(default_factory=list)        # iptables: rule specs; nft: rule text
    handles: list[int | None] = field(default_factory=list)   # nft: each rule's handle
    owned: bool = False   # nft: its table has `flags owner`: only the program that made it may
    #                       write there (firewalld 2.x's table, NftablesTableOwner=yes)

    def hatch_positions(self) -> list[int]:
        return [i for i, rule in enumerate(self.rules) if f"{MARK}:" in rule]

    def can_drop(self) -> bool:
        others = len(self.rules) - len(self.hatch_positions())
        return others > 0 or self.policy.lower() != "accept"


def parse_iptables(text: str, layer: str) -> list[Chain]:
    """The chains the hatch goes in (by table), from iptables-save output."""
    chains: dict[tuple[str, str], Chain] = {}
    lines = text.splitlines()
    for block in iptsave.blocks(lines):
        table, hooked = block.table, IPTABLES_CHAINS.get(block.table, ())
        for _, line in block.body(lines):
            declared = iptsave.declaration(line) if line.startswith(":") else None
            if declared is not None and declared[0] in hooked:
                name, policy, _ = declared
                chains[(table, name)] = Chain(layer, table, name, hook=name.lower(),
                                              policy=policy or "-")
            elif line.startswith("-A "):
                name, _, spec = line[3:].partition(" ")
                found = chains.get((table, name))
                if found is not None:
                    found.rules.append(spec)
                    found.handles.append(None)
    return list(chains.values())


_NFT_HANDLE = re.compile(r" # handle (\d+)$")
_NFT_POLICY = re.compile(r"policy (\w+);")
_NFT_TABLE_FLAGS = re.compile(r"^\tflags (\S+)")
OWNED = ("owned by the program that made it (`flags owner`: firewalld 2.x's NftablesTableOwner="
         "yes): nothing else may write there, and its drops stand")


def parse_nft(listing: str) -> list[Chain]:
    """Every chain of `nft -a list ruleset` (or `nft list`) output, with rules and handles."""
    chains: list[Chain] = []
    family = table = ""
    owned = False
    current: Chain | None = None
    for raw in listing.splitlines():
        line = raw.rstrip()
        opened = TABLE_LINE.match(line)
        if opened:
            family, table, current, owned = opened.group(1), opened.group(2), None, False
            continue
        flags = _NFT_TABLE_FLAGS.match(line)
        if flags and current is None:
            owned = "owner" in flags.group(1).split(",")
            continue
        chain = CHAIN_LINE.match(line)
        if chain:
            current = Chain(family, table, chain.group(1), owned=owned)
            chains.append(current)
            continue
        if current is None:
            continue
        if line == "\t}":
            current = None
            continue
        body = line.strip()
        hooked = _NFT_BASE_CHAIN.search(body)
        if hooked and body.startswith("type "):
            current.type, current.hook = hooked.group(1), hooked.group(2)
            policy = _NFT_POLICY.search(body)
            current.policy = policy.group(1) if policy else "accept"
            continue
        if not body or body.startswith("#"):
            continue
        handle = _NFT_HANDLE.search(body)
        current.rules.append(_NFT_HANDLE.sub("", body))
        current.handles.append(int(handle.group(1)) if handle else None)
    return chains


