"""ufw's files as one serialised layer.

Standard library only, Python 3.9+: the rescue zipapp carries this module.

Format (JSON, keys sorted, so that equal files give equal bytes)::

    {"files": {"/etc/ufw/user.rules": {"mode": 416, "data": "<base64>"}, ...}}

It covers the files ufw reads (and its own commands write): ``/etc/ufw/*.rules``,
``/etc/ufw/ufw.conf``, ``/etc/ufw/sysctl.conf``, ``/etc/ufw/applications.d/*`` and
``/etc/default/ufw``. Paths are absolute as on the server; `root` maps them onto a mounted disk
(``root=/mnt`` reads ``/mnt/etc/ufw/user.rules``). Only regular files are captured; symlinks
and anything else are left alone, both by a capture and by a restore.

A restore writes each file atomically (fwsafe.ondisk.atomic_files: temporary file, fsync, rename,
fsync of the directory) with the mode from the snapshot, keeping the owner of the file it
replaces, and removes the
covered files that did not exist when the snapshot was taken. A path in a snapshot that is not
one of the covered ones is refused: a damaged or crafted snapshot can never write elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from pathlib import Path

from fwsafe.ondisk.atomic_files import BACKUP_SUFFIX, fsync_dir, local_path, write_file_atomically

UFW_DIR = "/etc/ufw"
DEFAULT_FILE = "/etc/default/ufw"
APPLICATIONS_DIR = "/etc/ufw/applications.d"

# The covered paths. A file name may not start with "." (temporary files of ours and others).
_COVERED = re.compile(
    r"^(?:/etc/ufw/[^/.][^/]*\.rules"
    r"|/etc/ufw/ufw\.conf"
    r"|/etc/ufw/sysctl\.conf"
    r"|/etc/ufw/applications\.d/[^/.][^/]*"
    r"|/etc/default/ufw)$"
)
# Editors' and package managers' leftovers in applications.d are not profiles of the system.
_IGNORED_SUFFIXES = (BACKUP_SUFFIX, ".dpkg-old", ".dpkg-new", ".dpkg-dist", ".ucf-old", "~")


class UfwFilesError(ValueError):
    """A serialised ufw layer that is damaged or names a path outside ufw's files."""


def is_ufw_path(path: str) -> bool:
    """True for an absolute server path that this layer covers (and may therefore write)."""
    if "\0" in path or "/../" in path or path.endswith("/..") or "//" in path:
        return False
    return bool(_COVERED.match(path)) and not path.endswith(_IGNORED_SUFFIXES)


def ufw_paths(root: Path = Path("/")) -> list[str]:
    """The covered ufw files that exist under `root` (regular files only), sorted."""
    found: list[str] = []
    candidates: list[str] = []
    base = local_path(root, UFW_DIR)
    if base.is_dir() and not base.is_symlink():
        candidates += [f"{UFW_DIR}/{name}" for name in os.listdir(base)]
        apps = local_path(root, APPLICATIONS_DIR)
        if apps.is_dir() and not apps.is_symlink():
            candidates += [f"{APPLICATIONS_DIR}/{name}" for name in os.listdir(apps)]
    candidates.append(DEFAULT_FILE)
    for path in candidates:
        if not is_ufw_path(path):
            continue
        try:
            st = os.lstat(local_path(root, path))
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append(path)
    return sorted(found)


def dump_ufw_files(files: dict[str, tuple[int, bytes]]) -> bytes:
    """Serialise {server path: (mode, content)} in the layer's format."""
    for path in files:
        if not is_ufw_path(path):
            raise UfwFilesError(f"not a ufw file: {path!r}")
    body = {path: {"mode": mode & 0o777, "data": base64.b64encode(content).decode("ascii")}
            for path, (mode, content) in sorted(files.items())}
    return json.dumps({"files": body}, sort_keys=True, indent=1).encode() + b"\n"


def read_ufw_files(root: Path = Path("/")) -> dict[str, tuple[int, bytes]]:
    """{server path: (mode, content)} of the covered files under `root`."""
    files: dict[str, tuple[int, bytes]] = {}
    for path in ufw_paths(root):
        local = local_path(root, path)
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            with os.fdopen(os.dup(fd), "rb") as handle:
                content = handle.read()
        finally:
            os.close(fd)
        files[path] = (stat.S_IMODE(st.st_mode), content)
    return files


def capture_ufw_files(root: Path = Path("/")) -> bytes:
    """ufw's files under `root`, serialised (an empty {"files": {}} when ufw is absent)."""
    return dump_ufw_files(read_ufw_files(root))


def load_ufw_files(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a serialised layer: {server path: (mode, content)}.

    Raises UfwFilesError (a ValueError) when it is damaged or names a path outside ufw's files.
    """
    try:
        top = json.loads(data.decode("utf-8") if data.strip() else "{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise UfwFilesError(f"damaged ufw snapshot: not JSON ({exc})") from exc
    if not isinstance(top, dict):
        raise UfwFilesError("damaged ufw snapshot: not a JSON object")
    files = top.get("files", {})
    if not isinstance(files, dict):
        raise UfwFilesError("damaged ufw snapshot: 'files' is not an object")
    out: dict[str, tuple[int, bytes]] = {}
    for path, entry in files.items():
        if not isinstance(path, str) or not is_ufw_path(path):
            raise UfwFilesError(f"damaged ufw snapshot: {path!r} is not one of ufw's files")
        if not isinstance(entry, dict):
            raise UfwFilesError(f"damaged ufw snapshot: entry of {path} is not an object")
        mode, encoded = entry.get("mode"), entry.get("data")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise UfwFilesError(f"damaged ufw snapshot: bad mode for {path}: {mode!r}")
        if not isinstance(encoded, str):
            raise UfwFilesError(f"damaged ufw snapshot: no data for {path}")
        try:
            content = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise UfwFilesError(f"damaged ufw snapshot: bad base64 for {path}: {exc}") from exc
        out[path] = (mode & 0o777, content)
    return out


def ufw_files_text(data: bytes) -> dict[str, str]:
    """{server path: text} of a serialised layer, for diffs and display."""
    return {path: content.decode("utf-8", errors="replace")
            for path, (_, content) in load_ufw_files(data).items()}


def restore_ufw_files(data: bytes, root: Path = Path("/"), paths: list[str] | None = None) -> None:
    """Put ufw's files back as in the serialised layer `data`, under `root`.

    Every file of the snapshot is written (atomically, with its mode); a covered file that is
    not in the snapshot is removed (it did not exist then). With `paths`, only those files are
    handled. Raises UfwFilesError for a damaged snapshot before anything is written.
    """
    files = load_ufw_files(data)
    if paths is None:
        chosen = sorted(set(files) | set(ufw_paths(root)))
    else:
        chosen = list(paths)
        bad = [p for p in chosen if not is_ufw_path(p)]
        if bad:
            raise UfwFilesError(f"not ufw files: {', '.join(bad)}")
    for path in chosen:
        target = local_path(root, path)
        if path in files:
            mode, content = files[path]
            if not target.parent.is_dir():
                target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_file_atomically(target, content, mode, keep_owner=True)
        else:
            try:
                st = os.lstat(target)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                target.unlink()
                fsync_dir(target.parent)
