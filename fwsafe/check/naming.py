"""Naming a rule the kernel reported (an iptables counter, an ``nft monitor trace`` line) as
the file and line that made it ("FILE:LINE: `rule`"), or as the part of the current firewall
it belongs to when the candidate did not replace that table."""

from __future__ import annotations

from dataclasses import dataclass

from fwsafe.check.host import IptTool
from fwsafe.check.nft_lines import (
    EchoedRule,
    NftFileInfo,
    map_nft_handles,
    parse_nft_echo,
    scan_nft_file,
)
from fwsafe.check.nft_listing import ChainKey, NftListing

__all__ = ["NftCandidate", "RuleNamer"]


@dataclass
class NftCandidate:
    """The candidate's nftables file as loaded in the sandbox: its lines, its rules and chain
    policies, the handle the kernel gave each rule, and the tables it made."""

    source: str
    lines: list[str]
    info: NftFileInfo
    handles: dict[tuple[ChainKey, int], int]
    tables: set[tuple[str, str]]

    @classmethod
    def loaded(cls, content: bytes, source: str, echo: str) -> NftCandidate:
        """From the file and what ``nft --echo --handle -f`` printed when loading it."""
        text = content.decode(errors="replace")
        info = scan_nft_file(text)
        tables = {(r.chain[0], r.chain[1]) for r in info.rules}
        tables |= {(c[0], c[1]) for c in info.policies}
        return cls(source, text.splitlines(), info, map_nft_handles(info, parse_nft_echo(echo)),
                   tables)

    @classmethod
    def listed(cls, content: bytes, source: str, listing: NftListing) -> NftCandidate:
        """From the file and the sandbox's listing (with handles) of the tables it replaced
        whole (it deleted each first): their rules are the file's, as `nft --echo` would
        print them; at 100k set elements the echo overflows netlink's buffer."""
        echoed = [EchoedRule(key, rule.handle, rule.text)
                  for key, chain in listing.chains.items() for rule in chain.rules]
        text = content.decode(errors="replace")
        info = scan_nft_file(text)
        tables = {(r.chain[0], r.chain[1]) for r in info.rules}
        tables |= {(c[0], c[1]) for c in info.policies}
        return cls(source, text.splitlines(), info, map_nft_handles(info, echoed), tables)

    def line(self, number: int) -> str:
        return self.lines[number - 1].strip() if 0 < number <= len(self.lines) else ""


class RuleNamer:
    """Names rules of the sandbox's firewall: iptables ones through each tool's file map, nft
    ones through the candidate's handles and the sandbox's listing (both set once loaded)."""

    def __init__(self) -> None:
        self.listing = NftListing()
        self.nft: NftCandidate | None = None

    @staticmethod
    def ipt_where(tool: IptTool, table: str, chain: str, index: int | None) -> str:
        """Rule ``index`` (None: the policy) of ``chain`` in ``table``, loaded by ``tool``."""
        saved_table = tool.snapshot.get(table)
        saved = saved_table.chains.get(chain) if saved_table is not None else None
        if tool.fmap is not None and table in tool.fmap.tables:
            fmap = tool.fmap
            if index is None:
                line = fmap.policy_line(table, chain)
                if line:
                    return f"{fmap.source}:{line}: `{fmap.text(line)}` (chain policy)"
                return f"{fmap.source}: chain {chain} of table {table}: policy DROP"
            count = len(saved.rules) if saved else None
            line = fmap.rule_line(table, chain, index, count)
            if line:
                return f"{fmap.source}:{line}: `{fmap.text(line)}`"
            text = saved.rules[index - 1] if saved and index <= len(saved.rules) else "?"
            return f"{fmap.source} (table {table}, rule {index} of chain {chain}): `{text}`"
        origin = f"current {tool.label} rules (table {table}, not replaced by the candidate)"
        if index is None:
            return f"{origin}: `:{chain} DROP` (chain policy)"
        text = saved.rules[index - 1] if saved and index <= len(saved.rules) else "?"
        return f"{origin}: `{text}`"

    def nft_where(self, chain: ChainKey, handle: int | None) -> str:
        """The rule with ``handle`` (None: the policy) of nft ``chain``."""
        fam, table, name = chain
        listed = self.listing.chains.get(chain)
        nft = self.nft if self.nft is not None and (fam, table) in self.nft.tables else None
        if handle is None:
            line = nft.info.policies.get(chain) if nft is not None else None
            if nft is not None and line:
                return f"{nft.source}:{line}: `{nft.line(line)}` (policy of chain {name})"
            origin = nft.source if nft is not None else "current nft rules"
            return f"{origin} (table {fam} {table}): policy {listed.policy if listed else 'drop'} " \
                   f"of chain {name}"
        line = self.nft.handles.get((chain, handle)) if self.nft is not None else None
        if self.nft is not None and line:
            return f"{self.nft.source}:{line}: `{self.nft.line(line)}`"
        text = next((r.text for r in listed.rules if r.handle == handle), "?") if listed else "?"
        if nft is not None:
            return f"{nft.source} (table {fam} {table}, chain {name}): `{text}`"
        return f"current nft rules (table {fam} {table}, chain {name}): `{text}`"
