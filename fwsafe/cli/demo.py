"""`fwsafe demo`: the main job, shown in a throwaway namespace lab."""

from __future__ import annotations

import json

import click

from fwsafe.cli.common import EXIT_CODES_EPILOG


@click.command(epilog=EXIT_CODES_EPILOG)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=3), default=12.0,
              show_default=True, help="The guard's timeout inside the demo.")
@click.option("--keep", is_flag=True, help="Leave the lab's files for inspection.")
@click.option("--json", "as_json", is_flag=True,
              help="After the show, one JSON object with the measured times on stdout.")
def demo(timeout_s: float, keep: bool, as_json: bool) -> None:
    """Show fwsafe's main job in a throwaway lab (two network namespaces, a real sshd):
    a lockout applied from an SSH session, the session dying, the automatic revert, and a
    new SSH login working again. Your own firewall is never touched."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.lab.lab_demo import run_demo

    result = run_demo(timeout_s=timeout_s, keep=keep, quiet=as_json)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))




COMMANDS = [demo]
