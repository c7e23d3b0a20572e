"""The readers of iptables-save text outside the backend (check's line map and pruning, the
guard's commit count, the hatch's payloads) read it with fwsafe.backends.iptsave: pinned
against the code they had before, on generated files (comments, counters, blank and indented
lines, iptables-nft's notes, unclosed tables)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from fwsafe.backends import iptsave
from fwsafe.check.ipt_lines import map_iptables_file
from fwsafe.check.prune import AddressSet, prune_iptables
from fwsafe.guard import hatch_chains, hatch_change, hatch_spec, hatch_sync

SPEC = hatch_spec.Spec("20261206T120000Z-abcd", 1796560000, ("10.0.0.2",), ("fd00::2",), (22, 2222))

LINES = ["*filter", "*nat", "*raw", " *mangle", "*security", "COMMIT", " COMMIT ", "", "  ",
         "# a comment", "# Table `x' is incompatible, use 'nft' tool.", ":INPUT ACCEPT [0:0]",
         ":INPUT DROP [5:6]", ":FORWARD DROP", ":FOO - [0:0]", "\t:OUTPUT DROP [0:0]",
         ":PREROUTING ACCEPT [1:2]", ":POSTROUTING ACCEPT [0:0]", "-A INPUT -j DROP",
         "[1:2] -A INPUT -j ACCEPT", "-A FOO -s 10.0.0.1/32 -j ACCEPT",
         "-A INPUT -s 198.51.100.1/32 -p tcp --dport 22 -j DROP", "-A INPUT -j FOO",
         "-I INPUT 1 -j FOO", "-I FOO -j DROP", "-D INPUT 1", "-D INPUT -j DROP",
         "-R INPUT 1 -j ACCEPT", "-F", "-F FOO", "-X FOO", "-N BAR", "-P INPUT DROP",
         "  -A OUTPUT -j DROP  ", "-A PREROUTING -j DNAT --to-destination 10.0.0.1",
         '-A INPUT -m comment --comment "a b" -j DROP', "--append INPUT -j REJECT"]
FILES = st.lists(st.sampled_from(LINES), max_size=30).map("\n".join)
# lines the hatch reads as iptables-restore does, the check's map did not
HATCH_FILES = st.lists(st.sampled_from([*LINES, ": INPUT DROP [0:0]", ":OUTPUT", ":",
                                        ":FORWARD [0:0]"]), max_size=30).map("\n".join)


# --------------------------------------------------------------------------------------------
# The code before (the oracle)
# --------------------------------------------------------------------------------------------
_OLD_COUNTED = re.compile(r"^\[(\d+):(\d+)\]\s+(.*)$")
_OLD_CHAIN_DECL = re.compile(r"^:(\S+)\s+(\S+)(?:\s+\[(\d+):(\d+)\])?")


def old_map(text: str) -> tuple[object, ...]:
    lines = text.splitlines()
    tables: list[str] = []
    rules: dict[tuple[str, str], list[int]] = {}
    policies: dict[tuple[str, str], int] = {}
    uncertain: set[tuple[str, str]] = set()
    table: str | None = None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            if table not in tables:
                tables.append(table)
            continue
        if table is None:
            continue
        if line == "COMMIT":
            table = None
            continue
        declared = _OLD_CHAIN_DECL.match(line)
        if declared:
            rules.setdefault((table, declared.group(1)), [])
            if declared.group(2) != "-":
                policies[(table, declared.group(1))] = number
            continue
        counted = _OLD_COUNTED.match(line)
        if counted:
            line = counted.group(3)
        tokens = line.split(None, 3)
        if not tokens:
            continue
        command, chain = tokens[0], (tokens[1] if len(tokens) > 1 else "")
        key = (table, chain)
        found = rules.setdefault(key, [])
        position = tokens[2] if len(tokens) > 2 and tokens[2].isdigit() else None
        if command in ("-A", "--append"):
            found.append(number)
        elif command in ("-I", "--insert"):
            at = int(position) - 1 if position else 0
            found.insert(min(max(at, 0), len(found)), number)
        elif command in ("-R", "--replace") and position and 0 < int(position) <= len(found):
            found[int(position) - 1] = number
        elif command in ("-D", "--delete") and position and 0 < int(position) <= len(found):
            del found[int(position) - 1]
        elif command in ("-D", "--delete", "-R", "--replace"):
            uncertain.add(key)
        elif command in ("-F", "--flush"):
            if not chain or chain.startswith("-"):
                rules.pop(key, None)
                for other in [k for k in rules if k[0] == table]:
                    rules[other] = []
            else:
                found.clear()
        elif command in ("-P", "--policy"):
            policies[key] = number
        elif command in ("-X", "--delete-chain"):
            rules.pop(key, None)
    return tables, rules, policies, uncertain


def old_commits(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.lstrip().startswith("*"))


def old_block_chains(lines: list[str]) -> list[str]:
    table = lines[0][1:].strip()
    relevant = hatch_spec.IPTABLES_CHAINS.get(table, ())
    dropping: list[str] = []
    for line in lines[1:]:
        if line.startswith(":"):
            parts = line[1:].split()
            if parts and parts[0] in relevant and len(parts) > 1 and parts[1] != "ACCEPT":
                dropping.append(parts[0])
        else:
            match = re.match(r"^-[AI]\s+(\S+)", iptsave.uncounted(line))   # fixed since
            if match and match.group(1) in relevant:
                dropping.append(match.group(1))
    return [c for c in relevant if c in dropping]


def old_with_iptables_change(payload: bytes, spec: hatch_spec.Spec, v6: bool) -> bytes:
    if not spec.sources(v6):
        return payload
    out: list[str] = []
    block: list[str] | None = None
    for line in payload.decode(errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith("*"):
            block = [stripped]
        elif block is not None and stripped == "COMMIT":
            for chain in old_block_chains(block):
                out += [f"-I {chain} 1 {rule}"
                        for rule in reversed(hatch_spec.iptables_rules(spec, v6, chain))]
            block = None
        elif block is not None and stripped and not stripped.startswith("#"):
            block.append(stripped)
        out.append(line)
    return ("\n".join(out) + "\n").encode()


def old_parse_iptables(text: str, layer: str) -> list[hatch_chains.Chain]:
    chains: dict[tuple[str, str], hatch_chains.Chain] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and table in hatch_spec.IPTABLES_CHAINS:
            parts = line[1:].split()
            if parts[0] in hatch_spec.IPTABLES_CHAINS[table]:
                chains[(table, parts[0])] = hatch_chains.Chain(
                    layer, table, parts[0], hook=parts[0].lower(),
                    policy=parts[1] if len(parts) > 1 else "-")
        elif line.startswith("-A "):
            name, _, spec = line[3:].partition(" ")
            found = chains.get((table, name))
            if found is not None:
                found.rules.append(spec)
                found.handles.append(None)
    return list(chains.values())


def old_plan_iptables(chains: list[hatch_chains.Chain], spec: hatch_spec.Spec | None) -> str:
    tag = spec.tag if spec is not None else ""
    tables: dict[str, list[str]] = {}
    for chain in chains:
        wanted = hatch_sync._wanted(chain, spec, "ipv4")
        if hatch_sync._in_place(chain, wanted, tag):
            continue
        block = tables.setdefault(chain.table, [])
        block += [f"-D {chain.name} {chain.rules[i]}" for i in chain.hatch_positions()]
        block += [f"-I {chain.name} 1 {rule}" for rule in reversed(wanted)]
    return "".join(f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
                   for table, lines in tables.items() if lines)


# iptables-save's own output (what the hatch reads back from the kernel): whole tables
BODY = [line for line in LINES if line.strip() and "*" not in line and "COMMIT" not in line
        and not line.startswith(("-I", "-D", "-R", "-F", "-X", "-N", "-P", "["))]
SAVED = st.lists(st.tuples(st.sampled_from(["filter", "nat", "raw", "mangle", "security"]),
                           st.lists(st.sampled_from(BODY), max_size=8)), max_size=4).map(
    lambda tables: "".join(f"# Generated by iptables-save\n*{t}\n" + "".join(
        line + "\n" for line in lines) + "COMMIT\n" for t, lines in tables))


# --------------------------------------------------------------------------------------------
# Now: the same
# --------------------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(FILES)
def test_line_map_reads_as_before(text: str) -> None:
    fmap = map_iptables_file(text, "f")
    assert (fmap.tables, fmap.rules, fmap.policies, fmap.uncertain) == old_map(text)


@settings(max_examples=400, deadline=None)
@given(FILES)
def test_table_count_as_before(text: str) -> None:
    assert len(iptsave.blocks(text.splitlines())) == old_commits(text)


@settings(max_examples=400, deadline=None)
@given(HATCH_FILES, st.booleans())
def test_hatch_payload_byte_identical(text: str, v6: bool) -> None:
    for payload in (text, text + "\n", text.replace("\n", "\r\n")):
        assert hatch_change.with_iptables_change(payload.encode(), SPEC, v6) == \
            old_with_iptables_change(payload.encode(), SPEC, v6)


@settings(max_examples=300, deadline=None)
@given(SAVED, st.sampled_from([SPEC, None, SPEC.moved(SPEC.opens + 60)]))
def test_hatch_reads_and_writes_tables_as_before(text: str, spec: hatch_spec.Spec | None) -> None:
    # as iptables-save prints it once loaded: the hatch's rules appended (-A) to the chains
    with_hatch = re.sub(r"^-I (\S+) 1 ", r"-A \1 ", hatch_change.with_iptables_change(
        text.encode(), SPEC, False).decode(), flags=re.M)
    for saved in (text, with_hatch):
        chains = hatch_chains.parse_iptables(saved, "ipv4")
        assert chains == old_parse_iptables(saved, "ipv4")
        assert hatch_sync.plan_layer("ipv4", chains, spec) == old_plan_iptables(chains, spec)


def test_hatch_goes_in_a_chain_whose_rules_carry_counters() -> None:
    """A change saved with `iptables-save -c`: iptables-restore loads its rules (counters
    skipped), so a chain with policy ACCEPT and counted rules can drop: the hatch goes in."""
    payload = b"*filter\n:INPUT ACCEPT [0:0]\n[5:100] -A INPUT -p tcp --dport 22 -j DROP\nCOMMIT\n"
    out = hatch_change.with_iptables_change(payload, SPEC, False).decode().splitlines()
    assert out[:3] == payload.decode().splitlines()[:3] and out[-1] == "COMMIT"
    assert [line.split()[:3] for line in out[3:-1]] == [["-I", "INPUT", "1"]]


def test_line_map_reads_what_iptables_restore_reads_more() -> None:
    """A declaration without policy declares the chain; counters need no space after them
    (iptables-restore starts the command right after the `]`)."""
    fmap = map_iptables_file("*filter\n:FOO\n[3:4]-A FOO -j DROP\nCOMMIT\n", "f")
    assert fmap.rules == {("filter", "FOO"): [3]}


SANDBOX = AddressSet.of(["10.0.0.1", "10.0.0.2"])
PRUNE_CASES = {
    # comments, blank and indented lines, counters with and without a space
    "*filter\n# c\n\n :INPUT ACCEPT [0:0]\n[1:2] -A INPUT -s 198.51.100.1/32 -j DROP\n"
    "[3:4]-A INPUT -s 198.51.100.2/32 -j DROP\n  -A INPUT -s 198.51.100.3/32 -j DROP\nCOMMIT\n":
    "*filter\n# c\n\n :INPUT ACCEPT [0:0]\n[1:2] -A INPUT -s 198.51.100.1/32 -j DROP\n\n\n"
    "COMMIT\n",
    # a declaration without policy: the table is not read
    "*filter\n:FOO\n-A INPUT -s 198.51.100.1/32 -j DROP\n-A INPUT -s 198.51.100.2/32 -j DROP\n"
    "COMMIT\n": None,
    # a table left open at the end of the file is read to its end
    "*filter\n-A INPUT -s 198.51.100.1/32 -j DROP\n-A INPUT -s 198.51.100.2/32 -j DROP":
    "*filter\n-A INPUT -s 198.51.100.1/32 -j DROP\n",
    # iptables-nft's note on a table it cannot print, lines between tables
    "# Table `x' is incompatible, use 'nft' tool.\n-A INPUT -s 198.51.100.1/32 -j DROP\n"
    "*filter\n-A INPUT -s 198.51.100.1/32 -j DROP\n-A INPUT -s 198.51.100.2/32 -j DROP\n"
    "COMMIT\n-A INPUT -s 198.51.100.2/32 -j DROP\n":
    "# Table `x' is incompatible, use 'nft' tool.\n-A INPUT -s 198.51.100.1/32 -j DROP\n"
    "*filter\n-A INPUT -s 198.51.100.1/32 -j DROP\n\nCOMMIT\n"
    "-A INPUT -s 198.51.100.2/32 -j DROP\n",
    # a table opened inside another one: the first is not read
    "*filter\n-A INPUT -s 198.51.100.1/32 -j DROP\n-A INPUT -s 198.51.100.2/32 -j DROP\n"
    "*nat\nCOMMIT\n": None,
    # a user chain reached only from rules no sandbox packet matches
    "*filter\n:INPUT ACCEPT [0:0]\n:FOO - [0:0]\n-A INPUT -s 198.51.100.1/32 -j FOO\n"
    "-A INPUT -s 198.51.100.9/32 -j FOO\n-A FOO -j DROP\n-A FOO -p udp -j DROP\nCOMMIT\n":
    "*filter\n:INPUT ACCEPT [0:0]\n:FOO - [0:0]\n-A INPUT -s 198.51.100.1/32 -j FOO\n\n"
    "-A FOO -j DROP\n-A FOO -p udp -j DROP\nCOMMIT\n",
}


def test_prune_reads_as_before() -> None:
    for text, expected in PRUNE_CASES.items():
        assert prune_iptables(text, SANDBOX, 4).text == (text if expected is None else expected)
