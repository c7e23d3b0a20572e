"""What the CLI's command modules share.

Every command module of this package exposes `COMMANDS`, a list of click commands; `register()`
adds them to the main group. The core commands (apply, confirm, revert, extend, status,
recover) are in `fwsafe.cli` itself.
"""

from __future__ import annotations

import importlib

import click

# The command line as given (click drops the `--` that starts command mode): set by cli.main.
RAW_ARGS: list[str] = []
COMMAND_MODULES = ("check", "diff", "history", "probe", "rescue")


def register(group: click.Group) -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"fwsafe.cli.{name}")
        for command in getattr(module, "COMMANDS", []):
            group.add_command(command)
