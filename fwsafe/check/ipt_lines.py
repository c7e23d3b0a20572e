"""Which line of an iptables-save file made the Nth rule of a chain: the file followed the way
iptables-restore reads it (-A, -I, -R, -D, -F, -P, -X), line numbers kept. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field

from fwsafe.backends import iptsave


@dataclass
class IptFileMap:
    source: str
    lines: list[str]
    tables: list[str] = field(default_factory=list)
    rules: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    policies: dict[tuple[str, str], int] = field(default_factory=dict)
    uncertain: set[tuple[str, str]] = field(default_factory=set)

    def text(self, line: int) -> str:
        return self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""

    def rule_line(self, table: str, chain: str, index: int, expected_count: int | None = None
                  ) -> int | None:
        """The file line of rule `index` (1-based) of `chain` in `table`, None if unknown.

        `expected_count`, the number of rules the kernel holds in that chain, guards against a
        mapping that went wrong (a file that edits chains in ways this map does not follow).
        """
        key = (table, chain)
        lines = self.rules.get(key)
        if lines is None or key in self.uncertain:
            return None
        if expected_count is not None and expected_count != len(lines):
            return None
        return lines[index - 1] if 0 < index <= len(lines) else None

    def policy_line(self, table: str, chain: str) -> int | None:
        return self.policies.get((table, chain))


def map_iptables_file(text: str, source: str) -> IptFileMap:
    """Follow an iptables-save file the way iptables-restore does, keeping line numbers.

    ``-A`` appends, ``-I CHAIN [N]`` inserts, ``-R CHAIN N`` replaces, ``-D CHAIN N`` deletes,
    ``-F`` flushes; a ``-D`` by rule text makes that chain's mapping uncertain.
    """
    lines = text.splitlines()
    fmap = IptFileMap(source, lines)
    for block in iptsave.blocks(lines):
        if block.table not in fmap.tables:
            fmap.tables.append(block.table)
        for index, line in block.body(lines):
            _follow(fmap, block.table, index + 1, line)
    return fmap


def _follow(fmap: IptFileMap, table: str, number: int, line: str) -> None:
    """Line `number` of the file, in `table`: a declaration, or a command on a chain."""
    declared = iptsave.declaration(line) if line.startswith(":") else None
    if declared is not None:
        name, policy, _ = declared
        fmap.rules.setdefault((table, name), [])
        if policy not in (None, "-"):
            fmap.policies[(table, name)] = number
        return
    line = iptsave.uncounted(line)
    tokens = line.split(None, 3)  # the command, the chain, maybe a position
    if not tokens:
        return
    command, chain = tokens[0], (tokens[1] if len(tokens) > 1 else "")
    key = (table, chain)
    rules = fmap.rules.setdefault(key, [])
    position = tokens[2] if len(tokens) > 2 and tokens[2].isdigit() else None
    if command in ("-A", "--append"):
        rules.append(number)
    elif command in ("-I", "--insert"):
        at = int(position) - 1 if position else 0
        rules.insert(min(max(at, 0), len(rules)), number)
    elif command in ("-R", "--replace") and position and 0 < int(position) <= len(rules):
        rules[int(position) - 1] = number
    elif command in ("-D", "--delete") and position and 0 < int(position) <= len(rules):
        del rules[int(position) - 1]
    elif command in ("-D", "--delete", "-R", "--replace"):
        fmap.uncertain.add(key)
    elif command in ("-F", "--flush"):
        if not chain or chain.startswith("-"):
            fmap.rules.pop(key, None)
            for other in [k for k in fmap.rules if k[0] == table]:
                fmap.rules[other] = []
        else:
            rules.clear()
    elif command in ("-P", "--policy"):
        fmap.policies[key] = number
    elif command in ("-X", "--delete-chain"):
        fmap.rules.pop(key, None)
