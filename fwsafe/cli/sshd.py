"""`fwsafe sshd set|harden`: sshd's configuration changed under the same guard as the firewall,
and `fwsafe apply --sshd-set` (see add_sshd_settings)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from fwsafe.cli.common import (
    EXIT_CODES_EPILOG,
    TIMEOUT_HELP,
    apply_options,
    config_from,
    emit,
    manager_for,
    progress,
    state_options,
    timeout_from,
)
from fwsafe.cli.screens import after_apply
from fwsafe.core.change import Change, require_root, validate_change
from fwsafe.errors import LockoutRefused
from fwsafe.sshd.lockout import REFUSED_HINT, key_check, predict_sshd
from fwsafe.sshd.sshd_change import HARDEN, SshdChange, add_to_change, plan_change
from fwsafe.sshd.sshd_config import SSHD_CONFIG

F = TypeVar("F", bound=Callable[..., Any])
SSHD_CONFIG_HELP = (f"The sshd configuration to change: the file sshd is started with (-f), "
                    f"default {SSHD_CONFIG}.")


def sshd_options(func: F) -> F:
    """What `set` and `harden` share."""
    for option in reversed([
        click.option("--sshd-config", metavar="PATH", default=None, help=SSHD_CONFIG_HELP),
        click.option("--user", metavar="USER",
                     help="Who must still log in (default: this session's user, $SUDO_USER or "
                          "$USER)."),
        click.option("--timeout", "timeout_s", metavar="SECONDS", default=None,
                     help=TIMEOUT_HELP),
        click.option("--detach", is_flag=True,
                     help="Return once the change is live and the guard armed (confirm later)."),
        click.option("--force", is_flag=True,
                     help="Apply even when a lockout is predicted (the guard still reverts "
                          "unless confirmed)."),
        click.option("--dry-run", is_flag=True,
                     help="Show the change and the lockout check's verdict; change nothing."),
    ]):
        func = option(func)
    return state_options(func)


@click.group(epilog=EXIT_CODES_EPILOG)
def sshd() -> None:
    """Change sshd's configuration under the guard.

    The files are written (a drop-in of fwsafe's own where sshd_config includes a directory of
    them, else sshd_config itself), sshd is reloaded (existing sessions live on), and the guard
    puts the files back byte for byte and reloads again unless the change is confirmed in
    time: `fwsafe confirm` from a NEW SSH session proves that the new configuration lets you
    in. Before anything changes, `sshd -t` must accept the candidate and the lockout check
    must find that you could log in again (AllowUsers/DenyUsers/..., PermitRootLogin, a key
    when passwords go, AuthenticationMethods, and a new port through the firewall).
    """


@sshd.command(name="set", epilog=EXIT_CODES_EPILOG)
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
@sshd_options
def set_(settings: tuple[str, ...], sshd_config: str | None, user: str | None,
         timeout_s: str | None, detach: bool, force: bool, dry_run: bool, as_json: bool,
         state_dir: str | None, config_path: str | None) -> None:
    """Set KEY=VALUE in sshd's configuration, under the guard.

    Keywords whose lines add up (Port, ListenAddress, AllowUsers, ...) are set as a whole:
    give the key twice for two values (Port=22 Port=2222). To move the port and open it in the
    firewall in one window: `fwsafe apply RULES --sshd-set Port=2222`.

    \b
    Examples:
      fwsafe sshd set PasswordAuthentication=no
      fwsafe sshd set --detach --timeout 120 AllowUsers="alice bob"
      ssh server fwsafe confirm          # from a NEW session
    """
    run(plan_change(sshd_config, settings), user=user, timeout_s=timeout_s, detach=detach,
        force=force, dry_run=dry_run, as_json=as_json, state_dir=state_dir,
        config_path=config_path)


@sshd.command(epilog=EXIT_CODES_EPILOG)
@sshd_options
def harden(sshd_config: str | None, user: str | None, timeout_s: str | None, detach: bool,
           force: bool, dry_run: bool, as_json: bool, state_dir: str | None,
           config_path: str | None) -> None:
    """Key-only logins in one step: PasswordAuthentication no, KbdInteractiveAuthentication
    no, PermitRootLogin prohibit-password, under the guard.

    Refused (exit 3) unless the user who must log in again has an authorized key that sshd
    would accept (Ed25519 preferred: a warning when there are only RSA or ECDSA keys).
    """
    sshd_change = plan_change(sshd_config, HARDEN)
    if sshd_change.content is not None:  # something to change: the key comes first
        problems, warnings = key_check(sshd_change.config, sshd_change.plan.files, user)
        for warning in warnings:
            progress(f"warning: {warning}")
        if problems and not force:
            raise LockoutRefused("lockout predicted: " + "; ".join(problems),
                                 hint=REFUSED_HINT)
    run(sshd_change, user=user, timeout_s=timeout_s, detach=detach, force=force,
        dry_run=dry_run, as_json=as_json, state_dir=state_dir, config_path=config_path)


def run(sshd_change: SshdChange, *, user: str | None, timeout_s: str | None, detach: bool,
        force: bool, dry_run: bool, as_json: bool, state_dir: str | None,
        config_path: str | None) -> None:
    """Apply (or, with dry_run, show) a planned change under the guard."""
    config = config_from(config_path)
    timeout_from(config, timeout_s)   # a bad --timeout is a usage error before anything
    for line in sshd_change.describe():
        progress(line)
    if sshd_change.content is None:
        emit({"ok": True, "changed": False, "files": []}, as_json,
             "nothing to change: sshd's configuration already says so")
        return
    change = Change()
    add_to_change(change, sshd_change)
    if dry_run:
        require_root()
        validate_change(change)
        verdict = predict_sshd(change, user)
        diff = sshd_change.diff()
        if verdict.lockout and not force:
            click.echo(diff, nl=False, err=True)
            raise LockoutRefused("lockout predicted: " + "; ".join(verdict.problems),
                                 hint=REFUSED_HINT)
        emit({"ok": True, "changed": False, "dry_run": True, "files": sorted(
            sshd_change.plan.files), "diff": diff, "check": verdict.summary()}, as_json,
             f"{diff}dry run: nothing was changed. Lockout check: {verdict.summary()}")
        return
    options = apply_options(config, timeout_s, force=force, login_user=user)
    manager = manager_for(state_dir, config)
    record = manager.apply(change, options)
    after_apply(manager, record, detach=detach, yes=False, as_json=as_json)


def add_sshd_settings(change: Change, sshd_config: str | None, settings: Sequence[str]) -> None:
    """`fwsafe apply RULES --sshd-set KEY=VALUE`: the sshd part of one change."""
    sshd_change = plan_change(sshd_config, settings)
    for line in sshd_change.describe():
        progress(line)
    if sshd_change.content is None and not change.layers:
        progress("nothing to change: sshd's configuration already says so")
        raise click.exceptions.Exit(0)
    add_to_change(change, sshd_change)


COMMANDS = [sshd]
