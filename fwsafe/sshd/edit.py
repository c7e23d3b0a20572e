"""Changing sshd's configuration so that the new values win, with few and visible edits.

Where the main file includes a directory of drop-ins in its global section (Debian and Ubuntu:
`Include /etc/ssh/sshd_config.d/*.conf` at the top), the values go into fwsafe's own drop-in,
`00-fwsafe.conf`, which sorts before the usual ones (`50-cloud-init.conf`, ...): sshd reads it
first, and the first value read wins. A line that would still be read before it (the main file
above the Include, a drop-in sorting earlier) is commented out, saying so.

Without such an Include the main file itself is edited: the first line of the keyword is
replaced in place when it is the one sshd reads first, otherwise the new line goes above every
other directive.

Keywords whose lines add up (`Port`, `ListenAddress`, `AllowUsers`, ...) are set as a whole:
`Port=2222` means port 2222 only, so every other global line of the keyword is commented out
(for `Subsystem`, those of the same subsystem). Give such a key several times for several
values (`Port=22 Port=2222`). `Match` blocks are left alone: what they override for some
connections stays overridden (the lockout check asks sshd for the confirming user's values).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from fwsafe.errors import UsageError
from fwsafe.sshd.sshd_config import (
    ACCUMULATING,
    STRUCTURAL,
    Directive,
    Tree,
    default_reader,
    file_lines,
    parse_line,
    read_tree,
    split_words,
)

DROPIN_STEM = "00-fwsafe"
DROPIN_HEADER = (
    "# Written by fwsafe (`fwsafe sshd set` / `fwsafe sshd harden`), under its guard.\n"
    "# sshd reads this file before the others of this directory, and the first value it reads\n"
    "# wins: the values here are the ones in force. Change them with `fwsafe sshd set`.\n"
)
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


@dataclass(frozen=True)
class Setting:
    name: str                    # the keyword as given (sshd ignores the case)
    values: tuple[str, ...]      # one value; several for a keyword whose lines add up

    @property
    def keyword(self) -> str:
        return self.name.lower()

    def lines(self) -> list[str]:
        return [f"{self.name} {value}" for value in self.values]

    def describe(self) -> str:
        return ", ".join(f"{self.name}={value}" for value in self.values)


@dataclass
class Plan:
    """The new content of every file that changes, and what to tell the user."""

    files: dict[str, bytes] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    target: str = ""                     # where the values are written
    unchanged: list[str] = field(default_factory=list)   # settings already in force
    notes: list[str] = field(default_factory=list)


def parse_settings(items: Sequence[str]) -> list[Setting]:
    """KEY=VALUE items (or `KEY VALUE`) as settings, in the order given. A key given twice is
    a usage error unless its lines add up in sshd (Port, ListenAddress, AllowUsers, ...)."""
    order: list[str] = []
    names: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            key, _, value = item.strip().partition(" ")
        key, value = key.strip(), value.strip()
        if not _KEYWORD.match(key):
            raise UsageError(f"{item!r}: give KEY=VALUE, e.g. PasswordAuthentication=no")
        if not value or any(c in value for c in "\n\r\0"):
            raise UsageError(f"{item!r}: the value must be one non-empty line")
        keyword = key.lower()
        if keyword in STRUCTURAL:
            raise UsageError(f"{key} cannot be set with fwsafe: edit the file for that")
        if keyword in values and keyword not in ACCUMULATING:
            raise UsageError(f"{key} given twice: sshd uses a single value for it")
        if keyword not in values:
            order.append(keyword)
            names[keyword] = key
            values[keyword] = []
        values[keyword].append(value)
    return [Setting(names[k], tuple(values[k])) for k in order]


def same_setting(directive: Directive, setting: Setting) -> bool:
    """Does this line set what `setting` sets? (For Subsystem: the same subsystem.)"""
    if directive.keyword != setting.keyword:
        return False
    if setting.keyword == "subsystem":
        mine = {split_words(v)[0] for v in setting.values if split_words(v)}
        words = split_words(directive.value)
        return bool(words) and words[0] in mine
    return True


def _normal(value: str) -> str:
    return " ".join(split_words(value))


def in_force(tree: Tree, setting: Setting) -> bool:
    """Does the configuration already say this (for the global section)?"""
    present = [d for d in tree.global_directives(setting.keyword) if same_setting(d, setting)]
    wanted = [_normal(v) for v in setting.values]
    if setting.keyword in ACCUMULATING:
        return [_normal(d.value) for d in present] == wanted
    return bool(present) and _normal(present[0].value) == wanted[0]


def dropin_path(tree: Tree) -> str | None:
    """fwsafe's drop-in, where the main file includes a directory of them (globally)."""
    for site in tree.includes:
        if site.path != tree.main or site.block != 0:
            continue
        for pattern in site.patterns:
            directory, base = os.path.split(pattern)
            if glob.has_magic(directory) or not base.startswith("*") \
                    or glob.has_magic(base[1:]):
                continue
            return os.path.join(directory, DROPIN_STEM + base[1:])
    return None


class _Edits:
    """Line edits of the files of a tree: replacements by line number, lines put on top."""

    def __init__(self) -> None:
        self.replace: dict[str, dict[int, list[str] | str]] = {}
        self.top: dict[str, list[str]] = {}

    def set_line(self, path: str, number: int, lines: list[str]) -> None:
        self.replace.setdefault(path, {})[number] = lines

    def comment_out(self, directive: Directive, where: str) -> None:
        """The line stays, as a comment saying why (its bytes as they were)."""
        self.replace.setdefault(directive.path, {})[directive.number] = where

    def put_on_top(self, path: str, lines: list[str]) -> None:
        self.top.setdefault(path, []).extend(lines)

    def apply(self, path: str, original: bytes) -> bytes:
        if path not in self.replace and path not in self.top:
            return original
        text = original.decode("utf-8", errors="surrogateescape")
        lines = file_lines(text, keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        out: list[str] = []
        replace = self.replace.get(path, {})
        for number, line in enumerate(lines, 1):
            if number in replace:
                ending = "\r\n" if line.endswith("\r\n") else "\n"
                edit = replace[number]
                if isinstance(edit, str):
                    edit = [f"# {line.strip()}  # fwsafe: superseded by {edit}"]
                out.extend(new + ending for new in edit)
            else:
                out.append(line)
        top = [line + "\n" for line in self.top.get(path, [])]
        if top:
            first = next((i for i, line in enumerate(out)
                          if line.strip() and not line.lstrip().startswith("#")), len(out))
            out[first:first] = top
        return "".join(out).encode("utf-8", errors="surrogateescape")


def _dropin_content(current: bytes | None, settings: list[Setting]) -> bytes:
    """fwsafe's drop-in with `settings` in it (their earlier lines replaced)."""
    text = current.decode("utf-8", errors="surrogateescape") if current is not None \
        else DROPIN_HEADER
    lines = file_lines(text)
    for setting in settings:
        kept: list[str] = []
        spot: int | None = None
        for line in lines:
            parsed = parse_line(line)
            if parsed is not None and same_setting(Directive("", 0, *parsed, 0), setting):
                if spot is None:
                    spot = len(kept)
                continue
            kept.append(line)
        at = len(kept) if spot is None else spot
        kept[at:at] = setting.lines()
        lines = kept
    return ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape")


def plan_settings(tree: Tree, settings: list[Setting]) -> Plan:
    """The files to write so that `settings` are the global values sshd uses."""
    plan = Plan()
    todo = [s for s in settings if not in_force(tree, s)]
    plan.unchanged = [s.describe() for s in settings if s not in todo]
    if not todo:
        plan.target = tree.main
        return plan
    edits = _Edits()
    dropin = dropin_path(tree)
    if dropin is not None:
        plan.target = dropin
        content = _dropin_content(tree.files.get(dropin), todo)
        if dropin not in tree.files:
            plan.created.append(dropin)
        candidate = read_tree(tree.main, {dropin: content},
                              reader=lambda p: tree.files[p] if p in tree.files
                              else default_reader(p))
        for setting in todo:
            ours = [i for i, d in enumerate(candidate.directives)
                    if d.path == dropin and d.block == 0 and same_setting(d, setting)]
            for index, directive in enumerate(candidate.directives):
                if directive.path == dropin or directive.block != 0 \
                        or not same_setting(directive, setting):
                    continue
                if setting.keyword in ACCUMULATING or (ours and index < ours[0]):
                    edits.comment_out(directive, dropin)
        new_files = {dropin: content}
    else:
        plan.target = tree.main
        for setting in todo:
            present = [d for d in tree.global_directives(setting.keyword)
                       if same_setting(d, setting)]
            in_main = [d for d in present if d.path == tree.main]
            if setting.keyword in ACCUMULATING:
                keep = in_main[0] if in_main else None
                for directive in present:
                    if directive is not keep:
                        edits.comment_out(directive, f"{setting.name} in {tree.main}")
            else:
                keep = present[0] if present and present[0].path == tree.main else None
            if keep is not None:
                edits.set_line(keep.path, keep.number, setting.lines())
            else:
                edits.put_on_top(tree.main, setting.lines())
        new_files = {}
    for path, original in tree.files.items():
        if path in new_files:
            continue
        changed = edits.apply(path, original)
        if changed != original:
            new_files[path] = changed
    plan.files = {p: c for p, c in new_files.items() if tree.files.get(p) != c}
    touched_others = sorted(p for p in plan.files if p != plan.target)
    if touched_others:
        plan.notes.append("commented out other lines of the same settings, in "
                          + ", ".join(touched_others))
    return plan
