"""Crash-safe file replacement, and paths under a mounted root.

Standard library only, Python 3.9+: the rescue zipapp carries this module.

`write_file_atomically` is fwsafe's one writer, for the state directory (fwsafe.core.statedir)
as for the files the system loads (ufw's, the boot files, the boot unit, the rescue's backups):

* the content goes to a new temporary file next to the target: a random name, created with
  O_EXCL|O_NOFOLLOW and mode 0600, so that a file or symlink planted under that name is never
  opened, let alone written through, and nobody reads the content before it is complete;
* the owner is set (`owner`, or the replaced file's with `keep_owner`), then the mode (`mode`,
  else the replaced file's with `keep_mode`, else `default_mode`), on the descriptor, never
  through a path;
* the file is fsync'ed, renamed over the target (a symlink at the target is replaced, never
  followed: on a mounted disk it may point into the rescue system), and the directory is
  fsync'ed: after a crash the target holds its old or its new content, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

TEMP_MODE = 0o600        # a temporary file, until its final owner and mode are set
TEMP_ATTEMPTS = 8        # random names tried before giving up
BACKUP_SUFFIX = ".fwsafe-bak"   # a file fwsafe put aside before replacing it (the rescue's)


class TempFileError(FileExistsError):
    """No temporary file could be created next to the target: every name tried exists."""


def local_path(root: Path, path: str) -> Path:
    """Where the server path `path` is under `root`."""
    return Path(root) / path.lstrip("/")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or a removal in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new temporary file next to `target`: a random name, O_EXCL|O_NOFOLLOW, mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(TEMP_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            return tmp, os.open(tmp, flags, TEMP_MODE)
        except FileExistsError:
            continue
    raise TempFileError(f"cannot create a temporary file next to {target}: every name tried "
                        "exists")


def write_file_atomically(target: Path, content: bytes, mode: int | None = None, *,
                          default_mode: int = TEMP_MODE, keep_mode: bool = True,
                          keep_owner: bool = False,
                          owner: tuple[int, int] | None = None) -> None:
    """Replace `target` by `content`, atomically and durably (see the module's doc).

    Mode: `mode` if given; else, with `keep_mode`, that of the regular file replaced; else
    `default_mode`. Owner: `owner` (uid, gid) if given; else, with `keep_owner`, that of the
    regular file replaced; else the writer's. Raises IsADirectoryError when `target` is a
    directory, TempFileError (a FileExistsError) when no temporary name is free.
    """
    target = Path(target)
    try:
        old: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(f"{target} is a directory")
    replaced = old if old is not None and stat.S_ISREG(old.st_mode) else None
    if mode is None:
        mode = stat.S_IMODE(replaced.st_mode) if keep_mode and replaced is not None \
            else default_mode
    if owner is None and keep_owner and replaced is not None:
        owner = (replaced.st_uid, replaced.st_gid)
    tmp, fd = _create_temp(target)
    try:
        try:
            view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(fd, *owner)
            os.fchmod(fd, mode & 0o7777)  # after fchown, which may clear set-id bits
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
