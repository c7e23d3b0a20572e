"""iptables-save text has one line reader (fwsafe.ondisk.iptsave_lines, standard library only):
the history's normal form (fwsafe.ondisk.history_format.normalize_iptables) and the backend's
parser (fwsafe.backends.iptsave.parse_ruleset) read with it. Both pinned, byte for byte and
field for field, against the code they had before, on generated files (comments indented or
not, counters, blank, indented and right-padded lines, carriage returns, unclosed tables)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from fwsafe.backends import iptsave
from fwsafe.ondisk import iptsave_lines
from fwsafe.ondisk.history_format import normalize_iptables

LINES = ["*filter", "*nat", " *mangle", "*raw ", "* security", "COMMIT", " COMMIT", "COMMIT \t",
         "COMMITTED", "", "  ", "\t", "# a comment", "  # an indented comment", "\t#tab",
         "# Table `x' is incompatible, use 'nft' tool.", ":INPUT ACCEPT [0:0]",
         ":INPUT DROP [12:345]", ":FORWARD DROP", ":FOO - [0:0]", ": OUTPUT DROP [7:8] [9:10]",
         "\t:OUTPUT DROP [0:0]", ":", ":X", "-A INPUT -j DROP", "[1:2] -A INPUT -j ACCEPT",
         "[1:2]-A INPUT -j ACCEPT", "[x:2] -A INPUT", "[3:4]", "-A FOO -s 10.0.0.1/32 -j ACCEPT",
         "-A INPUT -m comment --comment \"[1:2] a\" -j DROP", "-I INPUT 1 -j FOO", "-D INPUT 1",
         "  -A OUTPUT -j DROP  ", "--append INPUT -j REJECT", "--insert FOO -j DROP", "-A",
         "-A NOPE -j DROP", "-N BAR", "garbage", "#", "-A INPUT -j DROP # not a comment"]
SEPARATORS = st.sampled_from(["\n", "\r\n", "\n\n"])
FILES = st.builds(lambda lines, sep: sep.join(lines), st.lists(st.sampled_from(LINES), max_size=40),
                  SEPARATORS)
NOISE = st.text(alphabet="*:#[]0123456789 \t\r\nCOMITADXfilternat-ACCEPTDROP", max_size=200)


# --------------------------------------------------------------------------------------------
# The code before (the oracle)
# --------------------------------------------------------------------------------------------
_OLD_COUNTERS = re.compile(r"\[\d+:\d+\]")


def old_normalize_iptables(text: str) -> str:
    out = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        if line.startswith(":"):
            line = _OLD_COUNTERS.sub("[0:0]", line)
        out.append(line)
    return "".join(f"{line}\n" for line in out)


_OLD_COUNTED = re.compile(r"\[(\d+):\d+\]\s*")
_OLD_APPEND = frozenset({"-A", "--append", "-I", "--insert"})


def old_parse_ruleset(text: str, counters: bool = False) -> iptsave.Tables:
    tables: iptsave.Tables = {}
    table: iptsave.Table | None = None
    chains: dict[str, iptsave.Chain] = {}
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        first = line[0]
        if first == "*":
            name = line[1:].strip()
            table = tables[name] = iptsave.Table(name)
            chains = table.chains
            continue
        if table is None or first == "#":
            continue
        if first == ":":
            declared = iptsave.declaration(line)
            if declared:
                name, policy, packets = declared
                chains[name] = iptsave.Chain(name, policy or "-",
                                             policy_packets=packets if counters else 0)
            continue
        if line == "COMMIT":
            table = None
            continue
        packets = 0
        if first == "[":
            counted = _OLD_COUNTED.match(line)
            if counted is None:
                continue
            packets, line = int(counted.group(1)), line[counted.end():]
        head = line.split(None, 2)
        if len(head) < 2 or head[0] not in _OLD_APPEND:
            continue
        chain = chains.get(head[1])
        if chain is None:
            table.stray.setdefault(head[1], []).append(line)
            continue
        chain.rules.append(line)
        if counters:
            chain.packets.append(packets)
    return tables


def _everything(tables: iptsave.Tables) -> list[object]:
    """Every field, the ones left out of comparisons (counters, strays) too, in order."""
    return [(name, table.name, table.stray,
             [(c.name, c.policy, c.rules, c.policy_packets, c.packets)
              for c in table.chains.values()])
            for name, table in tables.items()]


# --------------------------------------------------------------------------------------------
@settings(max_examples=600, deadline=None)
@given(st.one_of(FILES, NOISE))
def test_history_normal_form_byte_identical(text: str) -> None:
    assert normalize_iptables(text) == old_normalize_iptables(text)


@settings(max_examples=600, deadline=None)
@given(st.one_of(FILES, NOISE), st.booleans())
def test_parser_reads_as_before(text: str, counters: bool) -> None:
    assert _everything(iptsave.parse_ruleset(text, counters)) == \
        _everything(old_parse_ruleset(text, counters))


def test_the_line_reader_tells_each_kind() -> None:
    text = ("# c\n*filter \n:INPUT DROP [1:2]\n  # indented\n\n[1:2] -A INPUT -j DROP\n"
            " -A X\nCOMMIT  \n")
    assert list(iptsave_lines.save_lines(text)) == [
        (iptsave_lines.TABLE, "*filter"), (iptsave_lines.CHAIN, ":INPUT DROP [1:2]"),
        (iptsave_lines.RULE, "[1:2] -A INPUT -j DROP"), (iptsave_lines.RULE, " -A X"),
        (iptsave_lines.COMMIT, "COMMIT")]
    assert iptsave_lines.zero_counters(":INPUT DROP [1:2]") == ":INPUT DROP [0:0]"
