"""sshd_config as sshd reads it: the main file, `Include`d files expanded in place (globs
sorted, relative patterns under /etc/ssh), `Match` blocks, and the read order that decides which
value wins.

sshd takes the FIRST value it reads for most keywords; a few accumulate instead (every `Port`,
`ListenAddress`, `AllowUsers` ... line adds to the list). A `Match` block lasts to the next
`Match` or the end of its file: an included file never changes the `Match` state of the file
that includes it. Values in the blocks that match a connection override the global ones.

`Tree.flatten()` writes the whole tree as one file that sshd reads the same way (the global
lines in read order, then every `Match` block in order), so that a candidate made of several
files (an edited main file, a new drop-in) can be tested with `sshd -t -f FLAT` and
`sshd -T -f FLAT -C ...` before anything on disk changes. A `overlay` ({path: content, or None
for a file that is to be removed}) stands for files as they will be.

Standard library only.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Optional

SSHD_CONFIG = "/etc/ssh/sshd_config"
SSHDIR = "/etc/ssh"          # where sshd resolves a relative Include
MAX_DEPTH = 16               # sshd's own limit of nested Includes
_LINE = re.compile(r"^([^\s=]+)(?:\s*=\s*|\s+|$)(.*)$")

# Keywords whose every line adds to a list (all others: the first value read wins).
ACCUMULATING = frozenset({
    "port", "listenaddress", "hostkey", "hostcertificate", "allowusers", "denyusers",
    "allowgroups", "denygroups", "acceptenv", "subsystem",
})
# Keywords `fwsafe sshd set` cannot set (they are structure, not settings).
STRUCTURAL = frozenset({"include", "match"})

Overlay = Mapping[str, Optional[bytes]]
Reader = Callable[[str], Optional[bytes]]


class SshdConfigError(ValueError):
    """The configuration cannot be read (a missing main file, Includes nested too deep)."""


@dataclass(frozen=True)
class Directive:
    """One configuration line: where it is, what it says, which block it belongs to."""

    path: str
    number: int      # 1-based line number in `path`
    name: str        # the keyword as written
    value: str
    block: int       # 0: the global section; n: the n-th Match block in read order

    @property
    def keyword(self) -> str:
        return self.name.lower()

    def text(self) -> str:
        return f"{self.name} {self.value}".rstrip()


@dataclass(frozen=True)
class IncludeSite:
    path: str
    number: int
    patterns: tuple[str, ...]    # absolute (relative ones are under /etc/ssh)
    block: int


@dataclass
class Flat:
    """The tree as one file; `origins[n - 1]` is where line n of `text` comes from."""

    text: str
    origins: list[tuple[str, int]] = field(default_factory=list)

    def explain(self, message: str, flat_path: str) -> str:
        """sshd names lines of the flattened file: name the real file and line instead."""
        def origin(match: re.Match[str]) -> str:
            number = int(match.group(1))
            if 1 <= number <= len(self.origins):
                path, line = self.origins[number - 1]
                return f"{path} line {line}"
            return match.group(0)

        return re.sub(re.escape(flat_path) + r":? line (\d+)", origin, message)


@dataclass
class Tree:
    """A configuration as sshd reads it: every file, every directive in read order."""

    main: str
    files: dict[str, bytes] = field(default_factory=dict)   # read order, main first
    directives: list[Directive] = field(default_factory=list)
    includes: list[IncludeSite] = field(default_factory=list)
    matches: dict[int, str] = field(default_factory=dict)    # block -> Match criteria

    def global_directives(self, keyword: str | None = None) -> list[Directive]:
        return [d for d in self.directives
                if d.block == 0 and (keyword is None or d.keyword == keyword.lower())]

    def first(self, keyword: str) -> Directive | None:
        found = self.global_directives(keyword)
        return found[0] if found else None

    def value(self, keyword: str, default: str | None = None) -> str | None:
        """The global value sshd uses for a first-wins keyword (None: sshd's default)."""
        first = self.first(keyword)
        return first.value if first is not None else default

    def flatten(self) -> Flat:
        flat = Flat("")
        lines: list[str] = []

        def emit(text: str, origin: tuple[str, int]) -> None:
            lines.append(text)
            flat.origins.append(origin)

        for directive in self.global_directives():
            emit(directive.text(), (directive.path, directive.number))
        for block, criteria in sorted(self.matches.items()):
            start = next((d for d in self.directives if d.block == block), None)
            emit(f"Match {criteria}", (start.path, start.number) if start else (self.main, 0))
            for directive in self.directives:
                if directive.block == block:
                    emit(directive.text(), (directive.path, directive.number))
        flat.text = "\n".join(lines) + "\n"
        return flat


def split_words(value: str) -> list[str]:
    """A value's words as sshd splits them (quotes, a trailing comment)."""
    try:
        return shlex.split(value, comments=True)
    except ValueError:
        return value.split()


def file_lines(text: str, *, keepends: bool = False) -> list[str]:
    """The lines of a file as sshd splits it: at newlines only."""
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
    return lines if keepends else [line.rstrip("\n") for line in lines]


def parse_line(raw: str) -> tuple[str, str] | None:
    """(keyword as written, value) of a configuration line; None for a blank or comment."""
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    match = _LINE.match(line)
    if not match:
        return None
    return match.group(1), match.group(2).strip()


def include_pattern(word: str, sshdir: str = SSHDIR) -> str:
    if word.startswith("~"):
        return os.path.expanduser(word)
    return word if os.path.isabs(word) else os.path.join(sshdir, word)


def pattern_matches(pattern: str, path: str) -> bool:
    """Would sshd's glob of `pattern` find `path`? (`*` does not cross `/`, nor match a
    leading dot.)"""
    if pattern.count("/") != path.count("/"):
        return False
    for part, name in zip(pattern.split("/"), path.split("/")):
        if not glob.has_magic(part):
            if part != name:
                return False
        elif name.startswith(".") or not fnmatch.fnmatchcase(name, part):
            return False
    return True


def expand(pattern: str, overlay: Overlay) -> list[str]:
    """The files an Include pattern reads, sorted as sshd's glob(3) sorts them."""
    found = {p for p in glob.glob(pattern) if os.path.isfile(p)}
    for path, content in overlay.items():
        if pattern_matches(pattern, path):
            if content is None:
                found.discard(path)
            else:
                found.add(path)
    return sorted(found)


def default_reader(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def read_tree(main: str, overlay: Overlay | None = None, *, reader: Reader | None = None,
              sshdir: str = SSHDIR) -> Tree:
    """Read `main` and everything it includes, as sshd would (files in `overlay` as given
    there). Raises SshdConfigError when the main file does not exist or Includes nest too
    deep; other files that vanish meanwhile are skipped, as sshd skips a glob that matches
    nothing."""
    changes = dict(overlay or {})
    read = reader or default_reader
    tree = Tree(main=main)
    counter = [0]

    def content_of(path: str) -> bytes | None:
        return changes[path] if path in changes else read(path)

    def parse(path: str, data: bytes, block: int, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SshdConfigError(f"{path}: Includes nested deeper than {MAX_DEPTH}")
        tree.files.setdefault(path, data)
        current = block
        for number, raw in enumerate(file_lines(data.decode("utf-8", errors="replace")), 1):
            parsed = parse_line(raw)
            if parsed is None:
                continue
            name, value = parsed
            keyword = name.lower()
            if keyword == "match":
                counter[0] += 1
                current = counter[0]
                tree.matches[current] = value
                continue
            if keyword == "include":
                patterns = tuple(include_pattern(w, sshdir) for w in split_words(value))
                tree.includes.append(IncludeSite(path, number, patterns, current))
                for pattern in patterns:
                    for included in expand(pattern, changes):
                        text = content_of(included)
                        if text is not None:
                            parse(included, text, current, depth + 1)
                continue
            tree.directives.append(Directive(path, number, name, value, current))

    data = content_of(main)
    if data is None:
        raise SshdConfigError(f"{main}: no such file")
    parse(main, data, 0, 0)
    return tree
