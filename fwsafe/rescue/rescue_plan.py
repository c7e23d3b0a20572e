"""The rescue's plan: which of the server's files change, and how (`plan_restore` for a
known-good snapshot, `plan_disable` to turn the firewall off at boot), each with its diff;
nothing is written here (fwsafe.rescue.rescue_write does). Standard library only, bundled in
the zipapp (fwsafe.rescue.tool tells the whole story).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fwsafe.errors import ExitCode
from fwsafe.ondisk.atomic_files import BACKUP_SUFFIX, local_path
from fwsafe.ondisk.boot import (
    BOOT_FILE_MODES,
    BOOT_FILES,
    boot_file_content,
    uses_netfilter_persistent,
    uses_nftables,
    uses_ufw,
)
from fwsafe.ondisk.firewalld_files import (
    FIREWALLD_DIR,
    FIREWALLD_TABLES,
    read_tree,
    tree_from_json,
    without_tables,
)
from fwsafe.ondisk.history_format import Entry, HistoryError
from fwsafe.ondisk.sshd_files import SshdFiles, listen_dropins
from fwsafe.ondisk.sshd_files import load as load_sshd_files
from fwsafe.ondisk.ufw_files import load_ufw_files, ufw_paths

SSHD_CONFIG = "/etc/ssh/sshd_config"   # the sshd layer of the history is this sshd's

ACCEPT_ALL_IPTABLES = (
    "# fwsafe rescue --disable-firewall: no filtering (every policy ACCEPT, no rules)\n"
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
)
ACCEPT_ALL_NFT = (
    "#!/usr/sbin/nft -f\n"
    "# fwsafe rescue --disable-firewall: no filtering (an empty ruleset accepts everything)\n"
    "flush ruleset\n"
)


class RescueError(HistoryError):
    """An error that ends the rescue with `code`; nothing was written unless it says so. (The
    history's own errors, HistoryError, end it with exit 3: nothing changed.)"""

    def __init__(self, message: str, code: int = int(ExitCode.REJECTED), hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


@dataclass
class FileChange:
    server_path: str              # as on the server: /etc/iptables/rules.v4
    local: Path                   # where it is now: ROOT/etc/iptables/rules.v4
    layer: str
    old: bytes | None             # None: the file does not exist
    new: bytes | None             # None: remove it (it is kept as a backup)
    mode: int | None = None       # mode to write (None: keep the file's, else default_mode)
    default_mode: int = 0o644
    backup: Path | None = None

    @property
    def action(self) -> str:
        if self.new is None:
            return "remove"
        return "create" if self.old is None else "replace"

    def diff(self) -> str:
        old = (self.old or b"").decode("utf-8", errors="replace").splitlines(keepends=True)
        new = (self.new or b"").decode("utf-8", errors="replace").splitlines(keepends=True)
        lines = list(difflib.unified_diff(
            old, new, fromfile=f"{self.server_path} (now)" if self.old is not None else "/dev/null",
            tofile=f"{self.server_path} (new)" if self.new is not None else "/dev/null"))
        text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in lines)
        if not text and self.mode is not None:
            text = f"(mode only: {self.mode:o})\n"
        return text


@dataclass
class Plan:
    changes: list[FileChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _read_existing(path: Path) -> tuple[bytes | None, int | None]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, None
    if stat.S_ISLNK(st.st_mode):
        return b"", None   # a symlink is replaced by a file (never followed: see fwsafe.ondisk.atomic_files)
    if not stat.S_ISREG(st.st_mode):
        raise RescueError(f"{path} is not a regular file; fix it by hand")
    return path.read_bytes(), stat.S_IMODE(st.st_mode)


def _boot_change(root: Path, layer: str, new: bytes) -> FileChange | None:
    server = BOOT_FILES[layer]
    local = local_path(root, server)
    old, _ = _read_existing(local)
    if old == new:
        return None
    return FileChange(server, local, layer, old, new, default_mode=BOOT_FILE_MODES[layer])


def plan_restore(entry: Entry, root: Path) -> Plan:
    plan = Plan()
    np, nf, uf = uses_netfilter_persistent(root), uses_nftables(root), uses_ufw(root)
    used = {"ipv4": np, "ipv6": np, "nft": nf, "ufw": uf,
            "sshd": local_path(root, SSHD_CONFIG).is_file(),
            "firewalld": local_path(root, FIREWALLD_DIR).is_dir()}
    what = {"ipv4": "netfilter-persistent (rules.v4)", "ipv6": "netfilter-persistent (rules.v6)",
            "nft": "nftables (nftables.conf)", "ufw": "ufw", "sshd": f"sshd ({SSHD_CONFIG})",
            "firewalld": f"firewalld ({FIREWALLD_DIR})"}
    for layer, content in entry.layers.items():
        if layer not in used:
            plan.notes.append(f"layer {layer}: no file loads it at boot; nothing to write")
            continue
        if not used[layer]:
            plan.notes.append(f"layer {layer}: this server does not use {what[layer]}; "
                              "not written")
            continue
        if layer == "ufw":
            plan.changes += _ufw_changes(content, root)
            continue
        if layer == "sshd":
            plan.changes += _sshd_changes(content, root)
            continue
        if layer == "firewalld":
            plan.changes += _firewalld_changes(content, root)
            continue
        if layer == "nft" and "firewalld" in entry.layers:   # firewalld makes its own
            content = without_tables(content, FIREWALLD_TABLES)
        change = _boot_change(root, layer, boot_file_content(
            layer, content, entry.id, flush_ruleset=not np))
        if change is not None:
            plan.changes.append(change)
    for layer, in_use in used.items():
        if in_use and layer not in entry.layers and layer not in ("sshd", "firewalld"):
            plan.warnings.append(
                f"this server uses {what[layer]} at boot, but snapshot {entry.id} has no "
                f"{layer} layer: left as it is (--disable-firewall turns it off instead)")
    if not plan.changes and not plan.warnings:
        plan.notes.append("the files on the disk already hold this snapshot")
    return plan


def _ufw_changes(content: bytes, root: Path) -> list[FileChange]:
    files = load_ufw_files(content)
    changes = []
    for path in sorted(set(files) | set(ufw_paths(root))):
        local = local_path(root, path)
        old, old_mode = _read_existing(local)
        if path in files:
            mode, new = files[path]
            if old == new and old_mode == mode:
                continue
            changes.append(FileChange(path, local, "ufw", old, new, mode=mode))
        elif old is not None:
            changes.append(FileChange(path, local, "ufw", old, None))
    return changes


def _firewalld_changes(content: bytes, root: Path) -> list[FileChange]:
    """/etc/firewalld as in the entry (firewalld starts from it): its files with their modes;
    the files that appeared since are removed (kept as backups)."""
    try:
        _dirs, files = tree_from_json(json.loads(content.decode("utf-8")))
    except (UnicodeDecodeError, ValueError) as exc:   # FirewalldFilesError is a ValueError
        raise RescueError(f"the firewalld layer is damaged: {exc}") from exc
    _live_dirs, live = read_tree(root)
    changes = []
    for path in sorted(set(files) | {p for p in live if not p.endswith(BACKUP_SUFFIX)}):
        local = local_path(root, path)
        old, old_mode = _read_existing(local)
        if path in files:
            mode, _uid, _gid, new = files[path]
            if old != new or old_mode != mode:
                changes.append(FileChange(path, local, "firewalld", old, new, mode=mode))
        elif old is not None:
            changes.append(FileChange(path, local, "firewalld", old, None))
    return changes


def _sshd_changes(content: bytes, root: Path) -> list[FileChange]:
    """sshd's files of the entry, with their mode; and the files its Include patterns match
    now that the entry did not have (a drop-in added since), moved aside."""
    try:
        layer = load_sshd_files(content)
    except ValueError as exc:
        raise RescueError(f"the sshd layer is damaged: {exc}") from exc
    changes = []
    for path, state in sorted(layer.files.items()):
        local = local_path(root, path)
        old, old_mode = _read_existing(local)
        if old == state.content and old_mode == state.mode:
            continue
        changes.append(FileChange(path, local, "sshd", old, state.content, mode=state.mode))
    # fwsafe's own drop-in for a socket-activated sshd (fwsafe.sshd.socketunit) that the entry
    # did not have: sshd_config goes back to the entry's ports, and so must the socket.
    own = listen_dropins()
    stray = {p for p in own if local_path(root, p).is_file()} if layer.config == SSHD_CONFIG \
        else set()
    for path in sorted((_included_now(layer, root) | stray) - set(layer.files)):
        old, _ = _read_existing(local_path(root, path))
        if old is not None:
            changes.append(FileChange(path, local_path(root, path), "sshd", old, None))
    return changes


def _included_now(layer: SshdFiles, root: Path) -> set[str]:
    """The files the entry's Include lines match on the disk now (server paths)."""
    found: set[str] = set()
    base = os.path.dirname(layer.config)
    for state in layer.files.values():
        for raw in state.content.decode("utf-8", errors="replace").splitlines():
            words = raw.split("#", 1)[0].split()
            if len(words) < 2 or words[0].lower() != "include":
                continue
            for pattern in words[1:]:
                pattern = pattern.strip('"')
                full = pattern if pattern.startswith("/") else f"{base}/{pattern}"
                prefix = str(root).rstrip("/")
                for match in glob.glob(str(local_path(root, full))):
                    if os.path.isfile(match) and not match.endswith(BACKUP_SUFFIX):
                        found.add(match[len(prefix):] if prefix else match)
    return found


def plan_disable(root: Path) -> Plan:
    plan = Plan()
    conf = local_path(root, "/etc/ufw/ufw.conf")
    if conf.is_file():
        old, _ = _read_existing(conf)
        text = (old or b"").decode("utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        found = False
        for index, line in enumerate(lines):
            if re.match(r"^\s*ENABLED\s*=", line):
                lines[index] = "ENABLED=no\n"
                found = True
        if not found:
            lines.append(("" if not text or text.endswith("\n") else "\n") + "ENABLED=no\n")
        new = "".join(lines).encode()
        if new != old:
            plan.changes.append(FileChange("/etc/ufw/ufw.conf", conf, "ufw", old, new))
    elif uses_ufw(root):
        plan.warnings.append("/etc/ufw exists but has no ufw.conf; ufw left as it is")
    if uses_netfilter_persistent(root):
        for layer in ("ipv4", "ipv6"):
            change = _boot_change(root, layer, ACCEPT_ALL_IPTABLES.encode())
            if change is not None:
                plan.changes.append(change)
    if uses_nftables(root):
        change = _boot_change(root, "nft", ACCEPT_ALL_NFT.encode())
        if change is not None:
            plan.changes.append(change)
    if not plan.changes:
        if uses_ufw(root) or uses_netfilter_persistent(root) or uses_nftables(root):
            plan.notes.append("the firewall is already disabled at boot")
        else:
            plan.notes.append(f"no firewall loaded at boot found under {root} (ufw, "
                              "netfilter-persistent, nftables): nothing to disable")
    return plan


