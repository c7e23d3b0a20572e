"""What the CLI's command modules share.

Every command module of this package exposes `COMMANDS`, a list of click commands; `register()`
adds them to the main group. The core commands (apply, confirm, revert, extend, status,
recover) are in `fwsafe.cli` itself.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fwsafe.config import Config, load_config
from fwsafe.core import transaction
from fwsafe.core.manager import Manager
from fwsafe.core.statedir import StateDir, resolve_state_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import EXIT_CODE_HELP

# The command line as given (click drops the `--` that starts command mode): set by cli.main.
RAW_ARGS: list[str] = []
COMMAND_MODULES = ("apply", "transaction", "demo", "check", "diff", "history", "probe", "rescue")


def register(group: click.Group) -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"fwsafe.cli.{name}")
        for command in getattr(module, "COMMANDS", []):
            group.add_command(command)


EXIT_CODES_EPILOG = "\b\nExit codes (the same for every command):\n" + "\n".join(
    f"  {int(code)}  {text}" for code, text in EXIT_CODE_HELP.items()
)

STATE_DIR_HELP = "State directory (default: $FWSAFE_STATE_DIR, the config, else /var/lib/fwsafe)."
CONFIG_HELP = "Configuration file (default: $FWSAFE_CONFIG, else /etc/fwsafe/fwsafe.toml)."
TIMEOUT_HELP = ("Seconds until the guard reverts unless confirmed (default 60, or the config); "
                "1 to max_timeout (24 h by default).")
LAST_ERROR_LOG = "last-error.log"
F = TypeVar("F", bound=Callable[..., Any])


def state_options(func: F) -> F:
    """--json, --state-dir and --config, shared by the commands that act on the state."""
    func = click.option("--config", "config_path", help=CONFIG_HELP)(func)
    func = click.option("--state-dir", help=STATE_DIR_HELP)(func)
    return click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")(func)


def config_from(path: str | None) -> Config:
    return load_config(path)


def config_path_of(config: Config) -> str | None:
    """The config file the CLI read, as an absolute path (the guard runs in /)."""
    return os.path.abspath(config.source) if config.source else None


def timeout_from(config: Config, timeout_s: str | None) -> float:
    """--timeout (or the config's timeout), checked: finite, 1 s to max_timeout (exit 2)."""
    if timeout_s is None:
        return config.seconds(config.timeout, "timeout (config)")
    return config.seconds(timeout_s, "--timeout")


def emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo(text)


def progress(message: str) -> None:
    click.echo(f"fwsafe: {message}", err=True)


def manager_for(state_dir: str | None, config: Config | None = None) -> Manager:
    configured = config.state_dir if config is not None else None
    return Manager(StateDir(resolve_state_dir(state_dir, configured)))


def clock(t: float | None) -> str:
    if not t or not math.isfinite(t):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t))


def record_summary(record: Record) -> dict[str, Any]:
    remaining = record.remaining_s()
    return {
        "ok": record.state in (transaction.PENDING, transaction.CONFIRMED),
        "id": record.id,
        "state": record.state,
        "layers": record.layers,
        "deadline": record.deadline,
        "remaining_s": round(remaining, 1) if remaining is not None else None,
        "guard_pid": record.guard_pid,
        "shielded": record.shielded,
        "shield_error": record.shield_error,
        "reason": record.reason,
        "confirm_command": f"fwsafe confirm {record.id}",
    }


