"""`fwsafe diff`: what a change would do, per layer, before it is applied."""

from __future__ import annotations

import json
import sys

import click

from fwsafe.backends.ufw_layer import prepare_command
from fwsafe.check.change_diff import UnitDiff, diff_change
from fwsafe.cli.common import (
    SeparatorCommand,
    after_separator,
    backend_option,
    partial_option,
    rules6_option,
    use_colour,
)
from fwsafe.cli.ticker import StepTicker
from fwsafe.context import RUN
from fwsafe.core.change import Change, change_from_files, require_root
from fwsafe.core.config import load_config

DIFF_SHOWN = 30   # changed lines `fwsafe diff` shows by default; -v: every line, with context


def _render(diffs: list[UnitDiff], color: bool, verbose: bool = False) -> str:
    """The units that change first; then each unit's changed lines (by default only the
    added and removed ones, up to DIFF_SHOWN, and one line of what was left out; ``verbose``:
    the unified diffs whole)."""
    if not diffs:
        return "no change: the live firewall already looks like this"
    layers = ", ".join(dict.fromkeys(item.layer for item in diffs))
    out = [f"Result: {len(diffs)} unit(s) would change ({layers}); nothing was changed"]
    shown = hidden = 0
    for item in diffs:
        head = f"{item.layer}  {item.unit}  ({item.kind})"
        out.append(click.style(head, bold=True) if color else head)
        for line in item.diff.splitlines():
            changed = line[:1] in ("+", "-") and not line.startswith(("+++", "---"))
            if not verbose and (not changed or shown >= DIFF_SHOWN):
                hidden += changed
                continue
            shown += changed
            if color and changed:
                line = click.style(line, fg="green" if line.startswith("+") else "red")
            out.append(f"  {line}")
    if hidden:
        out.append(f"Left out (-v): {hidden} more changed line(s), and the context of each")
    elif not verbose:
        out.append("Left out (-v): the unchanged lines around them")
    return "\n".join(out)


@click.command(name="diff", cls=SeparatorCommand)
@click.argument("args", nargs=-1, metavar="[RULES] | -- COMMAND...")
@rules6_option
@backend_option
@partial_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def diff(args: tuple[str, ...], rules6: str | None, backend: str, partial: bool,
         as_json: bool) -> None:
    """Show what RULES (or `-- COMMAND`, e.g. `-- ufw deny 22/tcp`) would change, per layer
    (iptables chains, nftables tables, ufw files), without changing anything.

    The change is tried on a copy of the live firewall in a scratch network namespace (a
    command in a sandbox where every file is a private copy and no daemon of this host is
    reachable), so the diff is what the kernel and ufw would really do. Colored on a
    terminal, plain in a pipe, structured with --json. Exit 0; 3 (nothing changed): invalid
    rules, a command that failed on the copy, or one that cannot be tried on a copy because
    it talks to a daemon (firewall-cmd to firewalld over D-Bus: `fwsafe apply` runs it under
    the guard).
    """
    require_root()
    if after_separator():
        run, _notes = prepare_command(list(args))
        change = Change(run=run)
    else:
        if not args and not rules6:
            raise click.UsageError("give RULES and/or --rules6 RULES6, or `-- COMMAND...`")
        change = change_from_files(args, rules6, backend,
                                   limit=load_config(None).max_rules_bytes)
        change.partial = partial
    with StepTicker(sys.stderr, total=1, enabled=not as_json and RUN.verbosity >= 0) as tick:
        tick.step("trying the change on a copy, in a scratch namespace")
        diffs = diff_change(change)
    if as_json:
        click.echo(json.dumps({"changed": bool(diffs), "units": [d.to_json() for d in diffs]},
                              sort_keys=True))
        return
    colour = use_colour(sys.stdout)
    click.echo(_render(diffs, color=colour, verbose=RUN.verbosity >= 1), color=colour)


COMMANDS = [diff]
