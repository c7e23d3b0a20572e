"""iptables (IPv4) and ip6tables (IPv6) through iptables-save / iptables-restore.

Whichever backend the system's `iptables` uses (nf_tables or legacy) is used: fwsafe calls the
same binaries the admin does. A change is an `iptables-save` file; it touches the tables it
names (`*filter`, `*nat`, ...): `iptables-restore` replaces exactly those, atomically, and a
revert restores exactly those from the snapshot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fwsafe.backends.base import ApplyError, Layer, RetryLog
from fwsafe.errors import InvalidRulesError
from fwsafe.runner import require_binary, run, run_persistently

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


@dataclass(frozen=True)
class Family:
    layer: str
    save: str
    restore: str
    nft_family: str
    label: str


FAMILIES = {
    "ipv4": Family("ipv4", "iptables-save", "iptables-restore", "ip", "IPv4"),
    "ipv6": Family("ipv6", "ip6tables-save", "ip6tables-restore", "ip6", "IPv6"),
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


def tables_text(tables: dict[str, list[str]], names: list[str] | None = None) -> str:
    chosen = names if names is not None else list(tables)
    return "".join("\n".join(tables[n]) + "\n" for n in chosen if n in tables)


def empty_table(name: str) -> list[str]:
    """A table with only its built-in chains, policy ACCEPT: 'no rules' for legacy iptables."""
    chains = BUILTIN_CHAINS.get(name, ())
    return [f"*{name}", *(f":{c} ACCEPT [0:0]" for c in chains), "COMMIT"]


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


class IptablesLayer(Layer):
    """One address family's iptables ruleset."""

    def __init__(self, name: str) -> None:
        self.family = FAMILIES[name]
        self.name = name
        self._is_nft: bool | None = None

    # -- tools --------------------------------------------------------------------------
    def check_tools(self) -> None:
        require_binary(self.family.save)
        require_binary(self.family.restore)

    def uses_nf_tables(self) -> bool:
        if self._is_nft is None:
            result = run([require_binary(self.family.save), "--version"], timeout=10)
            self._is_nft = b"nf_tables" in result.stdout + result.stderr
        return self._is_nft

    # -- capture / validate / apply -------------------------------------------------------
    def capture(self) -> bytes:
        result = run([require_binary(self.family.save)], timeout=60)
        if result.returncode != 0:
            raise ApplyError(
                f"{self.family.save} failed: {result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout

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

    def touched_tables(self, change: bytes) -> list[str]:
        return list(parse_tables(change.decode(errors="replace")))

    def apply(self, change: bytes, source: str) -> None:
        result = run([require_binary(self.family.restore), "-w", "10"], input=change, timeout=300)
        if result.returncode != 0:
            message, line = describe_restore_error(
                result.stderr.decode(errors="replace"), change, source)
            raise ApplyError(message, line=line)

    # -- revert ---------------------------------------------------------------------------
    def restore(self, before: bytes, change: bytes, *, on_retry: RetryLog | None = None) -> None:
        old = parse_tables(before.decode(errors="replace"))
        touched = self.touched_tables(change)
        payload: list[str] = []
        absent: list[str] = []
        for name in touched:
            if name in old:
                payload.extend(old[name])
            elif self.uses_nf_tables():
                absent.append(name)
            else:
                payload.extend(empty_table(name))
        if payload:
            result = run_persistently(
                [require_binary(self.family.restore), "-w", "10"],
                input=("\n".join(payload) + "\n").encode(), timeout=300, on_retry=on_retry,
            )
            if result.returncode != 0:
                raise ApplyError(
                    f"{self.family.restore} refused the snapshot: "
                    f"{result.stderr.decode(errors='replace').strip()}")
        for name in absent:
            # The table did not exist before the change: remove it again (nf_tables only).
            current = parse_tables(self.capture().decode(errors="replace"))
            if name not in current:
                continue
            result = run_persistently(
                [require_binary("nft"), "delete", "table", self.family.nft_family, name],
                timeout=60, on_retry=on_retry,
            )
            if result.returncode != 0:
                raise ApplyError(
                    f"cannot remove table {self.family.nft_family} {name} that the change "
                    f"created: {result.stderr.decode(errors='replace').strip()}")

    def differences(self, before: bytes, change: bytes) -> list[str]:
        old = parse_tables(before.decode(errors="replace"))
        now = parse_tables(self.capture().decode(errors="replace"))
        problems = []
        for name in self.touched_tables(change):
            want = old.get(name)
            have = now.get(name)
            if want is None and have is not None and have != empty_table(name):
                problems.append(f"{self.family.label} table {name} still exists")
            elif want is not None and have != want:
                problems.append(f"{self.family.label} table {name} differs from the snapshot")
        return problems
