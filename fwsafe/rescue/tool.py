"""fwsafe rescue: put a server's firewall back to a known-good state from a rescue system.

When a firewall change locks everyone out and the server is rebooted into the provider's rescue
system, the bad configuration is on the server's disk and comes back at every boot. This module
works on that disk, mounted somewhere (``--root /mnt``), without calling netfilter at all:

* it lists the known-good snapshots that fwsafe keeps (``ROOT/var/lib/fwsafe/history``);
* it rewrites the files the server loads at boot to one of them (``--to ID``, ``--last-good``):
  ipv4 -> ``etc/iptables/rules.v4``, ipv6 -> ``etc/iptables/rules.v6`` (netfilter-persistent),
  nft -> ``etc/nftables.conf``, ufw -> ufw's own files, sshd -> ``etc/ssh/sshd_config`` and
  the files it included (a drop-in its Include lines match now but not then is moved aside);
* or it disables the firewall at boot (``--disable-firewall``): ufw.conf ``ENABLED=no``,
  accept-all rulesets for netfilter-persistent and nftables.

It shows the diff of every file it will change and asks before writing (``--yes`` skips the
question; without a terminal and without ``--yes`` it refuses), writes atomically and keeps
every replaced file as ``NAME.fwsafe-bak``.

The formats it reads and writes (the history, the boot files, ufw's files) are those of
fwsafe.ondisk, shared with the running tool. Standard library only, Python 3.9+: it runs from a
single-file zipapp (``python3 -m fwsafe.rescue --build-zipapp OUT``) with nothing but a bare
``python3``; it imports fwsafe.errors and fwsafe.ondisk only, never click or paramiko.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import io
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
from fwsafe.ondisk.atomic_files import BACKUP_SUFFIX, local_path, write_file_atomically
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
from fwsafe.ondisk.history_format import (
    BEFORE_RECOVERY,
    Damaged,
    Entry,
    HistoryError,
    find_entry,
    format_time,
    last_good,
    list_history,
)
from fwsafe.ondisk.sshd_files import SshdFiles
from fwsafe.ondisk.sshd_files import load as load_sshd_files
from fwsafe.ondisk.ufw_files import APPLICATIONS_DIR, UfwFilesError, load_ufw_files, ufw_paths

__all__ = ["FileChange", "Plan", "RescueError", "build_zipapp", "main", "plan_disable",
           "plan_restore", "write_plan"]

DEFAULT_STATE_DIR = "/var/lib/fwsafe"
SSHD_CONFIG = "/etc/ssh/sshd_config"   # the sshd layer of the history is this sshd's
SSHD_SOCKETS = ("ssh.socket", "sshd.socket")   # its socket units (socket activation)
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


class RescueError(HistoryError):
    """An error that ends the rescue with `code`; nothing was written unless it says so. (The
    history's own errors, HistoryError, end it with exit 3: nothing changed.)"""

    def __init__(self, message: str, code: int = int(ExitCode.REJECTED), hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


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
    own = {f"/etc/systemd/system/{unit}.d/zz-fwsafe-listen.conf" for unit in SSHD_SOCKETS}
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
            write_file_atomically(change.backup, change.old or b"", stat.S_IMODE(st.st_mode),
                                  owner=(st.st_uid, st.st_gid))
    if change.new is None:
        return
    if not change.local.parent.is_dir():
        change.local.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file_atomically(change.local, change.new, change.mode,
                          default_mode=change.default_mode, keep_owner=True)


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
    except HistoryError as exc:  # a RescueError, or the history's own (exit 3)
        out.err(f"error: {exc.message}")
        if exc.hint:
            out.err(exc.hint)
        out.data.update({"error": exc.message, "hint": exc.hint or None})
        return out.finish(exc.code if isinstance(exc, RescueError) else int(ExitCode.REJECTED))
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
    good = [e for e in entries if e.kind != BEFORE_RECOVERY]
    newest = good[-1].id if good else None
    out.say("known-good snapshots, oldest first:")
    for entry in entries:
        mark = "   <- last good" if entry.id == newest else ""
        out.say(f"  {entry.describe()}{mark}")
    for bad in damaged:
        out.say(f"  {bad.id}: DAMAGED: {bad.why}")


# --------------------------------------------------------------------------------------------
# The zipapp
# --------------------------------------------------------------------------------------------
ZIPAPP_MODULES = ("errors.py", "ondisk/__init__.py", "ondisk/atomic_files.py", "ondisk/ufw_files.py",
                  "ondisk/sshd_files.py", "ondisk/firewalld_files.py", "ondisk/iptsave_lines.py",
                  "ondisk/history_format.py", "ondisk/nft_text.py", "ondisk/boot.py",
                  "rescue/__init__.py", "rescue/tool.py")
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
    stamp = (2020, 1, 1, 0, 0, 0)
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        def add(name: str, text: str) -> None:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, text)

        add("__main__.py", ZIPAPP_MAIN)
        add("fwsafe/__init__.py", f'"""fwsafe rescue (zipapp)."""\n\n__version__ = "{version}"\n')
        for name in ZIPAPP_MODULES:
            add(f"fwsafe/{name}", (source / name).read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out, buffer.getvalue(), mode)
    return out


if __name__ == "__main__":
    sys.exit(main())
