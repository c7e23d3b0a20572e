"""What the CLI's command modules share.

Every command module of this package exposes `COMMANDS`, a list of click commands. The main
group (`LazyGroup`) imports a module only when one of its commands runs (or `--help` lists
them): `fwsafe revert` does not pay for importing the check, the audit and the rest.
`COMMAND_TABLE` says which module holds which command (a unit test keeps it true).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fwsafe.check.proof import PROVER
from fwsafe.context import RUN
from fwsafe.control.manager import Manager
from fwsafe.core import transaction
from fwsafe.core.config import Config, load_config
from fwsafe.core.statedir import StateDir, resolve_state_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import EXIT_CODE_HELP
from fwsafe.guard.spawn import converge as converge_orphan
from fwsafe.steps import on_confirmed

if TYPE_CHECKING:
    from fwsafe.control.flow import ApplyOptions

COMMAND_MODULES = ("apply", "pending", "demo", "check", "diff", "history", "probe", "rescue",
                   "audit", "sshd", "shim")
COMMAND_TABLE = {
    "apply": "apply", "ufw": "apply", "firewall-cmd": "apply",
    "confirm": "pending", "revert": "pending", "extend": "pending",
    "recover": "pending", "status": "pending",
    "demo": "demo", "check": "check", "diff": "diff",
    "history": "history", "show": "history", "history-diff": "history", "rollback": "history",
    "probe": "probe", "rescue": "rescue", "install-boot-hook": "rescue",
    "audit": "audit", "sshd": "sshd", "shim": "shim",
}


def load_module(group: click.Group, module_name: str) -> None:
    """Add the commands of ``fwsafe.cli.<module_name>`` to `group` (with -q/-v)."""
    module = importlib.import_module(f"fwsafe.cli.{module_name}")
    for command in getattr(module, "COMMANDS", []):
        if command.name not in group.commands:
            add_output_options(command)
            group.add_command(command)


class LazyGroup(click.Group):
    """The main group: a command's module is imported when the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMAND_TABLE))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_TABLE:
            load_module(self, COMMAND_TABLE[cmd_name])
        return self.commands.get(cmd_name)

    def load_all(self) -> None:
        for name in COMMAND_MODULES:
            load_module(self, name)


AFTER_SEPARATOR = "fwsafe.after_separator"


class SeparatorCommand(click.Command):
    """A command whose arguments may follow `--` (`fwsafe apply -- ufw deny 22/tcp`).

    click's parser drops the `--` that ends the options; this command's own parse records in
    `ctx.meta[AFTER_SEPARATOR]` how many of its arguments came before it (absent: no `--`).
    A `--` taken as an option's value (`--rules6 --`, a file named `--`) is not one.
    click has no public hook for this: the parser's two steps (the loop over the arguments,
    one option with its values) are wrapped on the parser instance, the same methods from
    click 8.0 to 8.5."""

    def make_parser(self, ctx: click.Context) -> Any:
        parser = super().make_parser(ctx)
        read_args, read_option = parser._process_args_for_options, parser._process_opts
        option_end = [-1]   # len(state.rargs) after the last option and its values

        def one_option(arg: str, state: Any) -> None:
            read_option(arg, state)
            option_end[0] = len(state.rargs)

        def all_options(state: Any) -> None:
            given = list(state.rargs)
            read_args(state)
            left = len(state.rargs)
            # The loop pops one argument at a time and stops at `--` (which it drops): the
            # argument before the rest is that `--`, unless an option took it as its value.
            if left < len(given) and option_end[0] != left and given[-left - 1] == "--":
                ctx.meta[AFTER_SEPARATOR] = len(state.largs)

        setattr(parser, "_process_opts", one_option)  # noqa: B010 - a method of the instance
        setattr(parser, "_process_args_for_options", all_options)  # noqa: B010
        return parser


def after_separator(ctx: click.Context | None = None) -> bool:
    """Whether the command line of `ctx` (default: the current one) had a `--` that ended the
    options: its arguments are a command to run, not rules files."""
    return AFTER_SEPARATOR in (ctx or click.get_current_context()).meta


# -- how much to say ---------------------------------------------------------------------------


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        RUN.verbosity = -1


def _set_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        RUN.verbosity = max(RUN.verbosity, 0) + value
    if RUN.verbosity >= 2:
        RUN.trace[:] = [lambda argv: click.echo("fwsafe: run: " + " ".join(argv), err=True)]


def add_output_options(command: click.Command) -> None:
    """-q/--quiet and -v/--verbose on every command (and every subcommand of a group)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_output_options(sub)
    names = {opt for param in command.params for opt in getattr(param, "opts", [])}
    if "--quiet" in names:
        return
    command.params.append(click.Option(
        ["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_quiet,
        help="Results and errors only: no progress messages on stderr."))
    command.params.append(click.Option(
        ["-v", "--verbose"], count=True, expose_value=False, callback=_set_verbose,
        help="More detail on stderr; -vv also shows every command fwsafe runs."))


def use_colour(stream: Any) -> bool:
    """Colour only on a terminal, never with NO_COLOR set (no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def echo_styled(text: str, *, err: bool = False, **style: Any) -> None:
    """click.echo with a style that is dropped where colour is not wanted."""
    stream = sys.stderr if err else sys.stdout
    colour = use_colour(stream)
    click.echo(click.style(text, **style) if colour else text, err=err, color=colour)


# -- completion --------------------------------------------------------------------------------
def _state_for_completion(ctx: click.Context) -> StateDir | None:
    try:
        return StateDir(resolve_state_dir(ctx.params.get("state_dir"),
                                          load_config(ctx.params.get("config_path")).state_dir))
    except Exception:  # noqa: BLE001 - completion must never fail loudly
        return None


def complete_tx_ids(ctx: click.Context, param: click.Parameter,
                    incomplete: str) -> list[str]:
    """Transaction ids for shell completion (newest first)."""
    state = _state_for_completion(ctx)
    if state is None:
        return []
    try:
        names = sorted((p.name for p in (state.root / "tx").iterdir()), reverse=True)
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


def complete_history_ids(ctx: click.Context, param: click.Parameter,
                         incomplete: str) -> list[str]:
    """Known-good state ids for shell completion (newest first)."""
    state = _state_for_completion(ctx)
    if state is None:
        return []
    try:
        names = sorted((p.name for p in (state.root / "history").iterdir()
                        if not p.name.startswith(".")), reverse=True)
    except OSError:
        return []
    return [n for n in names if n.startswith(incomplete)]


EXIT_CODES_EPILOG = "\b\nExit codes (the same for every command):\n" + "\n".join(
    f"  {int(code)}  {text}" for code, text in EXIT_CODE_HELP.items()
)

STATE_DIR_HELP = "State directory (default: $FWSAFE_STATE_DIR, the config, else /var/lib/fwsafe)."
CONFIG_HELP = "Configuration file (default: $FWSAFE_CONFIG, else /etc/fwsafe/fwsafe.toml)."
TIMEOUT_HELP = ("Seconds until the guard reverts unless confirmed (default 60, or the config); "
                "1 to max_timeout (24 h by default).")
F = TypeVar("F", bound=Callable[..., Any])

# Options every command that reads a rules file shares (apply, check, diff, audit).
rules6_option = click.option("--rules6", metavar="RULES6", help="An ip6tables-save file (IPv6).")
backend_option = click.option(
    "--backend", type=click.Choice(["auto", "iptables", "nft"]), default="auto",
    show_default=True, help="How to read RULES: auto recognises nft files by content.")
PARTIAL_AS_APPLY = "The file replaces only the chains (nft: tables) it names, as with apply."


def partial_option(help_text: str = PARTIAL_AS_APPLY) -> Callable[[F], F]:
    return click.option("--partial", is_flag=True, help=help_text)


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


def apply_options(config: Config, timeout_s: str | None, **fields: Any) -> ApplyOptions:
    """The options of a change made under the guard, with everything the config decides (the
    timeout, the config file for the guard, max_timeout, the boot hook, the guard's, backstop's
    and hatch's settings, the probes) taken from it: every command that applies builds them
    here, so none ignores a setting; `fields` are the command's own (its options, which win:
    --probe, check, force, login_user...)."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.control.flow import ApplyOptions
    from fwsafe.steps import apply_steps

    settings: dict[str, Any] = {
        "timeout_s": timeout_from(config, timeout_s), "command": list(sys.argv),
        "config_path": config_path_of(config), "max_timeout": config.max_timeout,
        "boot_hook": config.boot_hook, "stuck_grace": config.stuck_grace, "hatch": config.hatch,
        "hatch_grace": config.hatch_grace, "admin_sources": list(config.admin_sources),
        "probes": list(config.probes), "probe_interval": config.probe_interval,
        "probe_failures": config.probe_failures,
        "probe_timeout": min(config.probe_timeout, config.probe_interval),
    }
    return ApplyOptions(**{**settings, **apply_steps(), **fields})


def emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo(text)


def progress(message: str) -> None:
    if RUN.verbosity >= 0:
        click.echo(f"fwsafe: {message}", err=True)


def detail(message: str) -> None:
    """Said with -v only."""
    if RUN.verbosity >= 1:
        click.echo(f"fwsafe: {message}", err=True)


def manager_for(state_dir: str | None, config: Config | None = None, *,
                converge: bool = True) -> Manager:
    """The Manager of the state directory chosen. With `converge` (every command but those
    that revert an orphaned transaction themselves: apply, revert, recover) a transaction left
    open past its deadline with nobody looking after it is taken over first, so that what
    the command says is the truth (fwsafe.guard.spawn.converge)."""
    configured = config.state_dir if config is not None else None
    state = StateDir(resolve_state_dir(state_dir, configured))
    if converge:
        converge_orphan(state)
    return Manager(state, on_confirmed=on_confirmed, prover=PROVER)


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


