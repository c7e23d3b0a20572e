"""`fwsafe history`, `show`, `history-diff` and `rollback`: the known-good states.

Every confirmed state is kept (see fwsafe.persistence.known_good). `rollback ID` puts one back, itself as a
change under the guard, exactly like `fwsafe apply`.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from typing import Any

import click

from fwsafe.cli.common import (
    EXIT_CODES_EPILOG,
    TIMEOUT_HELP,
    apply_options,
    complete_history_ids,
    manager_for,
    state_options,
    timeout_from,
    use_colour,
)
from fwsafe.context import RUN
from fwsafe.core.config import load_config
from fwsafe.core.statedir import StateDir, resolve_state_dir
from fwsafe.errors import EnvironmentProblem
from fwsafe.guard.spawn import converge
from fwsafe.ondisk.history_format import Entry, describe_who, format_time
from fwsafe.persistence import known_good
from fwsafe.persistence.rollback import already_live, rollback_change

HISTORY_SHOWN = 10   # the newest states `fwsafe history` lists by default; -v: all


def _state(state_dir: str | None, config_path: str | None) -> StateDir:
    config = load_config(config_path)
    state = StateDir(resolve_state_dir(state_dir, config.state_dir))
    state.verify()  # nothing is read from a directory others could have written
    converge(state)  # a transaction left open past its deadline with nobody on it: revert it
    return state


def entry_json(entry: Entry, *, with_layers: bool = False) -> dict[str, Any]:
    meta = entry.meta
    data: dict[str, Any] = {
        "id": entry.id,
        "kind": entry.kind,
        "time": entry.time,
        "first_time": meta.get("first_time"),
        "pending_baseline": entry.virtual,
        "tx": meta.get("tx"),
        "txs": meta.get("txs", []),
        "who": meta.get("who", {}),
        "confirmed_by": meta.get("confirmed_by"),
        "command": meta.get("command", []),
        "changed": meta.get("changed", []),
        "touched": meta.get("touched"),
        "summary": meta.get("summary"),
        "layers": sorted(entry.layers),
        "confirmations": meta.get("confirmations"),
    }
    if with_layers:
        data["content"] = {name: {label: text for label, text in
                                  known_good.layer_text(name, content).items()}
                           for name, content in entry.layers.items()}
    return data


@click.command("history", epilog=EXIT_CODES_EPILOG)
@state_options
def history_cmd(as_json: bool, state_dir: str | None, config_path: str | None) -> None:
    """List the known-good states, oldest first: every confirmed state, and the baseline
    (the state before the first change)."""
    state = _state(state_dir, config_path)
    found, damaged = known_good.entries(state)
    if as_json:
        click.echo(json.dumps({"ok": True, "entries": [entry_json(e) for e in found],
                               "damaged": [{"id": d.id, "why": d.why} for d in damaged]},
                              sort_keys=True))
        return
    if not found and not damaged:
        click.echo("no known-good state recorded yet: nothing was applied with fwsafe here")
        return
    verbose = RUN.verbosity >= 1
    shown = found if verbose else found[-HISTORY_SHOWN:]
    for entry in shown:
        mark = "  <- newest" if entry is found[-1] else ""
        pending = " (from the first transaction's snapshot)" if entry.virtual else ""
        layers = ", ".join(sorted(entry.layers))
        made_by = _made_by(entry.meta)
        click.echo(f"{entry.id:24} {format_time(entry.time)}  {entry.kind:9} "
                   f"{made_by or layers}{mark}")
        who = describe_who(entry.meta.get("who") or {}).strip()
        details = [d for d in (who, entry.meta.get("summary"), pending.strip(),
                               f"layers: {layers}" if made_by and verbose else "") if d]
        if details:
            click.echo(f"{'':24} {'; '.join(str(d) for d in details)}")
    if len(shown) < len(found):
        click.echo(f"Left out (-v): {len(found) - len(shown)} older state(s)")
    for bad in damaged:
        click.echo(f"{bad.id:24} DAMAGED: {bad.why}")


def _made_by(meta: dict[str, Any]) -> str:
    """The command that made a state, as its user typed it ("ufw allow 80/tcp", "fwsafe
    apply rules.v4"); "" when unknown (the baseline)."""
    run, command = meta.get("run"), meta.get("command")
    if run:
        return " ".join(str(a) for a in run)
    if command:
        return " ".join([os.path.basename(str(command[0])), *map(str, command[1:])])
    return ""


@click.command("show", epilog=EXIT_CODES_EPILOG)
@click.argument("entry_id", metavar="ID", shell_complete=complete_history_ids)
@state_options
def show(entry_id: str, as_json: bool, state_dir: str | None, config_path: str | None) -> None:
    """Show one known-good state: who confirmed it, what changed, and every layer.
    ID may be a unique prefix, `baseline` or `last`."""
    entry = known_good.find(_state(state_dir, config_path), entry_id)
    if as_json:
        click.echo(json.dumps({"ok": True, **entry_json(entry, with_layers=True)},
                              sort_keys=True))
        return
    meta = entry.meta
    click.echo(f"known-good state {entry.id} ({entry.kind})")
    click.echo(f"  last known good: {format_time(entry.time)}")
    if meta.get("first_time") and meta.get("first_time") != entry.time:
        click.echo(f"  first recorded:  {format_time(float(meta['first_time']))}")
    who = describe_who(meta.get("who") or {}).strip()
    if who:
        click.echo(f"  changed {who}")
    if meta.get("command"):
        click.echo(f"  command: {' '.join(str(c) for c in meta['command'])}")
    if meta.get("tx"):
        click.echo(f"  transaction: {meta['tx']}")
    if meta.get("summary"):
        click.echo(f"  summary: {meta['summary']}")
    for name, content in entry.layers.items():
        for label, text in known_good.layer_text(name, content).items():
            click.echo(f"\n=== {label}")
            click.echo(text.rstrip("\n"))


def _colour(line: str, enabled: bool) -> str:
    if not enabled:
        return line
    if line.startswith(("+++", "---")):
        return click.style(line, bold=True)
    if line.startswith("+"):
        return click.style(line, fg="green")
    if line.startswith("-"):
        return click.style(line, fg="red")
    if line.startswith("@@"):
        return click.style(line, fg="cyan")
    return line


def diff_layers(old: dict[str, bytes], new: dict[str, bytes], old_name: str,
                new_name: str) -> list[tuple[str, list[str]]]:
    """[(label, unified diff lines)] per layer (ufw: per file) that differs."""
    out = []
    for name in sorted(set(old) | set(new)):
        a = known_good.layer_text(name, old[name]) if name in old else {}
        b = known_good.layer_text(name, new[name]) if name in new else {}
        for label in sorted(set(a) | set(b)):
            lines = list(difflib.unified_diff(
                a.get(label, "").splitlines(), b.get(label, "").splitlines(),
                fromfile=f"{label} ({old_name})", tofile=f"{label} ({new_name})", lineterm=""))
            if lines:
                out.append((label, lines))
    return out


@click.command("history-diff", epilog=EXIT_CODES_EPILOG)
@click.argument("first", metavar="ID", shell_complete=complete_history_ids)
@click.argument("second", metavar="[ID2]", required=False,
                shell_complete=complete_history_ids)
@state_options
def history_diff(first: str, second: str | None, as_json: bool, state_dir: str | None,
                 config_path: str | None) -> None:
    """Show how a known-good state differs from another one (ID2) or, without ID2, from the
    live firewall now: a unified diff per layer (ufw: per file)."""
    state = _state(state_dir, config_path)
    old = known_good.find(state, first)
    if second is not None:
        other = known_good.find(state, second)
        new_layers, new_name = other.layers, other.id
    else:
        new_layers, errors = known_good.capture_layers()
        if not new_layers:
            raise EnvironmentProblem("cannot read the live firewall: " + "; ".join(
                f"{k}: {v}" for k, v in errors.items()), hint="run as root")
        new_name = "live"
    diffs = diff_layers(old.layers, new_layers, old.id, new_name)
    if as_json:
        click.echo(json.dumps({"ok": True, "from": old.id, "to": new_name,
                               "diff": {label: "\n".join(lines) for label, lines in diffs}},
                              sort_keys=True))
        return
    if not diffs:
        click.echo(f"no differences between {old.id} and {new_name}")
        return
    colour = use_colour(sys.stdout)
    for _label, lines in diffs:
        for line in lines:
            click.echo(_colour(line, colour), color=colour)


@click.command("rollback", epilog=EXIT_CODES_EPILOG)
@click.argument("entry_id", metavar="ID", shell_complete=complete_history_ids)
@click.option("--timeout", "timeout_s", metavar="SECONDS", default=None, help=TIMEOUT_HELP)
@click.option("--detach", is_flag=True,
              help="Return once the change is live and the guard armed (confirm later).")
@state_options
def rollback(entry_id: str, timeout_s: str | None, detach: bool, as_json: bool,
             state_dir: str | None, config_path: str | None) -> None:
    """Put the known-good state ID back, under the guard, like `fwsafe apply`: it reverts
    unless confirmed (`fwsafe confirm` from a NEW SSH session, or `yes` at the countdown).

    The ipv4/ipv6 rules, the native nftables tables, ufw's files, /etc/firewalld (then
    `firewall-cmd --reload`) and sshd's files of the entry are put back together, so that
    neither `ufw reload`, `firewall-cmd --reload` nor a reboot brings the bad state back."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.cli.screens import interactive_wait, report_armed

    config = load_config(config_path)
    timeout_from(config, timeout_s)   # a bad --timeout is a usage error before anything
    manager = manager_for(state_dir, config, converge=False)
    manager.state.verify()
    entry = known_good.find(manager.state, entry_id)
    change, notes = rollback_change(entry)
    for note in notes:
        click.echo(f"fwsafe: {note}", err=True)
    if already_live(entry, change):
        click.echo(json.dumps({"ok": True, "id": None, "state": "unchanged", "entry": entry.id})
                   if as_json else f"the live rules already equal {entry.id}: nothing to do")
        return
    options = apply_options(config, timeout_s)
    record = manager.apply(change, options)
    if detach or not sys.stdin.isatty():
        report_armed(record, as_json)
        return
    interactive_wait(manager, record, as_json)


COMMANDS = [history_cmd, show, history_diff, rollback]
