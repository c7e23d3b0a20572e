"""`nft list` text: the line shapes every reader of it shares (the nft layer's capture and
merge, the check's listing of a sandbox, the hatch's table, the history's normal form).

Standard library only, as all of fwsafe.ondisk: the history's normal form is read by the
offline rescue tool too.
"""

from __future__ import annotations

import re

__all__ = ["CHAIN_LINE", "TABLE_LINE", "zero_counters"]

# `table inet filter {`: a table's first line, family and name
TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{")
# `<tab>chain input {`: a chain's first line in a listed table
CHAIN_LINE = re.compile(r"^\tchain (\S+) \{")
_COUNTERS = re.compile(r"counter packets \d+ bytes \d+")


def zero_counters(line: str) -> str:
    """The line with every `counter packets N bytes M` as `counter packets 0 bytes 0`: the
    counts change with every packet and carry no rule."""
    if "counter packets" not in line:
        return line
    return _COUNTERS.sub("counter packets 0 bytes 0", line)
