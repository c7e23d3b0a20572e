"""CLI commands that live in modules of their own.

Every module in this package exposes `COMMANDS`, a list of click commands; `register()` adds
them to the main group. The core commands (apply, confirm, revert, extend, status, recover)
are in `fwsafe.cli`.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

# The command line as given (click drops the `--` that starts command mode): set by cli.main.
RAW_ARGS: list[str] = []


def register(group: click.Group) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", []):
            group.add_command(command)
