"""Native nftables tables, through `nft`.

The layer holds every nftables table except those that iptables-nft owns (ip/ip6 tables named
filter, nat, mangle, raw, security): those are captured in iptables format by the iptables
layers, because `nft list ruleset` output of xt matches does not load back.

A change is an nft file: validated with `nft -c -f`, applied with `nft -f` (one atomic
transaction). A revert loads the computed target of each touched table in one `nft -f`
transaction: ``add table X; delete table X; <target of X>``. The target is the three-way
merge (fwsafe.core.merge) of the table before the change, right after it and live, object by
object (sets, maps, chains): element by element inside sets and maps, line by line inside
chains; the fallback is the table as in the snapshot. A table the change created is deleted
unless others added to it. Tables nobody touched are left alone.
With `--partial` the file's tables replace the same tables live and nothing else changes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from fwsafe.backends import libnft, nflist
from fwsafe.backends.base import (
    MERGE,
    NETFILTER,
    NFT_TABLES,
    PREDICTED,
    ROLLBACK,
    ApplyError,
    Layer,
    RetryLog,
    line_starting,
)
from fwsafe.backends.iptables import uses_nf_tables
from fwsafe.backends.iptsave import BUILTIN_CHAINS
from fwsafe.backends.nflist import kernel_tables
from fwsafe.context import RUN
from fwsafe.core.merge import delta_left, merge_sequences, merge_value
from fwsafe.errors import InvalidRulesError
from fwsafe.ondisk import hatch_rules
from fwsafe.ondisk.nft_text import TABLE_LINE, zero_counters
from fwsafe.runner import find_binary, require_binary, run, run_persistently

_NFT_ERROR = re.compile(r"^(?:/dev/stdin|[^:\s]+):(\d+):(\d+)(?:-\d+)?: Error: (.*)$", re.M)
_IPTABLES_SYNTAX = re.compile(r"\n[^\S\n]*(?:\*(?:filter|nat|mangle|raw|security)\s*$|"
                              r":[A-Z]+ (?:ACCEPT|DROP) |-A [A-Z])", re.M)   # line_starting
_NFT_STATEMENT = re.compile(r"\n[^\S\n]*(?:table\s+\S+\s+\S+|flush\s+ruleset|"
                            r"add\s+(?:table|rule|chain)\s)")                 # line_starting
# A table an nft file writes to: `table ip filter {`, `add rule ip filter INPUT ...`, ...
_TABLE_NAMED = re.compile(r"^[^\S\n]*(?:(?:add|create|flush|delete|insert|replace)\s+)?"
                          r"(?:table|chain|rule|set|map|element)\s+(ip6?)\s+([^\s{;]+)", re.M)
IPTABLES_FAMILIES = ("ip", "ip6")


def looks_like_nft(content: bytes) -> bool:
    """An nft ruleset rather than an iptables-save file (recognised by content)."""
    text = content.decode(errors="replace")
    return line_starting(_NFT_STATEMENT, text) is not None and not text.lstrip().startswith("*")


def split_tables(text: str) -> dict[str, str]:
    """`nft list` output -> {"family name": block text}."""
    blocks: dict[str, str] = {}
    current: list[str] | None = None
    key = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        match = TABLE_LINE.match(line)
        if match:
            if current is not None:  # an unterminated block: keep what it had
                blocks[key] = "\n".join(current)
            key = f"{match.group(1)} {match.group(2)}"
            current = [line]
            continue
        if current is None:
            continue
        if line.strip():
            current.append(zero_counters(line))
        if line == "}":
            blocks[key] = "\n".join(current)
            current = None
    if current is not None:
        blocks[key] = "\n".join(current)
    return blocks


def parse_block(block: str) -> tuple[str, list[str], dict[str, list[str]]]:
    """A table block -> (header line, table-level lines, {object header: body lines}); objects
    (sets, maps, chains, ...) keep their order."""
    lines = block.splitlines()
    header = lines[0] if lines else ""
    attrs: list[str] = []
    objects: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[1:]:
        if current is not None:
            if line == "\t}":
                current = None
            else:
                current.append(line)
        elif line.startswith("\t") and not line.startswith("\t\t") and line.endswith("{"):
            current = objects.setdefault(line, [])
        elif line != "}":
            attrs.append(line)
    return header, attrs, objects


def render_block(header: str, attrs: list[str], objects: dict[str, list[str]]) -> str:
    out = [header, *attrs]
    for head, body in objects.items():
        out += [head, *body, "\t}"]
    return "\n".join([*out, "}"])


def _is_set(header: str) -> bool:
    return header.startswith(("\tset ", "\tmap "))


def split_elements(text: str) -> list[str]:
    """`a, b . c, 22 : accept` -> its elements (commas inside braces or quotes do not split)."""
    if not any(mark in text for mark in '"{('):   # plain elements (a 100k set): no scanning
        return [" ".join(e.split()) for e in text.split(",") if e.strip()]
    out: list[str] = []
    depth, quoted, start = 0, False, 0
    for index, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "{(":
            depth += 1
        elif not quoted and char in "})":
            depth -= 1
        elif not quoted and depth == 0 and char == ",":
            out.append(text[start:index])
            start = index + 1
    out.append(text[start:])
    return [" ".join(e.split()) for e in out if e.strip()]


def set_parts(body: list[str]) -> tuple[list[str], list[str]]:
    """A set's or map's body -> (its other lines, its elements): `elements = { ... }` may be
    wrapped over several lines by nft."""
    lines: list[str] = []
    elements: list[str] = []
    index = 0
    while index < len(body):
        line = body[index]
        if line.strip().startswith("elements = {"):
            # joined once at the end: a set of 100k elements spans thousands of lines
            pieces = [line.strip()[len("elements = {"):]]
            while not pieces[-1].rstrip().endswith("}") and index + 1 < len(body):
                index += 1
                pieces.append(body[index].strip())
            elements += split_elements(" ".join(pieces).rstrip().removesuffix("}"))
        else:
            lines.append(line)
        index += 1
    return lines, elements


def render_set(lines: list[str], elements: list[str]) -> list[str]:
    return [*lines, *([f"\t\telements = {{ {', '.join(elements)} }}"] if elements else [])]


def merge_set(before: list[str], after: list[str], live: list[str]) -> list[str]:
    """A set or map, merged element by element (each element with its value, flags and
    timeout is one item): the change's elements go, the ones it removed come back, others'
    stay; the set's own lines (type, flags, timeout, ...) merged as lines."""
    parts = [set_parts(body) for body in (before, after, live)]
    lines = merge_sequences(*(p[0] for p in parts))
    elements = merge_sequences(*(p[1] for p in parts))
    return render_set(lines, elements)


def canonical_block(block: str | None) -> str | None:
    """A table block with every set's elements sorted on one line: nft wraps long element
    lists at its own places and lists a set's elements in its own order (a set has none)."""
    if block is None:
        return None
    header, attrs, objects = parse_block(block)
    out = {}
    for head, body in objects.items():
        if _is_set(head):
            lines, elements = set_parts(body)
            body = render_set(lines, sorted(elements))
        out[head] = body
    return render_block(header, attrs, out)


def delta_items(blocks: Mapping[str, str], units: Sequence[str]) -> dict[str, list[str]]:
    """The items the revert's proof counts (fwsafe.core.merge.delta_left): per table its own
    lines and the headers of its objects; per set or map its lines and elements; per chain
    (and other object) its lines."""
    items: dict[str, list[str]] = {}
    for unit in units:
        if unit not in blocks:
            continue
        _header, attrs, objects = parse_block(blocks[unit])
        items[unit] = [*attrs, *(head.strip() for head in objects)]
        for head, body in objects.items():
            lines, elements = set_parts(body) if _is_set(head) else (body, [])
            items[f"{unit}/{head.strip()}"] = [*lines, *(f"element {e}" for e in elements)]
    return items


def merge_block(before: str | None, after: str | None, live: str | None) -> str | None:
    """One table with the change `before -> after` undone on `live` (None: no such table)."""
    exists = merge_value(*("y" if b is not None else None for b in (before, after, live)))
    parts = [parse_block(b) if b is not None else ("", [], {}) for b in (before, after, live)]
    header = next((p[0] for p in (parts[2], parts[0], parts[1]) if p[0]), "")
    attrs = merge_sequences(*(p[1] for p in parts))
    names = list(dict.fromkeys([*parts[2][2], *parts[0][2], *parts[1][2]]))
    objects: dict[str, list[str]] = {}
    for name in names:
        there = merge_value(*("y" if name in p[2] else None for p in parts))
        merge = merge_set if _is_set(name) else merge_sequences
        body = merge(*(p[2].get(name, []) for p in parts))
        if there:        # an object others deleted is not re-created as an orphan
            objects[name] = body
    if not exists and not objects:
        return None
    return render_block(header, attrs, objects)


def _whole(now: Mapping[str, str], targets: Mapping[str, str | None]) -> bytes:
    """The layer's state once `targets` are loaded over `now`, as `capture` gives it."""
    blocks = {**now, **targets}
    return "".join(block + "\n" for block in blocks.values() if block is not None).encode()


def compose_partial(change: bytes) -> bytes:
    """`--partial`: each table the file defines replaces the live table of that name."""
    text = change.decode(errors="replace")
    if re.search(r"^\s*flush\s+ruleset\b", text, re.M):
        raise InvalidRulesError("a --partial nft file must not `flush ruleset`: it names the "
                                "tables it replaces, and every other table stays")
    names = dict.fromkeys(f"{m.group(1)} {m.group(2)}" for m in re.finditer(
        r"^\s*(?:add\s+)?table\s+(\S+)\s+([^\s{]+)", text, re.M))
    prefix = "".join(f"add table {n}\ndelete table {n}\n" for n in names)
    return (prefix + text).encode()


_FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
# A top-level statement that writes to one named table: `[verb] object [family] table ...`.
_WRITES = re.compile(r"(?:(?:add|create|flush|delete|destroy|insert|replace|reset)\s+)?"
                     r"(?:table|chain|rule|set|map|element|flowtable|counter|quota|limit|"
                     r"secmark|synproxy|ct\s+(?:helper|timeout|expectation))\s+(.*)", re.S)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")


_MARKS = re.compile(r'["#{}\n;]')


def _statements(text: str) -> list[str] | None:
    """An nft file's top-level statements (a `table X { ... }` block is one), comments left
    out; None when its braces or quotes do not balance. (Only the marks are visited: a set of
    100k elements is read at regex speed.)"""
    out: list[str] = []
    current: list[str] = []
    depth, quoted, start = 0, False, 0
    comment = -1                     # where the comment being skipped began
    for mark in _MARKS.finditer(text):
        char, at = mark.group(), mark.start()
        if comment >= 0:
            if char != "\n":
                continue
            comment, start = -1, at
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == "#":
            current.append(text[start:at])
            comment = at
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0:             # a newline or `;` ends a top-level statement
            current.append(text[start:at])
            out.append("".join(current).strip())
            current, start = [], at + 1
    if depth or quoted:
        return None
    if comment < 0:
        current.append(text[start:])
    out.append("".join(current).strip())
    return [s for s in out if s]


def change_tables(change: bytes) -> list[str] | None:
    """The tables an nft file writes to ("family name"), when every top-level statement names
    its table (`table inet x { ... }`, `add element ip t s { ... }`, `delete table x`: family
    ip when left out); None when one does not say (`flush ruleset`, `include`, `define`,
    variables, handles): then what the change touches is known only by reading the kernel."""
    statements = _statements(change.decode(errors="replace"))
    if statements is None:
        return None
    tables: dict[str, None] = {}
    for statement in statements:
        found = _WRITES.fullmatch(statement)
        if found is None:
            return None
        words = found.group(1).replace("{", " { ").split()
        family = words.pop(0) if words and words[0] in _FAMILIES else "ip"
        name = words[0] if words else ""
        if not _NAME.fullmatch(name) or name == "handle":
            return None
        tables[f"{family} {name}"] = None
    return list(tables)


def replaced_tables(change: bytes) -> list[str] | None:
    """The tables an nft file writes to when it deletes each of them first (`table x` /
    `delete table x` / `table x { ... }`): once loaded, each is exactly what the file says
    after its delete. None otherwise."""
    statements = _statements(change.decode(errors="replace"))
    tables = change_tables(change)
    if statements is None or tables is None:
        return None
    deleted = {" ".join(words[2:4]) if len(words) > 3 and words[2] in _FAMILIES
               else f"ip {words[2]}" for words in (s.split() for s in statements)
               if len(words) > 2 and words[0] in ("delete", "destroy") and words[1] == "table"}
    return tables if all(t in deleted for t in tables) else None


def describe_nft_error(stderr: str, change: bytes, source: str) -> tuple[str, int | None]:
    match = _NFT_ERROR.search(stderr)
    if not match:
        return f"{source}: {stderr.strip() or 'rejected by nft'}", None
    line_no = int(match.group(1))
    lines = change.decode(errors="replace").splitlines()
    text = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""
    return f"{source}:{line_no}: `{text}`: {match.group(3)}", line_no


class NftLayer(Layer):
    name = "nft"
    label = "nftables"
    tools = ("nft",)
    facts = frozenset({NETFILTER, NFT_TABLES, PREDICTED, ROLLBACK})
    restore_command = ("nft", "-f", "-")

    def available(self) -> bool:
        return find_binary("nft") is not None

    def _is_iptables_table(self, family: str, name: str) -> bool:
        return family in IPTABLES_FAMILIES and name in BUILTIN_CHAINS and uses_nf_tables()

    def _not_native(self, family: str, name: str) -> bool:
        """Not this layer's table: iptables-nft's, or the hatch's lo bridge (nobody's; seen,
        it is a hatch left behind for `fwsafe apply` to remove first, like its rules that
        `hatch_rules.strip` finds)."""
        if hatch_rules.is_bridge(family, name):
            RUN.hatch_seen = True
            return True
        return self._is_iptables_table(family, name)

    def in_nf_tables(self) -> bool:
        return True

    def native_tables(self) -> list[tuple[str, str]]:
        known = kernel_tables()   # a netlink dump: `nft list tables` builds its whole cache
        if known is not None:
            return [t for t in known if not self._not_native(*t)]
        result = run_persistently([require_binary("nft"), "-j", "list", "tables"], timeout=60)
        if result.returncode != 0:
            raise ApplyError(f"nft list tables failed: {result.stderr.decode(errors='replace')}")
        tables = []
        for item in json.loads(result.stdout or b"{}").get("nftables", []):
            table = item.get("table")
            if table and not self._not_native(table["family"], table["name"]):
                tables.append((str(table["family"]), str(table["name"])))
        return tables

    def capture(self) -> bytes:
        parts = []
        for family, name in self.native_tables():
            listed = libnft.list_table(family, name)     # None unless this command enabled it
            if listed is None:
                result = run_persistently([require_binary("nft"), "-s", "list", "table", family,
                                           name], timeout=120)
                if result.returncode != 0:
                    raise ApplyError(f"nft list table {family} {name} failed: "
                                     f"{result.stderr.decode(errors='replace').strip()}")
                listed = result.stdout
            parts.append(listed.decode(errors="replace").rstrip("\n") + "\n")
        return hatch_rules.strip("".join(parts).encode())   # the kernel escape hatch is nobody's rule

    def units(self, data: bytes) -> dict[str, str]:
        return split_tables(data.decode(errors="replace"))

    def recognises(self, content: bytes) -> bool:
        return looks_like_nft(content)

    def validate_text(self, change: bytes, source: str) -> None:
        text = change.decode(errors="replace")
        if not text.strip():
            raise InvalidRulesError(f"{source}: the file is empty; refusing to apply nothing",
                                    path=source)
        self._refuse_iptables_tables(text, source)
        line = line_starting(_IPTABLES_SYNTAX, text)
        if line is not None and not looks_like_nft(change):
            raise InvalidRulesError(f"{source}:{line}: this is iptables-save syntax, not nft",
                                    path=source, line=line)

    def validate(self, change: bytes, source: str) -> None:
        """The text's checks, then the kernel's verdict: `nft -c` runs the whole transaction
        and throws it away."""
        self.validate_text(change, source)
        result = run([require_binary("nft"), "-c", "-f", "-"], input=change, timeout=120)
        if result.returncode != 0:
            message, line_no = describe_nft_error(result.stderr.decode(errors="replace"), change,
                                                  source)
            raise InvalidRulesError(message, path=source, line=line_no)

    def _refuse_iptables_tables(self, text: str, source: str) -> None:
        """An nft file must not write to a table iptables-nft owns (ip/ip6 filter, nat, ...):
        fwsafe reads those through iptables-save, which prints nft's base chains and native
        expressions there as an empty or wrong table, so the change could not be undone.
        Refused (exit 3) before anything happens, naming the table."""
        for match in _TABLE_NAMED.finditer(text):
            family, name = match.group(1), match.group(2)
            if self._is_iptables_table(family, name):
                line = text.count("\n", 0, match.start()) + 1
                raise InvalidRulesError(
                    f"{source}:{line}: table {family} {name} belongs to iptables-nft here; "
                    f"fwsafe reads it through iptables-save, which cannot show what nft writes "
                    f"there, so this change could not be undone",
                    path=source, line=line,
                    hint=f"use another table name (e.g. `table {family} fw_{name}`), or change "
                         f"{family} {name} with an iptables-save file")

    def apply(self, change: bytes, source: str) -> None:
        result = run([require_binary("nft"), "-f", "-"], input=change, timeout=600)
        if result.returncode != 0:
            message, line_no = describe_nft_error(result.stderr.decode(errors="replace"), change,
                                                  source)
            raise ApplyError(message, line=line_no)

    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        if not units:
            return []
        start = nflist.generation()
        old = self.units(before)
        new = self.units(after) if after is not None else None
        now = (new if live is not None and live == after and new is not None
               else self.units(live or self.capture()))
        targets: dict[str, str | None] = {}
        for unit in units:
            if level == MERGE and new is not None:
                targets[unit] = merge_block(old.get(unit), new.get(unit), now.get(unit))
            else:
                targets[unit] = old.get(unit)
        script = []
        for unit, target in targets.items():
            # (`live` given: it may be the snapshot standing for the live state, without the
            # tables the change created; `add table` first makes the delete safe either way)
            if target is None and unit not in now and live is None:
                continue
            family, name = unit.split(" ", 1)
            script.append(f"add table {family} {name}\ndelete table {family} {name}\n")
            if target is not None:
                script.append(target + "\n")
        self.proved = None
        whole = _whole(now, targets)
        if script and start is not None and self.on_target is not None:
            self.on_target(whole)
        if script:
            result = run_persistently([require_binary("nft"), "-f", "-"],
                                      input="".join(script).encode(), timeout=600,
                                      on_retry=on_retry)
            if result.returncode != 0:
                raise ApplyError(f"nft refused the revert target: "
                                 f"{result.stderr.decode(errors='replace').strip()}")
        end = nflist.generation() if script and start is not None else None
        if start is not None and end == start + 1:
            # Proved by the kernel: since the live state was read, nf_tables committed our
            # one transaction and nothing else, so each table is its target, and the layer is
            # the live state read with those tables replaced.
            loaded = {unit: target for unit, target in targets.items() if target is not None}
            self.proved = (start, end, whole)
        else:
            loaded = self.units(self.capture())
        if level == MERGE and new is not None:
            # The proof: the change's delta is gone from the kernel's state (see iptables).
            return [f"nftables {problem}" for problem in delta_left(
                *(delta_items(t, list(targets)) for t in (old, new, now, loaded)))]
        return [f"nftables table {unit} differs from the computed target"
                for unit, target in targets.items()
                if canonical_block(loaded.get(unit)) != canonical_block(target)]
