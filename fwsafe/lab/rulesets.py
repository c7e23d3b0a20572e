"""Firewall state as text that compares equal across reloads: what the lab's ``ruleset()``
returns, and what the test harnesses compare rulesets with."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence

__all__ = ["normalize_nft", "normalize_save", "ruleset_text"]

_NFT_COUNTER_RE = re.compile(r"counter packets \d+ bytes \d+")


def normalize_save(text: str) -> str:
    """iptables-save output without comments and blank lines, chain counters zeroed."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(":"):
            fields = line.split()
            if len(fields) >= 2:
                line = f"{fields[0]} {fields[1]} [0:0]"
        out.append(line)
    return "\n".join(out) + "\n" if out else ""


def normalize_nft(text: str) -> str:
    """``nft list ruleset`` with counters zeroed and the order of tables, and of the objects in
    each table (one tab deep: chains, sets, maps, ...), sorted: both are listed in creation
    order, which carries no meaning (iptables-restore on nf_tables re-creates its tables)."""
    tables: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        line = _NFT_COUNTER_RE.sub("counter packets 0 bytes 0", line)
        if not line.startswith(("\t", " ", "}")) or not tables:
            tables.append([])
        tables[-1].append(line)
    blocks = []
    for table in tables:
        head, body, tail = table[:1], table[1:-1], table[-1:] if len(table) > 1 else []
        objects: list[list[str]] = []
        for line in body:
            member = line.startswith("\t") and not line.startswith("\t\t") and line.strip() != "}"
            if member or not objects:
                objects.append([])
            objects[-1].append(line)
        blocks.append("".join(f"{ln}\n" for ln in head + [x for o in sorted(objects) for x in o]
                              + tail))
    return "".join(sorted(blocks))


def ruleset_text(run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]]) -> str:
    """The normalized iptables, ip6tables and (where nft is installed) nftables state of the
    namespace that ``run(argv)`` runs commands in."""
    text = "== ipv4 ==\n" + normalize_save(run(["iptables-save"]).stdout)
    text += "== ipv6 ==\n" + normalize_save(run(["ip6tables-save"]).stdout)
    if shutil.which("nft") is not None:
        text += "== nft ==\n" + normalize_nft(run(["nft", "list", "ruleset"]).stdout)
    return text
