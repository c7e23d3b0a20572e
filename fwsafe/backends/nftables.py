"""Native nftables tables, through `nft`.

The layer holds every nftables table except those that iptables-nft owns (ip/ip6 tables named
filter, nat, mangle, raw, security): those are captured in iptables format by the iptables
layers, because `nft list ruleset` output of xt matches does not load back.

A change is an nft file: validated with `nft -c -f`, applied with `nft -f` (one atomic
transaction). A revert puts each touched table back as it was, in one `nft -f` transaction:
``add table X; delete table X; <X as in the snapshot>``; a table the change created is only
deleted. Tables nobody touched are left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from fwsafe.backends.base import ApplyError, Layer, RetryLog
from fwsafe.backends.iptables import BUILTIN_CHAINS, uses_nf_tables
from fwsafe.errors import InvalidRulesError
from fwsafe.runner import find_binary, require_binary, run, run_persistently

_NFT_ERROR = re.compile(r"^(?:/dev/stdin|[^:\s]+):(\d+):(\d+)(?:-\d+)?: Error: (.*)$", re.M)
_IPTABLES_SYNTAX = re.compile(r"^\s*(\*(filter|nat|mangle|raw|security)\s*$|:[A-Z]+ (ACCEPT|DROP) |"
                              r"-A [A-Z])", re.M)
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{")
IPTABLES_FAMILIES = ("ip", "ip6")


def looks_like_nft(content: bytes) -> bool:
    """An nft ruleset rather than an iptables-save file (recognised by content)."""
    text = content.decode(errors="replace")
    return bool(re.search(r"^\s*(table\s+\S+\s+\S+|flush\s+ruleset|add\s+(table|rule|chain)\s)",
                          text, re.M)) and not text.lstrip().startswith("*")


def split_tables(text: str) -> dict[str, str]:
    """`nft list` output -> {"family name": block text}."""
    blocks: dict[str, str] = {}
    current: list[str] | None = None
    key = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        match = _TABLE_LINE.match(line)
        if match:
            if current is not None:  # an unterminated block: keep what it had
                blocks[key] = "\n".join(current)
            key = f"{match.group(1)} {match.group(2)}"
            current = [line]
            continue
        if current is None:
            continue
        if line.strip():
            current.append(_COUNTER.sub("counter packets 0 bytes 0", line)
                           if "counter packets" in line else line)
        if line == "}":
            blocks[key] = "\n".join(current)
            current = None
    if current is not None:
        blocks[key] = "\n".join(current)
    return blocks


def describe_nft_error(stderr: str, change: bytes, source: str) -> tuple[str, int | None]:
    match = _NFT_ERROR.search(stderr)
    if not match:
        return f"{source}: {stderr.strip() or 'rejected by nft'}", None
    line_no = int(match.group(1))
    lines = change.decode(errors="replace").splitlines()
    text = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""
    return f"{source}:{line_no}: `{text}`: {match.group(3)}", line_no


class NftLayer(Layer):
    name = "nft"
    label = "nftables"
    tools = ("nft",)

    def available(self) -> bool:
        return find_binary("nft") is not None

    def _is_iptables_table(self, family: str, name: str) -> bool:
        return family in IPTABLES_FAMILIES and name in BUILTIN_CHAINS and uses_nf_tables()

    def native_tables(self) -> list[tuple[str, str]]:
        result = run_persistently([require_binary("nft"), "-j", "list", "tables"], timeout=60)
        if result.returncode != 0:
            raise ApplyError(f"nft list tables failed: {result.stderr.decode(errors='replace')}")
        tables = []
        for item in json.loads(result.stdout or b"{}").get("nftables", []):
            table = item.get("table")
            if table and not self._is_iptables_table(table["family"], table["name"]):
                tables.append((str(table["family"]), str(table["name"])))
        return tables

    def capture(self) -> bytes:
        parts = []
        for family, name in self.native_tables():
            result = run_persistently([require_binary("nft"), "-s", "list", "table", family, name],
                                      timeout=120)
            if result.returncode != 0:
                raise ApplyError(f"nft list table {family} {name} failed: "
                                 f"{result.stderr.decode(errors='replace').strip()}")
            parts.append(result.stdout.decode(errors="replace").rstrip("\n") + "\n")
        return "".join(parts).encode()

    def units(self, data: bytes) -> dict[str, str]:
        return split_tables(data.decode(errors="replace"))

    def validate(self, change: bytes, source: str) -> None:
        text = change.decode(errors="replace")
        if not text.strip():
            raise InvalidRulesError(f"{source}: the file is empty; refusing to apply nothing",
                                    path=source)
        ipt = _IPTABLES_SYNTAX.search(text)
        if ipt and not looks_like_nft(change):
            line = text.count("\n", 0, ipt.start()) + 1
            raise InvalidRulesError(f"{source}:{line}: this is iptables-save syntax, not nft",
                                    path=source, line=line)
        result = run([require_binary("nft"), "-c", "-f", "-"], input=change, timeout=120)
        if result.returncode != 0:
            message, line_no = describe_nft_error(result.stderr.decode(errors="replace"), change,
                                                  source)
            raise InvalidRulesError(message, path=source, line=line_no)

    def apply(self, change: bytes, source: str) -> None:
        result = run([require_binary("nft"), "-f", "-"], input=change, timeout=600)
        if result.returncode != 0:
            message, line_no = describe_nft_error(result.stderr.decode(errors="replace"), change,
                                                  source)
            raise ApplyError(message, line=line_no)

    def restore_units(self, before: bytes, units: Sequence[str], *,
                      on_retry: RetryLog | None = None) -> None:
        if not units:
            return
        old = self.units(before)
        script = []
        for unit in units:
            family, name = unit.split(" ", 1)
            script.append(f"add table {family} {name}\ndelete table {family} {name}\n")
            if unit in old:
                script.append(old[unit] + "\n")
        result = run_persistently([require_binary("nft"), "-f", "-"],
                                  input="".join(script).encode(), timeout=600, on_retry=on_retry)
        if result.returncode != 0:
            raise ApplyError(f"nft refused the snapshot: "
                             f"{result.stderr.decode(errors='replace').strip()}")
