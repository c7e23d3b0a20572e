"""A change: what to apply (the new content of each layer, or a command run under the guard),
read from files with every way of failing made a clear exit-3 error, and validated by the
backends' own tools before anything is captured or changed.
"""

from __future__ import annotations

import errno
import os
import select
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fwsafe.backends import compose_partial, layer_for
from fwsafe.core.config import DEFAULT_MAX_RULES_BYTES
from fwsafe.errors import EnvironmentProblem, InvalidRulesError, UsageError
from fwsafe.runner import find_binary

MAX_RULES_BYTES = DEFAULT_MAX_RULES_BYTES  # max_rules_bytes in the config


@dataclass
class Change:
    """A change to apply: the new content of each layer it touches, and where it came from."""

    layers: dict[str, bytes] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    run: list[str] | None = None      # command mode: a command (e.g. ufw ...) run under the guard
    notes: list[str] = field(default_factory=list)
    partial: bool = False             # replace only the chains (nft: tables) the files name

    def add(self, layer: str, content: bytes, source: str) -> None:
        self.layers[layer] = content
        self.sources[layer] = source


def resolve_partial(change: Change, live: Mapping[str, bytes]) -> Change:
    """The change as complete files (what validation, the check and the diff look at)."""
    if not change.partial or change.run is not None:
        return change
    layers = {name: compose_partial(name, content, live.get(name))
              for name, content in change.layers.items()}
    return Change(layers=layers, sources=dict(change.sources), notes=list(change.notes))


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _read_capped(fd: int, limit: int, name: str) -> bytes:
    """Everything up to end of file, refusing more than `limit` bytes (exit 3)."""
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))
        except BlockingIOError:  # a non-blocking standard input: wait for data
            select.select([fd], [], [])
            continue
        except InterruptedError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise InvalidRulesError(
                f"{name}: larger than the limit of {_size_text(limit)} (max_rules_bytes); "
                "nothing was changed", path=name)


def read_rules_file(path: str, limit: int | None = None, *,
                    notes: list[str] | None = None) -> bytes:
    """Read a rules file: a regular file (a symlink to one is fine) or `-` for standard input,
    at most `limit` bytes (max_rules_bytes; 64 MiB by default). Every way this can fail is a
    clear exit-3 error naming the file, and none can hang: a directory, FIFO, device or socket
    is refused unread (stat first; then opened O_NONBLOCK and checked again with fstat).

    Windows line ends (CRLF, as an editor or a copy from Windows leaves them) are turned into
    plain ones, and `notes` gets a line saying so (neither iptables-restore nor nft reads them);
    a carriage return anywhere else is refused, naming the line."""
    limit = MAX_RULES_BYTES if limit is None else limit
    if path == "-":
        try:
            data = _read_capped(0, limit, "standard input")
        except OSError as exc:
            raise InvalidRulesError(f"standard input: cannot read: {exc.strerror}",
                                    path=path) from exc
    else:
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise InvalidRulesError(f"{path}: is {_file_kind(mode)}, not a rules file",
                                        path=path)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise InvalidRulesError(f"{path}: no such file", path=path) from exc
        except PermissionError as exc:
            raise InvalidRulesError(f"{path}: permission denied", path=path) from exc
        except OSError as exc:
            why = "is a socket" if exc.errno == errno.ENXIO else f"cannot read: {exc.strerror}"
            raise InvalidRulesError(f"{path}: {why}", path=path) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
                raise InvalidRulesError(f"{path}: is {_file_kind(st.st_mode)}, not a rules file",
                                        path=path)
            if st.st_size > limit:
                raise InvalidRulesError(
                    f"{path}: {_size_text(st.st_size)}, larger than the limit of "
                    f"{_size_text(limit)} (max_rules_bytes); nothing was changed", path=path)
            data = _read_capped(fd, limit, path)
        except OSError as exc:
            raise InvalidRulesError(f"{path}: cannot read: {exc.strerror}", path=path) from exc
        finally:
            os.close(fd)
    if b"\0" in data:
        raise InvalidRulesError(f"{path}: binary data, not a rules file", path=path)
    return _plain_line_ends(data, path, notes)


def _plain_line_ends(data: bytes, path: str, notes: list[str] | None) -> bytes:
    """`data` with CRLF line ends made LF (said in `notes`); a lone CR is an exit-3 error."""
    if b"\r" not in data:
        return data
    converted = data.replace(b"\r\n", b"\n")
    stray = converted.find(b"\r")
    if stray >= 0:
        line = converted.count(b"\n", 0, stray) + 1
        raise InvalidRulesError(
            f"{path}:{line}: a carriage return (\\r) inside a line; rules files have one rule "
            "a line, ended by a newline; nothing was changed", path=path, line=line,
            hint="convert the file's line ends (dos2unix, or sed -i 's/\\r$//' FILE)")
    lines = data.count(b"\r\n")
    if notes is not None:
        notes.append(f"{path}: Windows line ends (CRLF) on {lines} line"
                     f"{'s' if lines != 1 else ''}: read as plain newlines (LF)")
    return converted


def change_from_files(paths: Sequence[str], rules6: str | None, backend: str = "auto", *,
                      limit: int | None = None) -> Change:
    """A Change from rules files: iptables-save (IPv4) or nft files (recognised by content, or
    `backend`), at most one of each, and an ip6tables-save file. Every read error is exit 3;
    `limit` is max_rules_bytes."""
    change = Change()
    for path in paths:
        content = read_rules_file(path, limit, notes=change.notes)
        nft = backend == "nft" or (backend == "auto" and layer_for("nft").recognises(content))
        layer = "nft" if nft else "ipv4"
        if layer in change.layers:
            raise UsageError(f"{path}: a second {'nft' if nft else 'IPv4'} rules file; give at most "
                             "one iptables-save file (IPv4), one nft file and --rules6 for IPv6")
        change.add(layer, content, path)
    if rules6:
        change.add("ipv6", read_rules_file(rules6, limit, notes=change.notes), rules6)
    return change


def require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "fwsafe must run as root to change the firewall (try: sudo fwsafe ...)")


def one_transaction(change: Change) -> bool:
    """The change is one nft file, loaded by the guard as one `nft -f` transaction: the kernel
    applies all of it or nothing (a refused file changes nothing)."""
    return change.run is None and list(change.layers) == ["nft"]


def validate_change(change: Change, *, by_transaction: bool = False) -> None:
    """Refuse a change that cannot work, before anything is captured or changed (exit 3).
    `by_transaction`: a change that is one nft transaction (`one_transaction`) is validated by
    that transaction itself, under the guard (`apply --no-check`, issue 27): its text is
    checked here, not loaded a first time with `nft -c`."""
    if change.run is not None:
        if not change.run:
            raise UsageError("give the command to run after `--`, e.g. -- ufw deny 23/tcp")
        if find_binary(change.run[0]) is None and not os.access(change.run[0], os.X_OK):
            raise InvalidRulesError(f"{change.run[0]}: command not found; nothing was changed")
        return
    for name, content in change.layers.items():
        layer = layer_for(name)
        layer.check_tools()
        if by_transaction and one_transaction(change):
            layer.validate_text(content, change.sources[name])
        else:
            layer.validate(content, change.sources[name])


