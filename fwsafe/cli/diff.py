"""`fwsafe diff`: what a change would do, per layer, before it is applied."""

from __future__ import annotations

import json
import sys

import click

from fwsafe.backends.ufw import prepare_command
from fwsafe.check.diff import UnitDiff, diff_change
from fwsafe.cli.common import RAW_ARGS, use_colour
from fwsafe.config import load_config
from fwsafe.core.change import Change, change_from_files, require_root


def _render(diffs: list[UnitDiff], color: bool) -> str:
    if not diffs:
        return "no change: the live firewall already looks like this"
    out = []
    for item in diffs:
        out.append(click.style(f"{item.layer}  {item.unit}  ({item.kind})", bold=True)
                   if color else f"{item.layer}  {item.unit}  ({item.kind})")
        for line in item.diff.splitlines():
            if color and line.startswith("+") and not line.startswith("+++"):
                line = click.style(line, fg="green")
            elif color and line.startswith("-") and not line.startswith("---"):
                line = click.style(line, fg="red")
            out.append(f"  {line}")
    return "\n".join(out)


@click.command(name="diff")
@click.argument("args", nargs=-1, metavar="[RULES] | -- COMMAND...")
@click.option("--rules6", metavar="RULES6", help="An ip6tables-save file (IPv6).")
@click.option("--backend", type=click.Choice(["auto", "iptables", "nft"]), default="auto",
              show_default=True, help="How to read RULES: auto recognises nft files by content.")
@click.option("--partial", is_flag=True,
              help="The file replaces only the chains (nft: tables) it names, as with apply.")
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
    if "--" in RAW_ARGS:
        run, _notes = prepare_command(list(args))
        change = Change(run=run)
    else:
        if not args and not rules6:
            raise click.UsageError("give RULES and/or --rules6 RULES6, or `-- COMMAND...`")
        change = change_from_files(args, rules6, backend,
                                   limit=load_config(None).max_rules_bytes)
        change.partial = partial
    diffs = diff_change(change)
    if as_json:
        click.echo(json.dumps({"changed": bool(diffs), "units": [d.to_json() for d in diffs]},
                              sort_keys=True))
        return
    colour = use_colour(sys.stdout)
    click.echo(_render(diffs, color=colour), color=colour)


COMMANDS = [diff]
