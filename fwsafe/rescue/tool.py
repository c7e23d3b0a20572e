"""fwsafe rescue: put a server's firewall back to a known-good state from a rescue system.

When a firewall change locks everyone out and the server is rebooted into the provider's rescue
system, the bad configuration is on the server's disk and comes back at every boot. This module
works on that disk, mounted somewhere (``--root /mnt``), without calling netfilter at all:

* it lists the known-good snapshots that fwsafe keeps (``ROOT/var/lib/fwsafe/history``);
* it rewrites the files the server loads at boot to one of them (``--to ID``, ``--last-good``):
  ipv4 -> ``etc/iptables/rules.v4``, ipv6 -> ``etc/iptables/rules.v6`` (netfilter-persistent),
  nft -> ``etc/nftables.conf``, ufw -> ufw's own files;
* or it disables the firewall at boot (``--disable-firewall``): ufw.conf ``ENABLED=no``,
  accept-all rulesets for netfilter-persistent and nftables.

It shows the diff of every file it will change and asks before writing (``--yes`` skips the
question; without a terminal and without ``--yes`` it refuses), writes atomically and keeps
every replaced file as ``NAME.fwsafe-bak``.

It also holds what the rest of fwsafe shares with it: the on-disk format of the history, the
detection of the boot files a system uses, and their content. Standard library only, Python
3.9+: it runs from a single-file zipapp (``python3 -m fwsafe.rescue --build-zipapp OUT``) with
nothing but a bare ``python3``. It must import nothing that needs click or paramiko.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import json
import os
import re
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.errors import ExitCode
from fwsafe.ondisk.ufw import (
    APPLICATIONS_DIR,
    UfwFilesError,
    load_ufw_files,
    local_path,
    ufw_paths,
    write_file_atomically,
)

__all__ = [
    "BOOT_FILES",
    "Entry",
    "FileChange",
    "boot_file_content",
    "boot_targets",
    "build_zipapp",
    "list_history",
    "main",
    "normalize_layer",
]

FORMAT = 1
DEFAULT_STATE_DIR = "/var/lib/fwsafe"
HISTORY = "history"
META = "meta.json"
BASELINE_ID = "baseline"
BASELINE_MARKER = ".baseline-recorded"   # in history/: the baseline was recorded once
LAYER_FILES = {
    "ipv4": "ipv4.rules",
    "ipv6": "ipv6.rules",
    "ipv4-legacy": "ipv4-legacy.rules",
    "ipv6-legacy": "ipv6-legacy.rules",
    "nft": "nft.conf",
    "ufw": "ufw.json",
}
# The files the system loads at boot, per layer (server paths).
BOOT_FILES = {
    "ipv4": "/etc/iptables/rules.v4",
    "ipv6": "/etc/iptables/rules.v6",
    "nft": "/etc/nftables.conf",
}
NETFILTER_PERSISTENT = ("/usr/sbin/netfilter-persistent", "/sbin/netfilter-persistent")
NFT_SERVICE = "nftables.service"
BOOT_FILE_MODES = {"ipv4": 0o640, "ipv6": 0o640, "nft": 0o755}
BACKUP_SUFFIX = ".fwsafe-bak"
FWSAFE_HEADER = "# fwsafe: known-good state"   # first comment of every boot file fwsafe writes

_COUNTERS = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTERS = re.compile(r"counter packets \d+ bytes \d+")
_NFT_TABLE = re.compile(r"^\s*table\s+(ip|ip6|inet|arp|bridge|netdev)\s+(\S+)(?:\s*\{|\s*$)", re.M)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_STATE_DIR_KEY = re.compile(r'^\s*state_dir\s*=\s*"([^"]+)"\s*(?:#.*)?$')

ACCEPT_ALL_IPTABLES = (
    "# fwsafe rescue --disable-firewall: no filtering (every policy ACCEPT, no rules)\n"
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
)
ACCEPT_ALL_NFT = (
    "#!/usr/sbin/nft -f\n"
    "# fwsafe rescue --disable-firewall: no filtering (an empty ruleset accepts everything)\n"
    "flush ruleset\n"
)


class RescueError(Exception):
    """An error that ends the rescue with `code`; nothing was written unless it says so."""

    def __init__(self, message: str, code: int = int(ExitCode.REJECTED), hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


# --------------------------------------------------------------------------------------------
# Layer contents
# --------------------------------------------------------------------------------------------
def normalize_iptables(text: str) -> str:
    """iptables-save text without comments and blank lines, chain counters zeroed."""
    out = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        if line.startswith(":"):
            line = _COUNTERS.sub("[0:0]", line)
        out.append(line)
    return "".join(f"{line}\n" for line in out)


def normalize_nft(text: str) -> str:
    """nft ruleset text without comment lines, counters zeroed."""
    out = [_NFT_COUNTERS.sub("counter packets 0 bytes 0", raw.rstrip())
           for raw in text.splitlines()
           if raw.strip() and not raw.lstrip().startswith("#")]
    return "".join(f"{line}\n" for line in out)


def normalize_layer(name: str, data: bytes) -> bytes:
    """A layer's capture in the form kept in the history: equal rulesets give equal bytes."""
    if name.startswith(("ipv4", "ipv6")):
        return normalize_iptables(data.decode("utf-8", errors="replace")).encode()
    if name == "nft":
        return normalize_nft(data.decode("utf-8", errors="replace")).encode()
    return data


def layers_digest(layers: dict[str, bytes]) -> str:
    """One hash over every layer's (normalised) content: equal digests, equal states."""
    digest = hashlib.sha256()
    for name in sorted(layers):
        content = normalize_layer(name, layers[name])
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def nft_tables(text: str) -> list[tuple[str, str]]:
    """(family, name) of every table an nft file defines."""
    return [(m.group(1), m.group(2)) for m in _NFT_TABLE.finditer(text)]


def boot_file_content(layer: str, content: bytes, entry_id: str, *,
                      flush_ruleset: bool = True) -> bytes:
    """The boot file for `layer` holding `content` (a history entry's layer).

    The same function writes it on confirm (fwsafe.persistence.bootfiles) and in a rescue, so that both give
    the same bytes for the same state. nftables.conf starts with ``flush ruleset`` unless
    netfilter-persistent loads iptables rules at boot too (`flush_ruleset=False`): then each of
    its tables is deleted and re-created instead, leaving the iptables-nft tables alone.
    """
    body = normalize_layer(layer, content).decode("utf-8", errors="replace")
    if layer in ("ipv4", "ipv6"):
        return (f"{FWSAFE_HEADER} {entry_id} (iptables-restore format)\n"
                + body).encode()
    if layer == "nft":
        head = f"#!/usr/sbin/nft -f\n{FWSAFE_HEADER} {entry_id}\n"
        if flush_ruleset:
            head += "flush ruleset\n"
        else:
            head += "".join(f"add table {fam} {name}\ndelete table {fam} {name}\n"
                            for fam, name in nft_tables(body))
        return (head + body).encode()
    raise ValueError(f"layer {layer!r} has no boot file")


# --------------------------------------------------------------------------------------------
# What the system loads at boot
# --------------------------------------------------------------------------------------------
def _exists(root: Path, path: str) -> bool:
    return os.path.lexists(local_path(root, path))


def uses_netfilter_persistent(root: Path) -> bool:
    """rules.v4/rules.v6 exist, or netfilter-persistent is installed."""
    return any(_exists(root, p) for p in (*BOOT_FILES.values(), *NETFILTER_PERSISTENT)
               if not p.endswith("nftables.conf"))


def nft_service_enabled(root: Path) -> bool:
    """nftables.service is enabled (a *.wants symlink in /etc/systemd/system)."""
    base = local_path(root, "/etc/systemd/system")
    try:
        wants = [d for d in os.listdir(base) if d.endswith(".wants")]
    except OSError:
        return False
    return any(os.path.lexists(base / d / NFT_SERVICE) for d in wants)


def uses_nftables(root: Path) -> bool:
    """/etc/nftables.conf exists and defines tables (or fwsafe wrote it: an empty ruleset is
    still the server's), or the nftables service is enabled."""
    conf = local_path(root, BOOT_FILES["nft"])
    try:
        text = conf.read_text(errors="replace")
    except OSError:
        text = ""
    return bool(nft_tables(text)) or FWSAFE_HEADER in text or nft_service_enabled(root)


def uses_ufw(root: Path) -> bool:
    return local_path(root, "/etc/ufw").is_dir()


def boot_targets(root: Path = Path("/")) -> list[str]:
    """The layers whose boot files this system uses: ipv4+ipv6 (netfilter-persistent), nft."""
    targets = []
    if uses_netfilter_persistent(root):
        targets += ["ipv4", "ipv6"]
    if uses_nftables(root):
        targets.append("nft")
    return targets


# --------------------------------------------------------------------------------------------
# The history on disk
# --------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One known-good state: its layers (normalised) and its meta data."""

    id: str
    meta: dict[str, Any]
    layers: dict[str, bytes]
    path: Path | None = None     # the entry's directory (None for the pending baseline)
    virtual: bool = False        # the baseline, read from the first transaction's snapshot

    @property
    def time(self) -> float:
        value = self.meta.get("time")
        return float(value) if isinstance(value, (int, float)) else 0.0

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "confirmed"))

    def describe(self) -> str:
        who = describe_who(self.meta.get("who") or {})
        layers = ", ".join(self.layers) or "no layers"
        text = f"{self.id}: {self.kind} {format_time(self.time)}{who}; {layers}"
        summary = self.meta.get("summary")
        return text + (f"; {summary}" if summary else "")


@dataclass
class Damaged:
    id: str
    path: Path
    why: str
    mtime: float


class StateMissing(RescueError):
    pass


def format_time(t: float) -> str:
    if not t:
        return "(time unknown)"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def describe_who(who: dict[str, Any]) -> str:
    user = who.get("SUDO_USER") or who.get("USER") or who.get("LOGNAME")
    conn = str(who.get("SSH_CONNECTION") or "").split()
    parts = []
    if user:
        parts.append(f"by {user}")
    if conn:
        parts.append(f"from {conn[0]}")
    return (" " + " ".join(parts)) if parts else ""


def layer_file_name(layer: str) -> str:
    return LAYER_FILES.get(layer, f"{layer}.layer")


def read_entry(directory: Path) -> Entry:
    """Read and verify one history entry; raises ValueError saying what is damaged."""
    try:
        raw = (directory / META).read_bytes()
    except FileNotFoundError as exc:
        raise ValueError(f"{META} is missing") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {META}: {exc.strerror}") from exc
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{META} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is not a JSON object")
    if meta.get("id") != directory.name:
        raise ValueError(f"{META} names entry {meta.get('id')!r}, not {directory.name!r}")
    if not isinstance(meta.get("time"), (int, float)):
        raise ValueError(f"{META} has no time")
    described = meta.get("layers")
    if not isinstance(described, dict) or not described:
        raise ValueError(f"{META} lists no layers")
    layers: dict[str, bytes] = {}
    for name, info in described.items():
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            raise ValueError(f"{META}: layer {name!r} is described wrongly")
        fname = info["file"]
        if not _SAFE_NAME.match(fname) or fname == META:
            raise ValueError(f"{META}: layer {name!r} names a bad file {fname!r}")
        try:
            content = (directory / fname).read_bytes()
        except OSError as exc:
            raise ValueError(f"layer file {fname} cannot be read: {exc.strerror}") from exc
        if hashlib.sha256(content).hexdigest() != info.get("sha256"):
            raise ValueError(f"layer file {fname} does not match its checksum (damaged)")
        if name == "ufw":
            try:
                load_ufw_files(content)
            except UfwFilesError as exc:
                raise ValueError(str(exc)) from exc
        layers[str(name)] = content
    return Entry(id=directory.name, meta=meta, layers=layers, path=directory)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def pending_baseline(state_dir: Path) -> Entry | None:
    """The state before the first transaction, from its snapshot (tx/<first>/before.*): the
    known-good state until the history records it (at the first confirm)."""
    tx_root = state_dir / "tx"
    try:
        ids = sorted(p.name for p in tx_root.iterdir() if p.is_dir())
    except OSError:
        return None
    for tx_id in ids:
        directory = tx_root / tx_id
        layers: dict[str, bytes] = {}
        for name in LAYER_FILES:
            try:
                layers[name] = normalize_layer(name, (directory / f"before.{name}").read_bytes())
            except OSError:
                continue
        if "ufw" in layers:
            try:
                load_ufw_files(layers["ufw"])
            except UfwFilesError:
                del layers["ufw"]
        if not layers:
            continue
        record = _read_json(directory / "record.json")
        created = record.get("created") if isinstance(record, dict) else None
        if not isinstance(created, (int, float)):
            created = directory.stat().st_mtime
        meta = {"format": FORMAT, "id": BASELINE_ID, "kind": BASELINE_ID, "time": float(created),
                "first_time": float(created), "tx": tx_id,
                "who": record.get("who", {}) if isinstance(record, dict) else {},
                "summary": f"the state before the first fwsafe change ({tx_id}); "
                           "not yet recorded in the history"}
        return Entry(id=BASELINE_ID, meta=meta, layers=layers, virtual=True)
    return None


def list_history(state_dir: Path) -> tuple[list[Entry], list[Damaged]]:
    """Every known-good entry (oldest first, by the time it was last known good) and every
    damaged one. Raises StateMissing when `state_dir` is not a usable fwsafe state directory."""
    if not state_dir.exists():
        raise StateMissing(
            f"no fwsafe state directory at {state_dir}",
            hint="is the server's root partition mounted there? give the state directory with "
                 "--state-dir if fwsafe keeps it elsewhere (see /etc/fwsafe/fwsafe.toml)")
    if not state_dir.is_dir():
        raise RescueError(f"{state_dir} is not a directory: the fwsafe state is damaged")
    history = state_dir / HISTORY
    entries: list[Entry] = []
    damaged: list[Damaged] = []
    if history.exists():
        try:
            names = sorted(os.listdir(history))
        except OSError as exc:
            raise RescueError(f"cannot read {history}: {exc.strerror} (the state is damaged)"
                              ) from exc
        for name in names:
            path = history / name
            if name.startswith(".") or not path.is_dir():
                continue
            try:
                entries.append(read_entry(path))
            except ValueError as exc:
                damaged.append(Damaged(name, path, str(exc), _mtime(path)))
    elif not (state_dir / "tx").is_dir():
        raise RescueError(
            f"{state_dir} holds neither a history nor transactions: not a fwsafe state "
            "directory, or a damaged one")
    if not (history / BASELINE_MARKER).exists() and not any(
            e.id == BASELINE_ID for e in entries) and not any(
            d.id == BASELINE_ID for d in damaged):
        baseline = pending_baseline(state_dir)
        if baseline is not None:
            entries.append(baseline)
    entries.sort(key=lambda e: (e.time, e.id))
    return entries, damaged


def _mtime(path: Path) -> float:
    try:
        return max(path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir()))
    except (OSError, ValueError):
        return 0.0


def find_entry(entries: list[Entry], damaged: list[Damaged], ref: str) -> Entry:
    """An entry by id, unique id prefix, `baseline`, or `last`/`latest`."""
    if not entries and not damaged:
        raise RescueError("there is no known-good snapshot")
    if ref in ("last", "latest"):
        return last_good(entries, damaged)
    for entry in entries:
        if entry.id == ref:
            return entry
    for bad in damaged:
        if bad.id == ref or (bad.id.startswith(ref) and ref):
            raise RescueError(f"snapshot {bad.id} is damaged: {bad.why}",
                              hint="choose another one (--list shows them)")
    matches = [e for e in entries if ref and e.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise RescueError(f"{ref!r} matches several snapshots: "
                          + ", ".join(e.id for e in matches))
    raise RescueError(f"no snapshot {ref!r}",
                      hint="known: " + ", ".join(e.id for e in entries) if entries else "")


def last_good(entries: list[Entry], damaged: list[Damaged]) -> Entry:
    """The newest intact entry; refused when a damaged entry may be newer than it."""
    if not entries:
        why = "; ".join(f"{d.id}: {d.why}" for d in damaged)
        raise RescueError("there is no intact known-good snapshot" + (f" ({why})" if why else ""))
    newest = entries[-1]
    newer_damaged = [d for d in damaged if d.mtime > newest.time]
    if newer_damaged:
        raise RescueError(
            "the newest snapshot may be damaged: "
            + "; ".join(f"{d.id}: {d.why}" for d in newer_damaged),
            hint=f"choose one explicitly, e.g. --to {newest.id} (--list shows them)")
    return newest


# --------------------------------------------------------------------------------------------
# The plan: which files change, and how
# --------------------------------------------------------------------------------------------
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
        return b"", None   # a symlink is replaced by a file (never followed: see fwsafe.ondisk.ufw)
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
    used = {"ipv4": np, "ipv6": np, "nft": nf, "ufw": uf}
    what = {"ipv4": "netfilter-persistent (rules.v4)", "ipv6": "netfilter-persistent (rules.v6)",
            "nft": "nftables (nftables.conf)", "ufw": "ufw"}
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
        change = _boot_change(root, layer, boot_file_content(
            layer, content, entry.id, flush_ruleset=not np))
        if change is not None:
            plan.changes.append(change)
    for layer, in_use in used.items():
        if in_use and layer not in entry.layers:
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def backup_path(change: FileChange, root: Path) -> Path:
    """NAME.fwsafe-bak next to the file, or .fwsafe-bak.N when that exists already. Profiles in
    applications.d go to a sibling directory: ufw reads every file in applications.d."""
    if change.server_path.startswith(APPLICATIONS_DIR + "/"):
        base = local_path(root, APPLICATIONS_DIR + BACKUP_SUFFIX) / change.local.name
    else:
        base = change.local.with_name(change.local.name + BACKUP_SUFFIX)
    candidate, n = base, 1
    while os.path.lexists(candidate):
        candidate = base.with_name(f"{base.name}.{n}")
        n += 1
    return candidate


def write_plan(plan: Plan, root: Path) -> list[FileChange]:
    """Carry out the plan; return the changes made. Stops at the first error (RescueError
    listing what was already written)."""
    done: list[FileChange] = []
    for change in plan.changes:
        try:
            _write_one(change, root)
        except OSError as exc:
            written = ", ".join(c.server_path for c in done) or "nothing"
            raise RescueError(
                f"cannot write {change.local}: {exc.strerror or exc}; already written: {written}",
                code=int(ExitCode.REVERT_FAILED),
                hint="the backups (*.fwsafe-bak) hold the files as they were") from exc
        done.append(change)
    return done


def _write_one(change: FileChange, root: Path) -> None:
    if os.path.lexists(change.local):
        change.backup = backup_path(change, root)
        change.backup.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = os.lstat(change.local)
        if change.new is None or not stat.S_ISREG(st.st_mode):
            os.rename(change.local, change.backup)
        else:
            write_file_atomically(change.backup, change.old or b"", stat.S_IMODE(st.st_mode))
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(change.backup, st.st_uid, st.st_gid)
    if change.new is None:
        return
    if not change.local.parent.is_dir():
        change.local.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file_atomically(change.local, change.new, change.mode,
                          default_mode=change.default_mode)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def configured_state_dir(root: Path) -> str | None:
    """state_dir from ROOT/etc/fwsafe/fwsafe.toml (top-level key), if set."""
    try:
        text = local_path(root, "/etc/fwsafe/fwsafe.toml").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.strip().startswith("["):
            break
        match = _STATE_DIR_KEY.match(line)
        if match:
            return match.group(1)
    return None


def resolve_state_dir(root: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    configured = configured_state_dir(root)
    return local_path(root, configured if configured and configured.startswith("/")
                      else DEFAULT_STATE_DIR)


def next_steps(root: Path, disabled: bool, entry: Entry | None) -> list[str]:
    steps = [
        f"leave {root} and unmount it: cd / && sync && umount -R {root}",
        "switch the server back to its normal boot in the provider's panel (leave the rescue "
        "system) and reboot it",
        "log in over SSH as usual",
    ]
    if disabled:
        steps.append("the server boots WITHOUT a firewall: put a good one back at once, under "
                     "the guard: `fwsafe history` then `fwsafe rollback ID`, or `fwsafe apply`")
    elif entry is not None:
        steps.append(f"run `fwsafe status` and `fwsafe history`: the firewall holds the "
                     f"known-good state {entry.id}; compare with `fwsafe history-diff {entry.id}`")
    steps.append(f"the replaced files are kept as *{BACKUP_SUFFIX}: look at them, then delete them")
    return steps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fwsafe rescue",
        description="Put a server's firewall files back to a known-good state, offline, on its "
                    "disk mounted in a rescue system. Calls no netfilter tool.",
        epilog="Exit codes: 0 done (or nothing to do), 2 usage (also: no terminal and no --yes), "
               "3 nothing changed (no/damaged state, declined), 5 failed part-way.")
    parser.add_argument("--root", required=True, metavar="DIR",
                        help="where the server's root file system is mounted, e.g. /mnt")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="fwsafe's state directory as a path on THIS system "
                             "(default: ROOT/var/lib/fwsafe)")
    parser.add_argument("--list", action="store_true", help="list the known-good snapshots")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--to", metavar="ID", help="restore this snapshot (id, prefix, 'baseline')")
    pick.add_argument("--last-good", action="store_true",
                      help="restore the newest known-good snapshot")
    parser.add_argument("--disable-firewall", action="store_true",
                        help="turn the firewall off at boot (ufw ENABLED=no; accept-all "
                             "rulesets for netfilter-persistent and nftables)")
    parser.add_argument("--yes", action="store_true", help="write without asking")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {"id": entry.id, "kind": entry.kind, "time": entry.time,
            "time_text": format_time(entry.time), "layers": sorted(entry.layers),
            "who": entry.meta.get("who", {}), "summary": entry.meta.get("summary"),
            "pending_baseline": entry.virtual}


class _Out:
    """Text to stdout, or everything collected into one JSON object."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {}

    def say(self, text: str = "") -> None:
        if not self.as_json:
            print(text)

    def err(self, text: str) -> None:
        print(f"fwsafe rescue: {text}", file=sys.stderr)

    def finish(self, code: int) -> int:
        if self.as_json:
            self.data["ok"] = code == 0
            self.data["exit_code"] = code
            print(json.dumps(self.data, sort_keys=True))
        return code


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--build-zipapp"]:
        if len(args_list) != 2:
            print("usage: python3 -m fwsafe.rescue --build-zipapp OUT", file=sys.stderr)
            return int(ExitCode.USAGE)
        built = build_zipapp(Path(args_list[1]))
        print(f"built {built}: run it as `python3 {built} rescue --root DIR ...`")
        return int(ExitCode.OK)
    if args_list[:1] == ["rescue"]:
        args_list = args_list[1:]
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else int(ExitCode.USAGE)
    out = _Out(args.json)
    try:
        return out.finish(_run(args, out))
    except RescueError as exc:
        out.err(f"error: {exc.message}")
        if exc.hint:
            out.err(exc.hint)
        out.data.update({"error": exc.message, "hint": exc.hint or None})
        return out.finish(exc.code)
    except KeyboardInterrupt:
        out.err("interrupted")
        return out.finish(int(ExitCode.REJECTED))


def _run(args: argparse.Namespace, out: _Out) -> int:
    root = Path(args.root)
    if not root.is_dir():
        raise RescueError(f"--root {root}: no such directory", code=int(ExitCode.USAGE))
    if args.disable_firewall and (args.to or args.last_good):
        raise RescueError("--disable-firewall cannot be combined with --to/--last-good",
                          code=int(ExitCode.USAGE))
    if args.state_dir and not os.path.isabs(args.state_dir):
        raise RescueError("--state-dir must be an absolute path on this (rescue) system",
                          code=int(ExitCode.USAGE))
    state_dir = resolve_state_dir(root, args.state_dir)
    out.data.update({"root": str(root), "state_dir": str(state_dir)})
    out.say(f"server root: {root}    fwsafe state: {state_dir}")
    if args.disable_firewall:
        plan, entry = plan_disable(root), None
        out.data["action"] = "disable-firewall"
        out.say("disabling the firewall at boot")
    else:
        entries, damaged = list_history(state_dir)
        out.data["entries"] = [_entry_json(e) for e in entries]
        out.data["damaged"] = [{"id": d.id, "why": d.why} for d in damaged]
        if args.list or not (args.to or args.last_good):
            out.data["action"] = "list"
            _print_list(entries, damaged, out)
            if not entries:
                raise RescueError(f"no intact known-good snapshot in {state_dir}")
            if not args.list:
                out.say("\nchoose one with --to ID or --last-good "
                        "(or --disable-firewall to turn the firewall off at boot)")
            return int(ExitCode.OK)
        entry = last_good(entries, damaged) if args.last_good else find_entry(
            entries, damaged, args.to)
        out.data["action"] = "restore"
        out.data["entry"] = _entry_json(entry)
        out.say(f"known-good snapshot {entry.describe()}")
        try:
            plan = plan_restore(entry, root)
        except UfwFilesError as exc:
            raise RescueError(f"snapshot {entry.id}: {exc}") from exc
    out.data["changes"] = [{"path": c.server_path, "action": c.action, "layer": c.layer,
                            "diff": c.diff()} for c in plan.changes]
    out.data["notes"], out.data["warnings"] = plan.notes, plan.warnings
    for note in plan.notes:
        out.say(f"  note: {note}")
    for warning in plan.warnings:
        out.say(f"  WARNING: {warning}")
        if out.as_json:
            out.err(f"warning: {warning}")
    if not plan.changes:
        out.data["written"] = []
        out.say("nothing to write")
        return int(ExitCode.OK)
    out.say("")
    for change in plan.changes:
        out.say(f"=== {change.action} {change.server_path} ({change.layer})")
        if not out.as_json:
            sys.stdout.write(change.diff())
    out.say("")
    out.say(f"{len(plan.changes)} file(s) to write under {root}; each replaced file is kept "
            f"as NAME{BACKUP_SUFFIX}:")
    for change in plan.changes:
        out.say(f"  {change.action:8} {change.server_path}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise RescueError("no terminal to ask on: nothing written; check the diff above and "
                              "run again with --yes", code=int(ExitCode.USAGE))
        sys.stdout.flush()
        sys.stderr.write("Write these files? Type 'yes' to write them: ")
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer != "yes":
            raise RescueError("not confirmed: nothing written")
    done = write_plan(plan, root)
    out.data["written"] = [c.server_path for c in done]
    out.data["backups"] = [str(c.backup) for c in done if c.backup is not None]
    steps = next_steps(root, args.disable_firewall, entry)
    out.data["next_steps"] = steps
    out.say(f"done: wrote {len(done)} file(s)" + (
        f" (known-good state {entry.id})" if entry else " (firewall disabled at boot)"))
    out.say("next:")
    for number, step in enumerate(steps, start=1):
        out.say(f"  {number}. {step}")
    return int(ExitCode.OK)


def _print_list(entries: list[Entry], damaged: list[Damaged], out: _Out) -> None:
    if not entries and not damaged:
        out.say("no known-good snapshot")
        return
    newest = entries[-1].id if entries else None
    out.say("known-good snapshots, oldest first:")
    for entry in entries:
        mark = "   <- last good" if entry.id == newest else ""
        out.say(f"  {entry.describe()}{mark}")
    for bad in damaged:
        out.say(f"  {bad.id}: DAMAGED: {bad.why}")


# --------------------------------------------------------------------------------------------
# The zipapp
# --------------------------------------------------------------------------------------------
ZIPAPP_MODULES = ("errors.py", "ondisk/__init__.py", "ondisk/ufw.py", "rescue/__init__.py",
                  "rescue/tool.py")
ZIPAPP_MAIN = (
    "# fwsafe rescue, as a single file: python3 fwsafe.pyz rescue --root /mnt --list\n"
    "import sys\n\n"
    "from fwsafe.rescue.tool import main\n\n"
    "sys.exit(main())\n"
)


def build_zipapp(out: Path, *, mode: int = 0o755) -> Path:
    """Write the rescue tool as one file: stdlib-only modules and a __main__ (atomically)."""
    source = Path(__file__).resolve().parent.parent   # the fwsafe package
    version = "0"
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (source / "__init__.py").read_text())
    if match:
        version = match.group(1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    stamp = (2020, 1, 1, 0, 0, 0)
    try:
        with open(tmp, "wb") as handle:
            handle.write(b"#!/usr/bin/env python3\n")
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                def add(name: str, text: str) -> None:
                    info = zipfile.ZipInfo(name, date_time=stamp)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, text)

                add("__main__.py", ZIPAPP_MAIN)
                add("fwsafe/__init__.py",
                    f'"""fwsafe rescue (zipapp)."""\n\n__version__ = "{version}"\n')
                for name in ZIPAPP_MODULES:
                    add(f"fwsafe/{name}", (source / name).read_text())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return out


if __name__ == "__main__":
    sys.exit(main())
