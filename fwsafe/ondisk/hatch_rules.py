"""How a rule of the kernel escape hatch (fwsafe.guard.hatch) is recognised in iptables-save
text and nft listings, and taken out of them: every capture of the backends goes through
`strip`, so that snapshots, the merge, the boot files, the history, the rescue tool, `check`
and `diff` never see it. Standard library only (the backends and the rescue tool use it; the
guard's hatch, which loads and removes the rules, builds on it)."""

from __future__ import annotations

import re

from fwsafe.context import RUN

MARK = "fwsafe-hatch"
_MARK_BYTES = MARK.encode()
_HATCH_LINE = re.compile(rb"^(?:-A \S+ .*--comment \"?|\s+.*comment \")" + _MARK_BYTES + rb":"
                         rb".*$\n?", re.M)
# The lo bridge: where a table on SSH's path is owned by another program (`flags owner`:
# firewalld 2.x), the hatch cannot be put in it; from the same moment, SSH packets from the
# hatch's sources are looped through `lo` from this table's ingress chains instead, which the
# owned table accepts (`iifname "lo" accept`). The whole table is the hatch's.
BRIDGE_FAMILY = "netdev"
BRIDGE_TABLE = "fwsafe_hatch"
_BRIDGE_BLOCK = re.compile(rb"^table " + BRIDGE_FAMILY.encode() + rb" " + BRIDGE_TABLE.encode()
                           + rb" \{.*?^\}[^\n]*$\n?", re.M | re.S)


def is_bridge(family: str, table: str) -> bool:
    """The lo bridge's table (nobody's rules: never captured, compared or loaded back)."""
    return family == BRIDGE_FAMILY and table == BRIDGE_TABLE


def strip(data: bytes) -> bytes:
    """An iptables-save or nft listing without the hatch's rules (as if it were not loaded)."""
    if _MARK_BYTES not in data and BRIDGE_TABLE.encode() not in data:
        return data
    stripped = _HATCH_LINE.sub(b"", _BRIDGE_BLOCK.sub(b"", data))
    if stripped != data:
        RUN.hatch_seen = True   # one is loaded: `fwsafe apply` removes leftovers first
    return stripped
