"""iptables (IPv4) and ip6tables (IPv6) through iptables-save / iptables-restore.

Whichever backend the system's `iptables` uses (nf_tables or legacy) is the main layer
("ipv4", "ipv6"): fwsafe calls the same binaries the admin does. Where that is nf_tables and
iptables-legacy tables exist too, they are captured as layers of their own ("ipv4-legacy",
"ipv6-legacy"): they still filter packets, and a command such as ufw may change them.

A change is an `iptables-save` file, applied atomically with `iptables-restore` (which replaces
the tables the file names). A revert rebuilds each table that holds touched chains from the
table as it is at revert time, with the touched chains put back as they were in the snapshot,
and loads it with one `iptables-restore`: atomic, and chains nobody touched stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fwsafe.backends.base import ApplyError, Layer, RetryLog
from fwsafe.errors import InvalidRulesError
from fwsafe.runner import find_binary, require_binary, run, run_persistently

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_SYNTAX = re.compile(r"^\s*(table\s+(ip|ip6|inet|arp|bridge|netdev)\b|flush\s+ruleset|"
                         r"define\s|include\s|#!/usr/sbin/nft)", re.M)
_ERROR_LINE = re.compile(r"(?:Error occurred at line:\s*|line\s+)(\d+)")
_MISSING_CHAIN = re.compile(r"Chain '([^']+)' does not exist")
_RULE_CHAIN = re.compile(r"^-[AI]\s+(\S+)")


@dataclass(frozen=True)
class Family:
    layer: str
    save: str
    restore: str
    nft_family: str
    label: str
    legacy: bool


FAMILIES = {
    "ipv4": Family("ipv4", "iptables-save", "iptables-restore", "ip", "IPv4", False),
    "ipv6": Family("ipv6", "ip6tables-save", "ip6tables-restore", "ip6", "IPv6", False),
    "ipv4-legacy": Family("ipv4-legacy", "iptables-legacy-save", "iptables-legacy-restore",
                          "ip", "IPv4 (legacy)", True),
    "ipv6-legacy": Family("ipv6-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore",
                          "ip6", "IPv6 (legacy)", True),
}


def parse_tables(text: str) -> dict[str, list[str]]:
    """Split iptables-save output into {table: [lines from '*table' to 'COMMIT']}.

    Comment and blank lines are dropped; chain counters are zeroed so that two captures of
    the same ruleset compare equal whatever traffic passed in between.
    """
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        if line.startswith("*"):
            current = [line]
            tables[line[1:].strip()] = current
            continue
        if current is None:
            continue
        if line.startswith(":"):
            line = _COUNTERS.sub("[0:0]", line)
        current.append(line)
        if line == "COMMIT":
            current = None
    return tables


@dataclass
class Chain:
    name: str
    policy: str                      # "ACCEPT"/"DROP" for built-in chains, "-" for user chains
    rules: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f":{self.name} {self.policy} [0:0]", *self.rules])


@dataclass
class Table:
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, lines: list[str]) -> Table:
        table = cls(name)
        for line in lines[1:]:
            if line.startswith(":"):
                parts = line[1:].split()
                table.chains[parts[0]] = Chain(parts[0], parts[1] if len(parts) > 1 else "-")
            elif line != "COMMIT":
                match = _RULE_CHAIN.match(line)
                if match and match.group(1) in table.chains:
                    table.chains[match.group(1)].rules.append(line)
        return table

    def is_empty(self) -> bool:
        """Only built-in chains, policy ACCEPT, no rules: the same as no table at all."""
        builtins = BUILTIN_CHAINS.get(self.name, ())
        return all(c.name in builtins and c.policy == "ACCEPT" and not c.rules
                   for c in self.chains.values())

    def text(self) -> str:
        builtins = BUILTIN_CHAINS.get(self.name, ())
        order = [c for c in builtins if c in self.chains] + sorted(
            c for c in self.chains if c not in builtins)
        decls = [f":{c} {self.chains[c].policy} [0:0]" for c in order]
        rules = [r for c in order for r in self.chains[c].rules]
        return "\n".join([f"*{self.name}", *decls, *rules, "COMMIT"]) + "\n"


def parse_ruleset(text: str) -> dict[str, Table]:
    return {name: Table.parse(name, lines) for name, lines in parse_tables(text).items()}


def empty_table(name: str) -> Table:
    return Table(name, {c: Chain(c, "ACCEPT") for c in BUILTIN_CHAINS.get(name, ())})


def merge_table(name: str, before: Table | None, current: Table | None,
                touched_chains: set[str]) -> Table:
    """The table as it must be after a revert: touched chains as in `before` (or gone if they
    were not there), all other chains as in `current`."""
    result = Table(name)
    builtins = BUILTIN_CHAINS.get(name, ())
    names = list(dict.fromkeys([*(before.chains if before else {}),
                                *(current.chains if current else {})]))
    for chain in names:
        if chain in touched_chains:
            if before is not None and chain in before.chains:
                result.chains[chain] = before.chains[chain]
        elif current is not None and chain in current.chains:
            result.chains[chain] = current.chains[chain]
    if any(c not in builtins for c in result.chains):  # user chains need the table's builtins
        for chain in builtins:
            result.chains.setdefault(chain, Chain(chain, "ACCEPT"))
    return result


def describe_restore_error(stderr: str, change: bytes, source: str) -> tuple[str, int | None]:
    """Turn iptables-restore's complaint into 'FILE:LINE: `text`: message'."""
    lines = change.decode(errors="replace").splitlines()
    messages = [
        ln.split(": ", 1)[1] if ln.startswith(("iptables-restore", "ip6tables-restore")) and ": " in ln
        else ln
        for ln in stderr.strip().splitlines()
        if ln and not ln.startswith("Try `") and not _ERROR_LINE.search(ln)
    ]
    found = _ERROR_LINE.search(stderr)
    line_no = int(found.group(1)) if found else None
    missing = _MISSING_CHAIN.search(stderr)
    if missing:  # nf_tables reports the COMMIT line; point at the rule that jumps there
        target = missing.group(1)
        pattern = re.compile(rf"\s-[jg]\s+{re.escape(target)}(\s|$)")
        for index, text in enumerate(lines, start=1):
            if pattern.search(text):
                line_no = index
                break
    message = "; ".join(messages) or stderr.strip() or "rejected"
    if line_no is not None and 0 < line_no <= len(lines):
        return f"{source}:{line_no}: `{lines[line_no - 1].strip()}`: {message}", line_no
    return f"{source}: {message}", line_no


_NFT_BACKEND: dict[str, bool] = {}


def uses_nf_tables(save_binary: str = "iptables-save") -> bool:
    """True when the system's iptables is iptables-nft."""
    if save_binary not in _NFT_BACKEND:
        path = find_binary(save_binary)
        if path is None:
            _NFT_BACKEND[save_binary] = False
        else:
            result = run([path, "--version"], timeout=10)
            _NFT_BACKEND[save_binary] = b"nf_tables" in result.stdout + result.stderr
    return _NFT_BACKEND[save_binary]


class IptablesLayer(Layer):
    """One address family's iptables ruleset (nft-backed or legacy)."""

    def __init__(self, name: str) -> None:
        self.family = FAMILIES[name]
        self.name = name
        self.label = self.family.label
        self.tools = (self.family.save, self.family.restore)

    # -- tools --------------------------------------------------------------------------
    def available(self) -> bool:
        if find_binary(self.family.save) is None:
            return False
        if self.family.legacy:
            # Only where the main iptables is nf_tables: otherwise legacy *is* the main layer.
            return uses_nf_tables()
        return True

    def _deletes_tables(self) -> bool:
        return not self.family.legacy and uses_nf_tables(self.family.save)

    # -- capture / validate / apply -------------------------------------------------------
    def capture(self, on_retry: RetryLog | None = None) -> bytes:
        result = run_persistently([require_binary(self.family.save)], timeout=120,
                                  on_retry=on_retry)
        if result.returncode != 0:
            raise ApplyError(
                f"{self.family.save} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def units(self, data: bytes) -> dict[str, str]:
        out = {}
        for name, table in parse_ruleset(data.decode(errors="replace")).items():
            if table.is_empty():
                continue
            for chain in table.chains.values():
                out[f"{name}/{chain.name}"] = chain.text()
        return out

    def validate(self, change: bytes, source: str) -> None:
        text = change.decode(errors="replace")
        if not text.strip():
            raise InvalidRulesError(f"{source}: the file is empty; refusing to apply nothing",
                                    path=source)
        nft = _NFT_SYNTAX.search(text)
        if nft:
            nft_line = text.count("\n", 0, nft.start()) + 1
            raise InvalidRulesError(
                f"{source}:{nft_line}: this is nftables syntax, not an iptables-save file",
                path=source, line=nft_line,
                hint="apply nftables rulesets with the nftables backend (a .nft file)",
            )
        if not parse_tables(text):
            raise InvalidRulesError(
                f"{source}: no table found (expected iptables-save format: '*filter' ... 'COMMIT')",
                path=source,
            )
        result = run([require_binary(self.family.restore), "--test"], input=change, timeout=120)
        if result.returncode != 0:
            message, line = describe_restore_error(
                result.stderr.decode(errors="replace"), change, source)
            raise InvalidRulesError(message, path=source, line=line)

    def apply(self, change: bytes, source: str) -> None:
        result = run([require_binary(self.family.restore), "-w", "10"], input=change, timeout=600)
        if result.returncode != 0:
            message, line = describe_restore_error(
                result.stderr.decode(errors="replace"), change, source)
            raise ApplyError(message, line=line)

    # -- revert ---------------------------------------------------------------------------
    def restore_units(self, before: bytes, units: Sequence[str], *,
                      on_retry: RetryLog | None = None) -> None:
        by_table: dict[str, set[str]] = {}
        for unit in units:
            table, _, chain = unit.partition("/")
            by_table.setdefault(table, set()).add(chain)
        if not by_table:
            return
        old = parse_ruleset(before.decode(errors="replace"))
        now = parse_ruleset(self.capture(on_retry).decode(errors="replace"))
        payload: list[str] = []
        drop: list[str] = []
        for name, chains in by_table.items():
            merged = merge_table(name, old.get(name), now.get(name), chains)
            if merged.is_empty() and self._deletes_tables() and name not in old:
                if name in now:
                    drop.append(name)
                continue
            if not merged.chains:
                merged = empty_table(name)
            payload.append(merged.text())
        if payload:
            self._restore("".join(payload).encode(), on_retry)
        for name in drop:
            # The table did not exist before the change: remove it again (nf_tables only).
            result = run_persistently(
                [require_binary("nft"), "delete", "table", self.family.nft_family, name],
                timeout=60, on_retry=on_retry)
            if result.returncode != 0:
                raise ApplyError(
                    f"cannot remove table {self.family.nft_family} {name} that the change "
                    f"created: {result.stderr.decode(errors='replace').strip()}")

    def _restore(self, payload: bytes, on_retry: RetryLog | None) -> None:
        result = run_persistently([require_binary(self.family.restore), "-w", "10"],
                                  input=payload, timeout=600, on_retry=on_retry)
        if result.returncode != 0:
            raise ApplyError(f"{self.family.restore} refused the snapshot: "
                             f"{result.stderr.decode(errors='replace').strip()}")
