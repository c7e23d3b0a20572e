"""sshd's configuration files as one serialised layer.

Standard library only (like the other formats of this package).

Format (JSON, keys sorted, so that equal files give equal bytes)::

    {"config": "/etc/ssh/sshd_config",
     "files": {"/etc/ssh/sshd_config": {"mode": 420, "uid": 0, "gid": 0, "data": "<base64>"},
               ...},
     "base": {"/etc/ssh/sshd_config.d/00-fwsafe.conf": null, ...}}

`config` is the main file sshd is started with. A capture holds every file sshd reads: the main
file and the files it includes. A change holds the new content of the files it writes, and in
`base` the content each had when the change was made (sha256, or null for a file that did not
exist), so that the guard never overwrites an edit made in the meantime.

Files are written atomically (fwsafe.ondisk.atomic_files) with the mode and owner recorded. Paths must
be absolute and normal: a damaged or crafted layer is refused before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fwsafe.ondisk.atomic_files import fsync_dir, write_file_atomically

NEW_FILE_MODE = 0o644
# sshd's socket units (socket activation: Ubuntu 24.04, Debian 13), and fwsafe's own drop-in of
# each (`sshd set` on a socket-activated sshd): last among the socket's drop-ins, so that its
# `ListenStream=` reset wins over an `override.conf` that `systemctl edit ssh.socket` wrote
# (drop-ins apply in file-name order)
SOCKET_UNITS = ("ssh.socket", "sshd.socket")
UNIT_DIR = "/etc/systemd/system"
DROPIN_NAME = "zz-fwsafe-listen.conf"


def listen_dropins() -> set[str]:
    """The paths of fwsafe's drop-in of every sshd socket unit (see DROPIN_NAME)."""
    return {f"{UNIT_DIR}/{unit}.d/{DROPIN_NAME}" for unit in SOCKET_UNITS}


class SshdFilesError(ValueError):
    """A serialised sshd layer that is damaged or names a path that is not absolute."""


@dataclass(frozen=True)
class FileState:
    mode: int
    uid: int
    gid: int
    content: bytes

    def digest(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def unit(self) -> str:
        """What a revert compares: the content and the metadata sshd cares about."""
        return f"mode {self.mode:o} owner {self.uid}:{self.gid} sha256 {self.digest()}"


@dataclass
class SshdFiles:
    config: str
    files: dict[str, FileState] = field(default_factory=dict)
    base: dict[str, str | None] = field(default_factory=dict)


def check_path(path: object) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path \
            or os.path.normpath(path) != path or path == "/":
        raise SshdFilesError(f"damaged sshd layer: {path!r} is not an absolute, normal path")
    return path


def read_file(path: str) -> FileState | None:
    """The file as sshd reads it (a symlink is followed); None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return FileState(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, b"".join(chunks))


def dump(layer: SshdFiles) -> bytes:
    body = {
        "config": check_path(layer.config),
        "files": {check_path(path): {"mode": state.mode, "uid": state.uid, "gid": state.gid,
                                     "data": base64.b64encode(state.content).decode("ascii")}
                  for path, state in sorted(layer.files.items())},
    }
    if layer.base:
        body["base"] = {check_path(p): d for p, d in sorted(layer.base.items())}
    return json.dumps(body, sort_keys=True, indent=1).encode() + b"\n"


def _int(entry: dict[str, object], key: str, path: str, limit: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise SshdFilesError(f"damaged sshd layer: bad {key} for {path}: {value!r}")
    return value


def load(data: bytes) -> SshdFiles:
    """Parse a serialised layer. Raises SshdFilesError (a ValueError) when it is damaged."""
    try:
        top = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SshdFilesError(f"damaged sshd layer: not JSON ({exc})") from exc
    if not isinstance(top, dict) or not isinstance(top.get("files", {}), dict) \
            or not isinstance(top.get("base", {}), dict):
        raise SshdFilesError("damaged sshd layer: not an object with 'config' and 'files'")
    layer = SshdFiles(check_path(top.get("config")))
    for path, entry in top.get("files", {}).items():
        check_path(path)
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
            raise SshdFilesError(f"damaged sshd layer: no data for {path}")
        try:
            content = base64.b64decode(entry["data"].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise SshdFilesError(f"damaged sshd layer: bad base64 for {path}: {exc}") from exc
        layer.files[path] = FileState(_int(entry, "mode", path, 0o7777),
                                      _int(entry, "uid", path, 2**32 - 1),
                                      _int(entry, "gid", path, 2**32 - 1), content)
    for path, digest in top.get("base", {}).items():
        if digest is not None and not isinstance(digest, str):
            raise SshdFilesError(f"damaged sshd layer: bad base of {path}")
        layer.base[check_path(path)] = digest
    return layer


def write_file(path: str, state: FileState) -> None:
    """Replace `path` by `state`, atomically, with its mode and owner."""
    target = Path(path)
    if not target.parent.is_dir():
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file_atomically(target, state.content, state.mode, owner=(state.uid, state.gid))


def remove_file(path: str) -> None:
    """Remove a regular file that did not exist before (anything else is left alone)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        os.unlink(path)
        fsync_dir(Path(path).parent)
