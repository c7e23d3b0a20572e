"""iptables (IPv4) and ip6tables (IPv6) through iptables-save / iptables-restore.

Whichever backend the system's `iptables` uses (nf_tables or legacy) is the main layer
("ipv4", "ipv6"): fwsafe calls the same binaries the admin does. Where that is nf_tables and
iptables-legacy tables exist too, they are captured as layers of their own ("ipv4-legacy",
"ipv6-legacy"): they still filter packets, and a command such as ufw may change them.

A change is an `iptables-save` file, applied atomically with `iptables-restore` (which replaces
the tables the file names). A revert computes the complete target of each table the change
touched, as the three-way merge of the snapshot, the capture right after the change and the
table at revert time (fwsafe.core.merge), and loads it with one `iptables-restore`: atomic, and only
the change's own rules are undone. With `--partial` a file replaces only the chains it names
(`compose_partial`): everything else in its tables stays as it is live.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from fwsafe.backends import nflist
from fwsafe.backends.base import (
    IPTABLES_SAVE,
    MERGE,
    NETFILTER,
    PREDICTED,
    ROLLBACK,
    RULES_FILE,
    SNAPSHOT_UNITS,
    ApplyError,
    Layer,
    RetryLog,
    line_starting,
)
from fwsafe.backends.families import FAMILIES as FAMILIES  # the iptables layers' facts
from fwsafe.backends.iptsave import (
    BUILTIN_CHAINS,
    Chain,
    Table,
    Tables,
    chain_names,
    empty_table,
    has_tables,
    parse_ruleset,
    render,
)
from fwsafe.core.merge import delta_left, merge_sequences, merge_value
from fwsafe.errors import InvalidRulesError
from fwsafe.ondisk import hatch_rules
from fwsafe.runner import failure_said, find_binary, require_binary, run, run_persistently

_NFT_SYNTAX = re.compile(r"\n[^\S\n]*(?:table\s+(?:ip|ip6|inet|arp|bridge|netdev)\b|"
                         r"flush\s+ruleset|define\s|include\s|#!/usr/sbin/nft)")   # line_starting
_ERROR_LINE = re.compile(r"(?:Error occurred at line:\s*|line\s+)(\d+)")
_MISSING_CHAIN = re.compile(r"Chain '([^']+)' does not exist")
_JUMP = re.compile(r"\s-[jg]\s+(\S+)")


def restore_touched_chains(name: str, before: Table | None, current: Table | None,
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


def three_way_undo(name: str, before: Table | None, after: Table | None,
                 live: Table | None) -> Table:
    """The table with the change `before -> after` undone on `live` (fwsafe.core.merge): chains the
    change created go, chains it deleted come back, rules it added go and rules it removed come
    back in their places; what others did meanwhile stays. Missing tables count as empty."""
    b, a, now = (t or empty_table(name) for t in (before, after, live))
    names = list(dict.fromkeys([*now.chains, *b.chains, *a.chains]))
    result = Table(name)
    for chain in names:
        exists = merge_value(*("y" if chain in t.chains else None for t in (b, a, now)))
        rules = merge_sequences(*(t.chains[chain].rules if chain in t.chains else []
                                  for t in (b, a, now)))
        if not exists:   # gone (its owner deleted it, or the change created it): no orphan
            continue         # (a kept rule that jumps there pulls it in: complete_references)
        policy = merge_value(*(t.chains[chain].policy if chain in t.chains else None
                               for t in (b, a, now)))
        result.chains[chain] = Chain(chain, policy or ("ACCEPT" if chain in BUILTIN_CHAINS.get(
            name, ()) else "-"), rules)
    complete_references(result, [now, b, a])
    return result


def delta_items(tables: Mapping[str, Table], names: Sequence[str]) -> dict[str, list[str]]:
    """The items the revert's proof counts (fwsafe.core.merge.delta_left): per table its chains
    with their policies, per chain its rules; an empty table counts as none."""
    items: dict[str, list[str]] = {}
    for name in names:
        table = tables.get(name)
        if table is None or table.is_empty():
            continue
        items[name] = [f":{c.name} {c.policy}" for c in table.chains.values()]
        for chain in table.chains.values():
            items[f"{name}/{chain.name}"] = list(chain.rules)
    return items


def complete_references(table: Table, sources: Sequence[Table | None]) -> list[str]:
    """Add every chain that a rule of `table` jumps to but `table` lacks, taken from the first
    of `sources` that has it (a rule kept from one state may point at a chain of another).
    Returns the chains added."""
    known: dict[str, Chain] = {}
    for source in reversed([s for s in sources if s is not None]):
        known.update(source.chains)
    added: list[str] = []
    pending = [r for c in table.chains.values() for r in c.rules]
    while pending:
        match = _JUMP.search(pending.pop())
        target = match.group(1) if match else None
        if target and target in known and target not in table.chains:
            table.chains[target] = known[target]
            added.append(target)
            pending.extend(known[target].rules)
    return added


def same_table(one: Table | None, two: Table | None) -> bool:
    """Equal as rulesets: a missing table equals an empty one."""
    if one is None or one.is_empty():
        return two is None or two.is_empty()
    return two is not None and one.text() == two.text()


def _whole(now: Mapping[str, Table], targets: Mapping[str, Table | None]) -> bytes:
    """The layer's state once `targets` are loaded over `now` (as _load gives them to the tool:
    a table without chains as an empty one), as iptables-save text."""
    loaded = {n: t if t is not None and t.chains else empty_table(n) for n, t in targets.items()}
    return render({**now, **loaded}).encode()


def compose_partial(live: bytes, change: bytes) -> bytes:
    """`--partial`: the tables the file names, as they are live with only the chains the file
    names (declares, or appends rules to) replaced by the file's: its policy (else the live
    one) and its rules. Every other chain stays as it is."""
    now = parse_ruleset(live.decode(errors="replace"))
    out = []
    for name, table in parse_ruleset(change.decode(errors="replace")).items():
        merged = Table(name, dict(now[name].chains) if name in now else {})
        for chain in BUILTIN_CHAINS.get(name, ()):
            merged.chains.setdefault(chain, Chain(chain, "ACCEPT"))
        named = dict(table.chains)
        for chain, rules in table.stray.items():   # rules appended to a chain not declared
            live_chain = merged.chains.get(chain)
            named[chain] = Chain(chain, live_chain.policy if live_chain else "-", list(rules))
        merged.chains.update(named)
        out.append(merged)
    return render(out).encode()


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
        self.restore_command = (self.family.restore,)
        self.facts = frozenset({NETFILTER, IPTABLES_SAVE} if self.family.legacy else
                               {NETFILTER, IPTABLES_SAVE, PREDICTED, RULES_FILE, ROLLBACK})

    # -- tools --------------------------------------------------------------------------
    def available(self) -> bool:
        if find_binary(self.family.save) is None:
            return False
        if self.family.legacy:
            # Only where the main iptables is nf_tables: otherwise legacy *is* the main layer.
            return uses_nf_tables()
        return True

    def in_nf_tables(self) -> bool:
        """iptables-nft keeps its tables in nf_tables (and can delete a whole table)."""
        return not self.family.legacy and uses_nf_tables(self.family.save)

    # -- capture / validate / apply -------------------------------------------------------

    def capture(self, on_retry: RetryLog | None = None) -> bytes:
        result = run_persistently([require_binary(self.family.save)], timeout=120,
                                  on_retry=on_retry)
        if result.returncode != 0:
            said, hint = failure_said(result)
            raise ApplyError(f"{self.family.save} failed: {said}", hint=hint)
        return hatch_rules.strip(result.stdout)   # the kernel escape hatch is nobody's rule

    def declared(self, data: bytes) -> dict[str, set[str]]:
        return chain_names(data.decode(errors="replace"))

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
        nft_line = line_starting(_NFT_SYNTAX, text)
        if nft_line is not None:
            raise InvalidRulesError(
                f"{source}:{nft_line}: this is nftables syntax, not an iptables-save file",
                path=source, line=nft_line,
                hint="apply nftables rulesets with the nftables backend (a .nft file)",
            )
        if not has_tables(change):
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
    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        tables = sorted({unit.partition("/")[0] for unit in units})
        if not tables:
            return []
        start = nflist.generation() if self.in_nf_tables() else None
        old = parse_ruleset(before.decode(errors="replace"))
        new = parse_ruleset(after.decode(errors="replace")) if after is not None else None
        if live is not None and live == after and new is not None:
            now = new
        elif live is not None and live == before:
            now = old   # the revert from the snapshot: the live state is the snapshot's
        else:
            now = parse_ruleset((live or self.capture(on_retry)).decode(errors="replace"))
        targets: dict[str, Table | None] = {}
        for name in tables:
            if level == MERGE and new is not None:
                targets[name] = three_way_undo(name, old.get(name), new.get(name), now.get(name))
            elif level in (MERGE, SNAPSHOT_UNITS):
                chains = {u.partition("/")[2] for u in units if u.startswith(name + "/")}
                merged = restore_touched_chains(name, old.get(name), now.get(name), chains)
                complete_references(merged, [now.get(name), old.get(name)])
                targets[name] = merged
            else:
                targets[name] = old.get(name)
        self.proved = None
        whole = None
        if start is not None and self.on_target is not None:
            whole = _whole(now, targets)
            self.on_target(whole)
        repairs: list[str] = []
        commits = self._load_repairing(targets, old, on_retry, repairs)
        end = nflist.generation() if start is not None and commits else None
        if start is not None and end == start + commits:
            # Proved by the kernel: since the live state was read, nf_tables committed our
            # restore (one commit per table) and nothing else, so each table is its target,
            # and the layer is the live state read with those tables replaced.
            after_load = {n: t for n, t in targets.items() if t is not None}
            self.proved = (start, end, whole if whole is not None and not repairs
                           else _whole(now, targets))
        else:
            after_load = parse_ruleset(self.capture(on_retry).decode(errors="replace"))
        if level == MERGE and new is not None:
            # The proof: the change's delta is gone from the kernel's state (whatever others
            # did meanwhile, also after the live state was read), not "as the merge said".
            return [f"{self.label} {problem}" for problem in delta_left(
                *(delta_items(t, tables) for t in (old, new, now, after_load)))]
        return [f"{self.label} table {name} differs from the computed target"
                for name, target in targets.items() if not same_table(target, after_load.get(name))]

    def _load_repairing(self, targets: dict[str, Table | None], old: Tables,
                        on_retry: RetryLog | None, repairs: list[str] | None = None) -> int:
        """Load the targets; when the tool names a chain that a kept rule jumps to but that
        exists nowhere any more, add it (the snapshot's copy, else empty) and load again
        (`repairs`: each chain so added). Returns the nf_tables commits of the load that
        worked."""
        for _ in range(8):
            try:
                return self._load(targets, old, on_retry)
            except ApplyError as exc:
                missing = _MISSING_CHAIN.search(exc.message)
                if not missing:
                    raise
                chain = missing.group(1)
                repaired = False
                for name, target in targets.items():
                    if target is None or chain in target.chains or not any(
                            re.search(rf"\s-[jg]\s+{re.escape(chain)}(\s|$)", r)
                            for c in target.chains.values() for r in c.rules):
                        continue
                    source = old.get(name)
                    target.chains[chain] = (source.chains[chain] if source and chain in
                                            source.chains else Chain(chain, "-"))
                    repaired = True
                if not repaired:
                    raise
                if repairs is not None:
                    repairs.append(chain)
                if on_retry:
                    on_retry(f"{self.label}: re-created chain {chain} that the target needs")
        return self._load(targets, old, on_retry)

    def _load(self, targets: dict[str, Table | None], old: Tables,
              on_retry: RetryLog | None) -> int:
        """Load every target table in one iptables-restore; remove (nf_tables) the tables that
        did not exist before the change and are empty now. Returns the nf_tables commits made
        (one per table restored or removed; 0: not known)."""
        payload: list[Table] = []
        drop: list[str] = []
        for name, target in targets.items():
            if (target is None or target.is_empty()) and self.in_nf_tables() \
                    and name not in old:
                drop.append(name)
                continue
            if target is None or not target.chains:
                target = empty_table(name)
            payload.append(target)
        if payload:
            self._restore(render(payload).encode(), on_retry)
        deleted = 0
        known = nflist.kernel_tables() if drop else None   # (one netlink dump, not a listing)
        for name in drop:
            if known is not None and (self.family.nft_family, name) not in known:
                continue  # already gone
            listed = None if known is not None else run_persistently(
                [require_binary("nft"), "list", "table", self.family.nft_family, name],
                timeout=60, on_retry=on_retry)
            if listed is not None and listed.returncode != 0:
                continue  # already gone
            result = run_persistently(
                [require_binary("nft"), "delete", "table", self.family.nft_family, name],
                timeout=60, on_retry=on_retry)
            if result.returncode != 0:
                raise ApplyError(
                    f"cannot remove table {self.family.nft_family} {name} that the change "
                    f"created: {result.stderr.decode(errors='replace').strip()}")
            deleted += 1
        # One commit per table restored, one per table deleted (`nft delete table`: one
        # transaction); a table found gone already is not counted, so the proof fails then
        # (someone else removed it) and the result is read back.
        return len(payload) + deleted if deleted == len(drop) else 0

    def _restore(self, payload: bytes, on_retry: RetryLog | None) -> None:
        result = run_persistently([require_binary(self.family.restore), "-w", "10"],
                                  input=payload, timeout=600, on_retry=on_retry)
        if result.returncode != 0:
            raise ApplyError(f"{self.family.restore} refused the revert target: "
                             f"{result.stderr.decode(errors='replace').strip()}")
