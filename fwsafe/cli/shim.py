"""`fwsafe shim install|remove|status` (and `shim run`, what the shim execs): plain `ufw` and
`firewall-cmd` typed in an SSH session run under the guard (fwsafe.persistence.command_shims)."""

from __future__ import annotations

import json

import click

from fwsafe.cli.common import EXIT_CODES_EPILOG
from fwsafe.core.change import require_root
from fwsafe.persistence import command_shims as shim_module


def _report(done: list[str], as_json: bool, **data: object) -> None:
    if as_json:
        click.echo(json.dumps({"ok": True, "done": done, **data}, sort_keys=True))
        return
    for line in done:
        click.echo(line)


@click.group("shim", epilog=EXIT_CODES_EPILOG)
def shim() -> None:
    """Opt-in: plain `ufw` (and `firewall-cmd`) typed in an SSH session run under the guard.

    A change gets the countdown and the confirmation from a new session, as with `fwsafe ufw`;
    read-only calls (`ufw status`, `firewall-cmd --list-all`, ...) pass straight through, and
    so do scripts without a terminal (FWSAFE_SHIM=guard makes a script choose the guard;
    FWSAFE_SHIM=off always gives the plain command). dpkg-divert keeps it across package
    upgrades; `fwsafe shim remove` puts the real commands back byte for byte."""


@shim.command("install")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def install(as_json: bool) -> None:
    """Put the shim in place of ufw and firewall-cmd (those installed)."""
    require_root()
    _report(shim_module.install(), as_json)


@shim.command("remove")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def remove(as_json: bool) -> None:
    """Remove the shim: the real commands back, byte for byte."""
    require_root()
    _report(shim_module.remove(), as_json)


@shim.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def status(as_json: bool) -> None:
    """Whether the shim is active, per command."""
    found = shim_module.status()
    _report([f"{e['tool']}: shim {'ACTIVE' if e['active'] else 'not installed'} ({e['path']})"
             for e in found] or ["neither ufw nor firewall-cmd is installed"], as_json,
            commands=found)


@shim.command("run", hidden=True, context_settings={
    "ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("tool")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(tool: str, args: tuple[str, ...]) -> None:
    """What the shim runs: the real command, or `fwsafe apply -- TOOL ARGS`."""
    rest = list(args)
    if rest[:1] == ["--"]:   # the shim's separator: what follows is the command's own
        rest = rest[1:]
    shim_module.run(tool, rest)


COMMANDS = [shim]
