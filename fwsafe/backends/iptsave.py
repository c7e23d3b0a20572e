"""The iptables-save format: one model (tables of chains of rules), one parser, one writer.

Every reader of iptables-save text uses this module: the iptables backend (capture, merge,
revert, `--partial`), the rollback of a history entry, `fwsafe check` (which rule counted
packets: ``iptables-save -c``; which file line made a rule and which rules pruning may leave
out: `blocks`), `fwsafe audit` (Docker's and other NAT), the guard (a change's commits) and the
kernel escape hatch (its iptables-restore payloads: `blocks`, `table_text`). Nothing here runs
a program. What a line is (a table, a declaration, COMMIT, a rule, nothing) is told by the
lowest level, fwsafe.ondisk.iptsave_lines (standard library only: the history's normal form is
made with it too), on which the parser builds.

The format, as iptables-save prints it and iptables-restore reads it: a `*table` line opens a
table, `:CHAIN POLICY [packets:bytes]` declares a chain (policy "-" for a user chain), rule
lines (`-A CHAIN ...`, with ``-c`` preceded by `[packets:bytes]`) follow, `COMMIT` closes the
table. Lines starting with `#` are comments; iptables-nft prints one for a table it cannot show
("# Table `x' is incompatible, use 'nft' tool.") and nothing else of it. Declarations and COMMIT
count only at the start of a line (what `chain_names` reads too).

Counters are kept apart from the rules (`Chain.packets`, `Chain.policy_packets`) and do not
take part in comparisons: two captures of the same ruleset compare equal whatever traffic passed
in between, and the writer prints every counter as [0:0].
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from fwsafe.ondisk.iptsave_lines import CHAIN, COMMIT, TABLE, save_lines

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
#: The names of built-in chains, in whatever table.
BUILTIN_CHAIN_NAMES = frozenset(c for chains in BUILTIN_CHAINS.values() for c in chains)

# iptables-restore reads the chain name after `:` as strtok does: blanks before it are skipped
_DECLARED = re.compile(r":[ \t]*(\S+)(?:\s+(\S+))?(?:\s+\[(\d+):\d+\])?")
# iptables-restore starts the command right after the `]` of the counters: no space needed
_COUNTED = re.compile(r"\[(\d+):\d+\]\s*")
_APPEND = frozenset({"-A", "--append", "-I", "--insert"})
_HAS_TABLE = re.compile(rb"(?:^|\n)\*")
# A declaration line: `*table`, `:chain ...` or COMMIT. Matched after the newline that starts
# it (a literal the regex engine searches for fast), on the text with "\n" put in front.
_DECLARATION = re.compile(r"\n(?:\*(?P<table>[^\n]*)|:[ \t]*(?P<chain>\S+)[^\n]*|(?P<commit>COMMIT)"
                          r"[ \t\r\f\v]*(?=\n|\Z))")


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
_DOUBLE_QUOTED_WORD = re.compile(r'(?:[^\s"]+|"[^"]*")+')


def split_rule(text: str) -> list[str]:
    """The words of a rule line; shlex (slow: 0.8 ms a line) only where single quotes or
    backslashes make it necessary. Balanced double quotes without a backslash (iptables-save's
    comments: every kube-proxy rule has one) read as shlex reads them."""
    if '"' not in text and "'" not in text and "\\" not in text:
        return text.split()
    if "'" not in text and "\\" not in text and text.count('"') % 2 == 0:
        return [word.replace('"', "") for word in _DOUBLE_QUOTED_WORD.findall(text)]
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


@dataclass
class Rule:
    """One rule of a chain read for its options: its 1-based position, its text
    ("-A CHAIN ..." as iptables-save prints it) and the packets it counted (``-c``)."""

    index: int
    text: str
    packets: int = 0

    @functools.cached_property
    def tokens(self) -> list[str]:
        return split_rule(self.text)

    def option(self, *names: str) -> str | None:
        tokens = self.tokens
        for i, token in enumerate(tokens[:-1]):
            if token in names:
                return tokens[i + 1]
        return None

    @property
    def target(self) -> str | None:
        return self.option("-j", "--jump")

    @property
    def goto(self) -> str | None:
        return self.option("-g", "--goto")

    def negated(self, name: str) -> bool:
        tokens = self.tokens
        return any(t == "!" and i + 1 < len(tokens) and tokens[i + 1] == name
                   for i, t in enumerate(tokens))

    def modules(self) -> list[str]:
        tokens = self.tokens
        return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("-m", "--match")]


@dataclass
class Chain:
    name: str
    policy: str                      # "ACCEPT"/"DROP" for built-in chains, "-" for user chains
    rules: list[str] = field(default_factory=list)          # "-A CHAIN ...", counters apart
    policy_packets: int = field(default=0, compare=False)   # read with counters=True
    packets: list[int] = field(default_factory=list, compare=False)   # per rule, ditto
    # The rules read for their options, made once (an analysis asks many times: each rule's
    # words are split once). Made again when rules were added or removed since.
    _read: list[Rule] = field(default_factory=list, init=False, repr=False, compare=False)

    def text(self) -> str:
        return "\n".join([f":{self.name} {self.policy} [0:0]", *self.rules])

    def each_rule(self) -> list[Rule]:
        """Every rule read for its options (with its counter), in order."""
        if len(self._read) != len(self.rules):
            packets = self.packets if len(self.packets) == len(self.rules) else []
            self._read = [Rule(i, text, packets[i - 1] if packets else 0)
                          for i, text in enumerate(self.rules, start=1)]
        return self._read

    def rule(self, index: int) -> Rule:
        """Rule `index` (1-based) read for its options, with its counter."""
        return self.each_rule()[index - 1]


@dataclass
class Table:
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)
    #: Rules appended to chains the table does not declare, by chain (iptables-restore takes
    #: them for built-in chains; `--partial` replaces those chains). Not part of the ruleset.
    stray: dict[str, list[str]] = field(default_factory=dict, compare=False)

    def is_empty(self) -> bool:
        """Only built-in chains, policy ACCEPT, no rules: the same as no table at all."""
        builtins = BUILTIN_CHAINS.get(self.name, ())
        return all(c.name in builtins and c.policy == "ACCEPT" and not c.rules
                   for c in self.chains.values())

    def text(self) -> str:
        """The table as iptables-restore reads it (built-in chains first, then user chains by
        name; counters [0:0])."""
        builtins = BUILTIN_CHAINS.get(self.name, ())
        order = [c for c in builtins if c in self.chains] + sorted(
            c for c in self.chains if c not in builtins)
        decls = [f":{c} {self.chains[c].policy} [0:0]" for c in order]
        return table_text(self.name, [*decls, *(r for c in order for r in self.chains[c].rules)])


Tables = dict[str, Table]


def empty_table(name: str) -> Table:
    """A table with its built-in chains, policy ACCEPT, no rules (loading it empties it)."""
    return Table(name, {c: Chain(c, "ACCEPT") for c in BUILTIN_CHAINS.get(name, ())})


# --------------------------------------------------------------------------------------------
# The parser and the writer
# --------------------------------------------------------------------------------------------
def parse_ruleset(text: str, counters: bool = False) -> Tables:
    """Parse iptables-save output (with or without ``-c``) into tables of chains of rules.

    Comment and blank lines are dropped, a repeated `*table` replaces the first (as
    iptables-restore loads it), lines outside a table are ignored. `counters`: keep the
    packet counters of rules and policies (`Chain.packets`, `Chain.policy_packets`).
    """
    tables: Tables = {}
    table: Table | None = None
    chains: dict[str, Chain] = {}
    for kind, line in save_lines(text):
        if kind == TABLE:
            name = line[1:].strip()
            table = tables[name] = Table(name)
            chains = table.chains
            continue
        if table is None:
            continue
        if kind == CHAIN:
            declared = declaration(line)
            if declared:
                name, policy, packets = declared
                chains[name] = Chain(name, policy or "-",
                                     policy_packets=packets if counters else 0)
            continue
        if kind == COMMIT:
            table = None
            continue
        packets = 0
        if line[0] == "[":
            counted = _COUNTED.match(line)
            if counted is None:
                continue
            packets, line = int(counted.group(1)), line[counted.end():]
        head = line.split(None, 2)
        if len(head) < 2 or head[0] not in _APPEND:
            continue
        chain = chains.get(head[1])
        if chain is None:
            table.stray.setdefault(head[1], []).append(line)
            continue
        chain.rules.append(line)
        if counters:
            chain.packets.append(packets)
    return tables


def table_text(table: str, lines: Iterable[str]) -> str:
    """One table block as iptables-restore reads it: `*table`, `lines`, COMMIT (with
    ``--noflush``, `lines` may be commands: ``-I CHAIN 1 ...``, ``-D CHAIN ...``)."""
    return f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def render(tables: Tables | list[Table]) -> str:
    """iptables-restore input that loads `tables` (each replaces the table of its name)."""
    return "".join(t.text() for t in (tables.values() if isinstance(tables, dict) else tables))


def has_tables(save: bytes) -> bool:
    """Whether iptables-save text names a table (`*filter`...): `parse_ruleset` would not be
    empty. At once, where parsing 50,000 rules to learn it takes a tenth of a second."""
    return _HAS_TABLE.search(save) is not None


def chain_names(text: str) -> dict[str, set[str]]:
    """{table: the chains it declares}: what `parse_ruleset` finds, from the `*table`, `:chain`
    and COMMIT lines alone (a fraction of the time on a large ruleset: no rule is looked at)."""
    tables: dict[str, set[str]] = {}
    current: set[str] | None = None
    for match in _DECLARATION.finditer("\n" + text):
        if match.group("table") is not None:
            current = tables[match.group("table").strip()] = set()
        elif match.group("commit") is not None:
            current = None
        elif current is not None:
            current.add(match.group("chain"))
    return tables


def table_names(text: str) -> list[str]:
    """The tables iptables-save text names, in order (what iptables-restore replaces)."""
    return list(chain_names(text))


# --------------------------------------------------------------------------------------------
# Reading a file line by line (line numbers kept: check's maps and pruning, the hatch's payload)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One table of iptables-save lines: the index of its `*table` line (`start`) and of the
    line that ends it (`end`: its COMMIT, the next `*table` line, or the number of lines);
    `closed`: it ended with COMMIT."""

    table: str
    start: int
    end: int
    closed: bool

    def body(self, lines: Sequence[str]) -> Iterator[tuple[int, str]]:
        """(index, line stripped) of each line of the table; blank and comment lines left
        out."""
        for index in range(self.start + 1, self.end):
            line = lines[index].strip()
            if line and line[0] != "#":
                yield index, line


def blocks(lines: Sequence[str]) -> list[Block]:
    """The tables of iptables-save text split into `lines`, in order. Lines are read stripped
    (a file written by hand may indent them; `parse_ruleset` reads iptables-save's own output,
    which does not); lines outside a table are no part of one."""
    found: list[Block] = []
    table: str | None = None
    start = 0
    for index, raw in enumerate(lines):
        line = raw.strip()
        if line.startswith("*"):
            if table is not None:
                found.append(Block(table, start, index, False))
            table, start = line[1:].strip(), index
        elif table is not None and line == "COMMIT":
            found.append(Block(table, start, index, True))
            table = None
    if table is not None:
        found.append(Block(table, start, len(lines), False))
    return found


def declaration(line: str) -> tuple[str, str | None, int] | None:
    """A `:CHAIN POLICY [packets:bytes]` line read: (chain, its policy, "-" for a user chain,
    or None when the line has none, the policy's packets); None for any other line."""
    declared = _DECLARED.match(line)
    if declared is None:
        return None
    name, policy, packets = declared.groups()
    return name, policy, int(packets) if packets else 0


def uncounted(line: str) -> str:
    """A rule line without the `[packets:bytes]` that ``iptables-save -c`` puts in front."""
    counted = _COUNTED.match(line) if line.startswith("[") else None
    return line if counted is None else line[counted.end():]
