"""firewalld's permanent configuration (/etc/firewalld) as one serialised part of a layer.

Standard library only, Python 3.9+: the rescue zipapp may carry this module.

Format (JSON, keys sorted, so that equal trees give equal bytes)::

    {"dirs": {"/etc/firewalld/zones": [493, 0, 0], ...},
     "files": {"/etc/firewalld/zones/public.xml": [420, 0, 0, "<base64>"], ...}}

(mode, uid, gid[, content]). Every regular file and directory below /etc/firewalld is covered
(zones, policies, services, ipsets, helpers, icmptypes, direct.xml, firewalld.conf, the
``*.xml.old`` backups firewall-cmd writes); symlinks and anything else are left alone. A path
outside /etc/firewalld in a snapshot is refused: a damaged or crafted snapshot can never write
elsewhere. A restore writes each file atomically (fwsafe.ondisk.atomic_files) with its mode and owner,
creates the directories that are missing, and removes the files (and then the empty
directories) that did not exist when the snapshot was taken: the tree comes back
byte-identical.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from fwsafe.ondisk.atomic_files import fsync_dir, local_path, write_file_atomically

FIREWALLD_DIR = "/etc/firewalld"
# firewalld's tables in the kernel: made by firewalld from its model at every start and
# reload; reverted through firewalld, never loaded by fwsafe (not even from a boot file).
# `inet firewalld_policy_drop`: its panic mode (and the drop during a reload).
FIREWALLD_TABLES = frozenset({"inet firewalld", "ip firewalld", "ip6 firewalld",
                              "inet firewalld_policy_drop"})

FILES_ONLY = "files_only"   # a layer without firewalld's runtime (files_only_layer)

Entry = tuple[int, int, int]                     # mode, uid, gid
FileEntry = tuple[int, int, int, bytes]          # mode, uid, gid, content


class FirewalldFilesError(ValueError):
    """A serialised /etc/firewalld that is damaged or names a path outside it."""


def is_firewalld_path(path: str) -> bool:
    """True for an absolute server path below /etc/firewalld (which a restore may write)."""
    if "\0" in path or "//" in path or path.endswith("/"):
        return False
    parts = path.split("/")
    return path.startswith(FIREWALLD_DIR + "/") and ".." not in parts and "." not in parts


def read_tree(root: Path = Path("/")) -> tuple[dict[str, Entry], dict[str, FileEntry]]:
    """({dir: entry}, {file: entry with content}) below /etc/firewalld under `root`."""
    dirs: dict[str, Entry] = {}
    files: dict[str, FileEntry] = {}
    base = local_path(root, FIREWALLD_DIR)
    if not base.is_dir() or base.is_symlink():
        return dirs, files
    pending = [FIREWALLD_DIR]
    while pending:
        current = pending.pop()
        for name in sorted(os.listdir(local_path(root, current))):
            path = f"{current}/{name}"
            local = local_path(root, path)
            st = os.lstat(local)
            if stat.S_ISDIR(st.st_mode):
                dirs[path] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
                pending.append(path)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    with os.fdopen(os.dup(fd), "rb") as handle:
                        content = handle.read()
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                files[path] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, content)
    return dirs, files


def tree_json(dirs: dict[str, Entry], files: dict[str, FileEntry]) -> dict[str, Any]:
    """The tree as the JSON object of the format above."""
    return {"dirs": {p: list(e) for p, e in sorted(dirs.items())},
            "files": {p: [m, u, g, base64.b64encode(c).decode("ascii")]
                      for p, (m, u, g, c) in sorted(files.items())}}


def files_only_layer(root: Path = Path("/")) -> bytes:
    """A firewalld layer of the files alone (``"files_only": true``, no runtime model): what
    the power-cycle recovery knows (firewalld's runtime is not on the disk). A rollback of
    it puts the files back and reloads firewalld (fwsafe.backends.firewalld_layer)."""
    state = {FILES_ONLY: True, **tree_json(*read_tree(root))}
    return json.dumps(state, sort_keys=True, indent=1).encode() + b"\n"


def _ints(value: Any, count: int, path: str) -> list[int]:
    if (not isinstance(value, list) or len(value) < count
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in value[:count])):
        raise FirewalldFilesError(f"damaged firewalld snapshot: bad entry for {path}")
    return list(value[:count])


def tree_from_json(top: Any) -> tuple[dict[str, Entry], dict[str, FileEntry]]:
    """Parse the JSON object; raises FirewalldFilesError when damaged or outside the tree."""
    if not isinstance(top, dict):
        raise FirewalldFilesError("damaged firewalld snapshot: not a JSON object")
    dirs: dict[str, Entry] = {}
    files: dict[str, FileEntry] = {}
    for path, value in (top.get("dirs") or {}).items():
        if not isinstance(path, str) or not is_firewalld_path(path):
            raise FirewalldFilesError(f"damaged firewalld snapshot: {path!r} is not below "
                                      f"{FIREWALLD_DIR}")
        mode, uid, gid = _ints(value, 3, path)
        dirs[path] = (mode & 0o7777, uid, gid)
    for path, value in (top.get("files") or {}).items():
        if not isinstance(path, str) or not is_firewalld_path(path):
            raise FirewalldFilesError(f"damaged firewalld snapshot: {path!r} is not below "
                                      f"{FIREWALLD_DIR}")
        mode, uid, gid = _ints(value, 3, path)
        if len(value) != 4 or not isinstance(value[3], str):
            raise FirewalldFilesError(f"damaged firewalld snapshot: no data for {path}")
        try:
            content = base64.b64decode(value[3].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise FirewalldFilesError(f"damaged firewalld snapshot: bad base64 for {path}") \
                from exc
        files[path] = (mode & 0o7777, uid, gid, content)
    return dirs, files


def restore_tree(dirs: dict[str, Entry], files: dict[str, FileEntry],
                 root: Path = Path("/")) -> None:
    """Make /etc/firewalld under `root` exactly the given tree (see the module's doc)."""
    base = local_path(root, FIREWALLD_DIR)
    if not base.is_dir():
        base.mkdir(mode=0o750, parents=True, exist_ok=True)
    for path in sorted(dirs):   # parents before children
        local = local_path(root, path)
        mode, uid, gid = dirs[path]
        if not local.is_dir() or local.is_symlink():
            if local.is_symlink() or local.exists():
                local.unlink()
            local.mkdir(mode=mode)
        st = os.lstat(local)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(local, uid, gid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(local, mode)
    live_dirs, live_files = read_tree(root)
    for path, (mode, uid, gid, content) in sorted(files.items()):
        if live_files.get(path) != (mode, uid, gid, content):
            local = local_path(root, path)
            if local.is_dir() and not local.is_symlink():
                # a directory where the snapshot has a file: the rename onto it would fail
                # on every retry
                shutil.rmtree(local)
                fsync_dir(local.parent)
            write_file_atomically(local, content, mode, owner=(uid, gid))
    for path in sorted(set(live_files) - set(files)):
        local = local_path(root, path)
        if not os.path.lexists(local):   # in a directory removed above
            continue
        local.unlink()
        fsync_dir(local.parent)
    for path in sorted(set(live_dirs) - set(dirs), reverse=True):   # children first
        try:
            local_path(root, path).rmdir()
        except OSError:
            continue   # not empty: something we do not cover (a symlink) is in it


def without_tables(nft_text: bytes, tables: frozenset[str]) -> bytes:
    """`nft list ruleset` text without the blocks of `tables` ("family name")."""
    out: list[str] = []
    skipping = False
    for line in nft_text.decode("utf-8", errors="replace").splitlines(keepends=True):
        words = line.split()
        if not skipping and len(words) >= 4 and words[0] == "table" and words[3] == "{" \
                and f"{words[1]} {words[2]}" in tables and not line[0].isspace():
            skipping = True
            continue
        if skipping:
            if line.rstrip() == "}":
                skipping = False
            continue
        out.append(line)
    return "".join(out).encode()
