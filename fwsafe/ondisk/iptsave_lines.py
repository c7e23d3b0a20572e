"""iptables-save text read line by line: the lowest level of the one reader of that format.

Standard library only, Python 3.9+: fwsafe.backends.iptsave builds its model (tables of chains
of rules), its parser and its writer on it, and the history's normal form
(fwsafe.ondisk.history_format, which the rescue tool reads too) is made with it, so that what a
line is (a table, a chain's declaration, COMMIT, a rule, or nothing: blank, a comment) is
decided in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

# The kinds of line (`save_lines`)
TABLE = "table"     # `*filter`: opens a table
CHAIN = "chain"     # `:INPUT ACCEPT [packets:bytes]`: declares a chain
COMMIT = "commit"   # closes the table
RULE = "rule"       # anything else: `-A CHAIN ...`, with -c `[packets:bytes] -A CHAIN ...`

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def save_lines(text: str) -> Iterator[tuple[str, str]]:
    """Each line of iptables-save text that says something, as (kind, the line right-stripped):
    blank lines and comment lines (`#`, after blanks or not) are left out. A line's kind is
    told by its first character, as iptables-save prints it (`*`, `:`), and COMMIT by the whole
    line; an indented line is a RULE (iptables-restore's rule reader then finds no command)."""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        first = line[0]
        if first == "*":
            yield TABLE, line
        elif first == ":":
            yield CHAIN, line
        elif first == "#" or (first.isspace() and line.lstrip()[0] == "#"):
            continue
        elif line == "COMMIT":
            yield COMMIT, line
        else:
            yield RULE, line


def zero_counters(line: str) -> str:
    """A chain's declaration with its counters [0:0] (two captures of one ruleset compare
    equal whatever traffic passed in between)."""
    return _COUNTERS.sub("[0:0]", line)
