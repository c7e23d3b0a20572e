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

The plan is fwsafe.rescue.rescue_plan, the writing fwsafe.rescue.rescue_write, the zipapp
fwsafe.rescue.rescue_zipapp; this module is the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from fwsafe.errors import ExitCode
from fwsafe.ondisk.atomic_files import BACKUP_SUFFIX, local_path
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
from fwsafe.ondisk.ufw_files import UfwFilesError
from fwsafe.rescue.rescue_plan import RescueError, plan_disable, plan_restore
from fwsafe.rescue.rescue_write import write_plan
from fwsafe.rescue.rescue_zipapp import build_zipapp

__all__ = ["main"]

DEFAULT_STATE_DIR = "/var/lib/fwsafe"
_STATE_DIR_KEY = re.compile(r'^\s*state_dir\s*=\s*"([^"]+)"\s*(?:#.*)?$')


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


if __name__ == "__main__":
    sys.exit(main())
