"""The command line: a thin layer over `fwsafe.core.manager`. Results go to stdout, progress and
prompts to stderr; every error becomes one exit code, in `main()` alone."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fwsafe import __version__
from fwsafe.backends.ufw import prepare_command
from fwsafe.cli import countdown
from fwsafe.cli.common import RAW_ARGS
from fwsafe.cli.common import register as register_commands
from fwsafe.config import Config, load_config
from fwsafe.core import transaction
from fwsafe.core.manager import ApplyOptions, Change, Manager, change_from_files
from fwsafe.core.statedir import RESOLVED, StateDir, atomic_write, resolve_state_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import (
    EXIT_CODE_HELP,
    ChangeMayBeLiveError,
    ExitCode,
    FwsafeError,
    InternalError,
    NoTransactionError,
    RevertedError,
    RevertFailedError,
)
from fwsafe.guard import spawn as guard
from fwsafe.probes import parse_probe

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


def _config(path: str | None) -> Config:
    return load_config(path)


def _config_path(config: Config) -> str | None:
    """The config file the CLI read, as an absolute path (the guard runs in /)."""
    return os.path.abspath(config.source) if config.source else None


def _timeout(config: Config, timeout_s: str | None) -> float:
    """--timeout (or the config's timeout), checked: finite, 1 s to max_timeout (exit 2)."""
    if timeout_s is None:
        return config.seconds(config.timeout, "timeout (config)")
    return config.seconds(timeout_s, "--timeout")


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo(text)


def _progress(message: str) -> None:
    click.echo(f"fwsafe: {message}", err=True)


def _manager(state_dir: str | None, config: Config | None = None) -> Manager:
    configured = config.state_dir if config is not None else None
    return Manager(StateDir(resolve_state_dir(state_dir, configured)))


def _clock(t: float | None) -> str:
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


@click.group(epilog=EXIT_CODES_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fwsafe")
def cli() -> None:
    """Change a firewall over SSH without locking yourself out.

    `fwsafe apply` changes the firewall under a dead-man's switch: a guard process, started
    before the change, puts the old rules back unless the change is confirmed in time. The
    guard outlives your SSH session, the CLI and (where the kernel allows) the OOM killer.

    \b
    Typical use, on the server:
      fwsafe apply new.rules                # countdown; type 'yes' to keep
      fwsafe apply --detach new.rules       # returns at once; then, from a NEW ssh session:
      fwsafe confirm                        # proves new SSH logins still work
    """


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("args", nargs=-1, metavar="[RULES] | -- COMMAND...")
@click.option("--rules6", metavar="RULES6", help="An ip6tables-save file (IPv6).")
@click.option("--timeout", "timeout_s", metavar="SECONDS", default=None, help=TIMEOUT_HELP)
@click.option("--detach", is_flag=True,
              help="Return once the change is live and the guard armed (confirm later).")
@click.option("--probe", "probes", multiple=True, metavar="URL",
              help="Run this probe during the window (tcp://, ssh://, ssh-auth://, http(s)://, "
                   "cmd:); repeatable. N failures in a row revert at once.")
@click.option("--probe-interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between probe rounds (default 2).")
@click.option("--probe-failures", type=click.IntRange(min=1), default=None,
              help="Consecutive failures of one probe that revert early (default 3).")
@click.option("--probe-timeout", type=click.FloatRange(min=0.1), default=None,
              help="Seconds each probe attempt may take (default 3, or the probe interval if "
                   "that is shorter: a failing round then takes no longer than the interval).")
@click.option("--confirm-on-probe", type=click.IntRange(min=1), default=None, metavar="M",
              help="Confirm by itself once every probe passed M times in a row.")
@click.option("--yes", is_flag=True,
              help="No prompt: wait for the probes (or the remote login) to decide.")
@click.option("--host", metavar="[USER@]HOST[:PORT]",
              help="Run from your workstation: apply on HOST over SSH and confirm only through a "
                   "NEW SSH login (a host name from the config works too).")
@click.option("-i", "--identity", metavar="KEY", help="SSH private key for --host.")
@click.option("--known-hosts", metavar="FILE", help="known_hosts for --host (default ~/.ssh/known_hosts).")
@click.option("--accept-new-host-key", is_flag=True,
              help="With --host: trust an unknown host key and record it (a changed key is "
                   "always refused).")
@click.option("--backend", type=click.Choice(["auto", "iptables", "nft"]), default="auto",
              show_default=True, help="How to read RULES: auto recognises nft files by content.")
@click.option("--force", is_flag=True,
              help="Apply even when the lockout check predicts that SSH would be cut, or when "
                   "the file would delete chains that fail2ban, Docker, kube-proxy, ... created "
                   "(the guard still reverts unless confirmed).")
@click.option("--partial", is_flag=True,
              help="Replace only the chains the file names (nft: the tables it defines); every "
                   "other chain, such as fail2ban's or Docker's, stays as it is live.")
@click.option("--no-check", is_flag=True,
              help="Skip the lockout check (e.g. after running `fwsafe check` yourself).")
@state_options
def apply(args: tuple[str, ...], rules6: str | None, timeout_s: str | None, detach: bool,
          probes: tuple[str, ...], probe_interval: float | None, probe_failures: int | None,
          probe_timeout: float | None, confirm_on_probe: int | None, yes: bool,
          host: str | None, identity: str | None,
          known_hosts: str | None, accept_new_host_key: bool, backend: str, force: bool,
          partial: bool, no_check: bool, as_json: bool, state_dir: str | None,
          config_path: str | None) -> None:
    """Apply RULES and/or --rules6 RULES6, or run `-- COMMAND`, under the guard.

    RULES is an iptables-save file (IPv4) or an nftables file (recognised by content);
    RULES6 an ip6tables-save file. Everything changes under one guard and reverts together.
    A full file replaces the tables it names. One that would delete chains other programs
    created since it was written (fail2ban's f2b-*, Docker's DOCKER*, kube-proxy's KUBE-*,
    ufw's) is refused with exit 3, naming them, unless --force; --partial replaces only the
    chains the file names (iptables-restore --noflush style) and leaves the rest.

    After `--`, a command (typically ufw) runs under the guard: every layer (iptables,
    nftables, ufw's files) is snapshotted first, and a revert restores what the command
    touched. ufw's "may disrupt existing ssh connections" prompt is answered with --force:
    the guard is the safety net.

    Order: validate, predict a lockout (`fwsafe check`: the candidate is tried with the real
    kernel in a scratch namespace against the SSH clients of this host; a predicted lockout is
    refused with exit 3 unless --force), snapshot, record the transaction, start the guard,
    apply atomically, then wait for confirmation.

    On a terminal (and without --detach) a countdown runs: type `yes` to keep the change;
    `no`, Ctrl-C, end of input or losing the session reverts at once. The stronger proof is
    `fwsafe confirm` from a NEW SSH session: established connections survive rules that drop
    new ones, so a keypress in the old session proves little.

    Without a terminal, or with --detach, fwsafe returns as soon as the change is live and
    prints the transaction id, the deadline and the confirm command.

    \b
    Examples:
      fwsafe apply new.rules --rules6 new.rules6
      fwsafe apply new.nft
      fwsafe apply --timeout 120 -- ufw deny 23/tcp
      fwsafe apply --detach --json --timeout 120 new.rules
      fwsafe apply --probe tcp://10.0.0.1:22 --confirm-on-probe 3 --yes new.rules
      fwsafe apply --host admin@web1 -i ~/.ssh/id_ed25519 new.rules     (from your laptop)
    """
    config = _config(config_path)
    options = ApplyOptions(
        timeout_s=_timeout(config, timeout_s),
        probes=list(probes) or list(config.probes),
        probe_interval=probe_interval if probe_interval is not None else config.probe_interval,
        probe_failures=probe_failures if probe_failures is not None else config.probe_failures,
        probe_timeout=probe_timeout if probe_timeout is not None else min(
            config.probe_timeout,
            probe_interval if probe_interval is not None else config.probe_interval),
        confirm_on_probe=confirm_on_probe or 0,
        command=list(sys.argv),
        check=not no_check,
        force=force,
        config_path=_config_path(config),
        max_timeout=config.max_timeout,
        boot_hook=config.boot_hook,
    )
    for url in options.probes:
        parse_probe(url)  # a bad probe is a usage error before anything happens
    if options.confirm_on_probe and not options.probes:
        raise click.UsageError("--confirm-on-probe needs at least one --probe")
    if "--" in RAW_ARGS:  # command mode: `fwsafe apply [OPTIONS] -- ufw deny 22/tcp`
        if partial:
            raise click.UsageError("--partial takes rules files, not a command")
        if host:
            raise click.UsageError("--host takes rules files, not a command")
        _apply_command(list(args), options, detach=detach, yes=yes, as_json=as_json,
                       manager=_manager(state_dir, config))
        return
    rules = args[0] if len(args) == 1 else None
    if len(args) > 1:
        raise click.UsageError("give one RULES file (IPv4) and --rules6 for IPv6; "
                               "to run a command under the guard put it after `--`")
    if not rules and not rules6:
        raise click.UsageError("give RULES (IPv4 or nft) and/or --rules6 RULES6")
    if host:
        from fwsafe.remote.apply import RemoteRequest, apply_remote

        if detach:
            raise click.UsageError("--detach does not go with --host: the workstation's job is "
                                   "to confirm through a new SSH login")
        target = config.resolve_host(host)
        options.partial = partial
        result = apply_remote(RemoteRequest(
            target=target, rules=rules, rules6=rules6, options=options,
            identity=identity or target.key, known_hosts=known_hosts or target.known_hosts,
            accept_new_host_key=accept_new_host_key, remote_state_dir=state_dir,
        ), progress=_timestamped_progress)
        _emit(result, as_json, f"confirmed ({result.get('confirmed_via')}): transaction "
                               f"{result.get('id')} on {target} stays")
        return
    change = change_from_files([rules] if rules else [], rules6, backend,
                               limit=config.max_rules_bytes)
    change.partial = partial
    manager = _manager(state_dir, config)
    record = manager.apply(change, options)
    _after_apply(manager, record, detach=detach, yes=yes, as_json=as_json)


def _apply_command(argv: list[str], options: ApplyOptions, *, detach: bool, yes: bool,
                   as_json: bool, manager: Manager) -> None:
    """Run a command (typically ufw) under the guard: every layer is snapshotted first, and a
    revert restores whatever the command touched (files and rules)."""
    run, notes = prepare_command(argv)
    for note in notes:
        _progress(note)
    change = Change(run=run, notes=notes)
    try:
        record = manager.apply(change, options)
    finally:
        _show_command_output(manager)
    _after_apply(manager, record, detach=detach, yes=yes, as_json=as_json)


def _show_command_output(manager: Manager) -> None:
    current = manager.current()
    if current is None or current.run is None:
        return
    out = manager.state.tx_dir(current.id) / "command.out"
    if out.exists():
        for line in out.read_text(errors="replace").splitlines():
            click.echo(f"  {current.run[0]}: {line}", err=True)


def _timestamped_progress(message: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} fwsafe: {message}", err=True)


def _after_apply(manager: Manager, record: Record, *, detach: bool, yes: bool,
                 as_json: bool) -> None:
    """Countdown on a terminal; wait for the probes with --yes; otherwise return armed."""
    if yes and record.options.get("confirm_on_probe"):
        if not as_json:
            _progress(f"transaction {record.id} is live; the probes decide "
                      f"(deadline {_clock(record.deadline)})")
        _finish(_wait_final(manager, record.id, limit_s=record.timeout_s + 600), as_json)
        return
    if detach or yes or not sys.stdin.isatty():
        _report_armed(record, as_json)
        return
    _interactive_wait(manager, record, as_json)


def _report_armed(record: Record, as_json: bool) -> None:
    summary = record_summary(record)
    text = (
        f"applied transaction {record.id} ({', '.join(record.layers)})\n"
        f"  the guard (PID {record.guard_pid}) reverts it at {_clock(record.deadline)} "
        f"(in {countdown.format_duration(record.remaining_s() or 0)}) unless confirmed.\n"
        f"  confirm from a NEW SSH session:  fwsafe confirm {record.id}\n"
        f"  revert now:  fwsafe revert    more time:  fwsafe extend SECONDS"
    )
    if record.shielded is False:
        text += f"\n  warning: the guard is NOT shielded from the OOM killer ({record.shield_error})"
    _emit(summary, as_json, text)


def _interactive_wait(manager: Manager, record: Record, as_json: bool) -> None:
    tx_id = record.id
    shield = ("shielded from the OOM killer" if record.shielded
              else f"NOT shielded from the OOM killer: {record.shield_error}")
    _progress(
        f"transaction {tx_id} is live ({', '.join(record.layers)}). The guard "
        f"(PID {record.guard_pid}, {shield}) reverts it at {_clock(record.deadline)} unless "
        "confirmed.\n"
        f"  Lockout check: {record.options.get('check', {}).get('summary', 'not run')}\n"
        "  Stronger proof: open a NEW SSH session and run `fwsafe confirm` there; established\n"
        "  connections survive rules that drop new ones, so this session staying alive proves "
        "little."
    )

    def still_open() -> bool:
        current = transaction.load_record(manager.state, tx_id)
        return current.state == transaction.PENDING

    latest = transaction.load_record(manager.state, tx_id)
    while True:
        answer = countdown.run_countdown(latest.deadline or time.time(), still_open)
        latest = transaction.load_record(manager.state, tx_id)
        if answer != countdown.EXTERNAL or latest.state != transaction.PENDING:
            break
    if answer == countdown.YES:
        latest = manager.confirm(tx_id)
    elif answer in (countdown.NO, countdown.EOF, countdown.INTERRUPT, countdown.HANGUP):
        why = {
            countdown.NO: "declined at the countdown ('no')",
            countdown.EOF: "end of input at the countdown",
            countdown.INTERRUPT: "interrupted at the countdown (Ctrl-C)",
            countdown.HANGUP: "the session that ran apply hung up before confirming",
        }[answer]
        try:
            latest = manager.revert(tx_id, reason=why)
        except RevertedError:
            latest = transaction.load_record(manager.state, tx_id)
    else:
        latest = _wait_final(manager, tx_id)
    _finish(latest, as_json)


def _wait_final(manager: Manager, tx_id: str, limit_s: float = 600) -> Record:
    """The transaction left `pending` elsewhere; wait until the guard has finished with it."""
    end = time.monotonic() + limit_s
    record = transaction.load_record(manager.state, tx_id)
    while record.state in (transaction.PENDING, transaction.REVERTING) and time.monotonic() < end:
        time.sleep(0.1)
        record = transaction.load_record(manager.state, tx_id)
    return record


def _finish(record: Record, as_json: bool) -> None:
    """Report how the transaction ended; exit codes never lie."""
    if record.state == transaction.CONFIRMED:
        _emit(record_summary(record), as_json,
              f"confirmed: transaction {record.id} stays. {record.reason or ''}".rstrip())
        return
    if record.state == transaction.REVERTED:
        raise RevertedError(f"transaction {record.id} was reverted: {record.reason}",
                            hint="the rules from before the change are back in force")
    if record.state == transaction.REVERT_FAILED:
        raise RevertFailedError(
            f"transaction {record.id}: the revert FAILED ({record.error}); the firewall may "
            "still hold the new rules", hint="run `fwsafe recover`; check with iptables-save")
    if record.state in transaction.OPEN_STATES:
        raise ChangeMayBeLiveError(
            f"transaction {record.id} is still {record.state}: the change may be live",
            hint="run `fwsafe status`; `fwsafe recover` if its guard is gone")
    raise FwsafeError(f"transaction {record.id} is {record.state}")


# --------------------------------------------------------------------------------------------
# confirm / revert / extend / recover / status
# --------------------------------------------------------------------------------------------
@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]")
@state_options
def confirm(tx_id: str | None, as_json: bool, state_dir: str | None,
            config_path: str | None) -> None:
    """Keep the pending change. Run it from a NEW SSH session: that is the proof that new
    connections still get in. Exit 4 if it was already reverted."""
    record = _manager(state_dir, _config(config_path)).confirm(tx_id)
    _finish(record, as_json)


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]")
@state_options
def revert(tx_id: str | None, as_json: bool, state_dir: str | None,
           config_path: str | None) -> None:
    """Revert the pending change now (exit 4 once reverted, 5 if the revert failed)."""
    record = _manager(state_dir, _config(config_path)).revert(tx_id)
    _finish(record, as_json)


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("seconds", metavar="SECONDS")
@click.argument("tx_id", required=False, metavar="[ID]")
@state_options
def extend(seconds: str, tx_id: str | None, as_json: bool, state_dir: str | None,
           config_path: str | None) -> None:
    """Push the pending change's deadline back by SECONDS (1 to max_timeout, 24 h by
    default)."""
    config = _config(config_path)
    checked = config.seconds(seconds, "SECONDS")  # before anything is asked of the guard
    record = _manager(state_dir, config).extend(checked, tx_id)
    _emit(record_summary(record), as_json,
          f"transaction {record.id}: deadline now {_clock(record.deadline)} "
          f"(in {countdown.format_duration(record.remaining_s() or 0)})")


@cli.command(epilog=EXIT_CODES_EPILOG)
@state_options
def recover(as_json: bool, state_dir: str | None, config_path: str | None) -> None:
    """Restore the snapshot of a transaction left pending without its guard (after a reboot,
    power loss or SIGKILL). With nothing pending it does nothing and says so."""
    manager = _manager(state_dir, _config(config_path))
    try:
        record = manager.recover()
    except NoTransactionError as exc:
        _emit({"ok": True, "state": "none", "recovered": False}, as_json, exc.message)
        return
    if record.state == transaction.REVERT_FAILED:
        raise RevertFailedError(f"recovery FAILED: {record.error}")
    _emit({**record_summary(record), "recovered": True}, as_json,
          f"recovered: transaction {record.id} restored from its snapshot ({record.reason})")


@cli.command(epilog=EXIT_CODES_EPILOG)
@state_options
@click.option("--layers", "show_layers", is_flag=True,
              help="Show the firewall layers of this system and which hold rules.")
def status(as_json: bool, state_dir: str | None, config_path: str | None,
           show_layers: bool) -> None:
    """Show the current transaction: state, time left, the guard and its OOM shield.

    With --layers: the firewall layers of this system (iptables nf_tables and legacy,
    nftables, ufw), which are in use, and a warning when legacy and nf_tables iptables tables
    both hold rules (both filter packets, and `iptables -L` shows only one of them)."""
    if show_layers:
        report = Manager.layers_report()
        if as_json:
            click.echo(json.dumps(report, sort_keys=True))
            return
        for entry in report["layers"]:
            state = ("not present" if not entry["available"] else
                     f"in use ({entry['units']} units)" if entry["in_use"] else "empty")
            click.echo(f"{entry['layer']:<12} {entry['label']:<16} {state}")
        for warning in report["warnings"]:
            click.echo(click.style(f"warning: {warning}", fg="yellow"))
        return
    info = _manager(state_dir, _config(config_path)).status()
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(format_status(info))


def format_status(info: dict[str, Any]) -> str:
    if info["state"] == "none":
        return "no transaction: nothing has been applied with fwsafe here"
    what = ", ".join(info["layers"]) or "command"
    lines = [f"transaction {info['id']}: {info['state']} ({what})"]
    state = info["state"]
    if state == transaction.PENDING:
        counted = " as the guard counts" if info.get("remaining_from") == "guard" else ""
        lines.append(
            f"  reverts in {countdown.format_duration(info['remaining_s'] or 0)}{counted} "
            f"(deadline {_clock(info['deadline'])} wall clock) unless confirmed: "
            f"`fwsafe confirm {info['id']}`")
    if state == transaction.REVERTING and info.get("revert_attempts"):
        lines.append(f"  reverting (attempt {info['revert_attempts']}: "
                     f"{info.get('revert_last_error') or 'in progress'})")
    if info.get("revert_notes"):
        lines += [f"  FALLBACK: {note}" for note in info["revert_notes"]]
    if info.get("reverted_by") and state in (transaction.REVERTED, transaction.REVERT_FAILED):
        lines.append(f"  reverted by: {info['reverted_by']}")
    if info.get("guard_pid"):
        alive = "running" if info["guard_alive"] else "GONE: run `fwsafe recover`"
        lines.append(f"  guard: PID {info['guard_pid']} ({info['guard_mode']}), {alive}")
    if info.get("backstop") and state in transaction.OPEN_STATES:
        lines.append(f"  backstop: {info['backstop'].get('how') or info['backstop'].get('kind')}")
    if info.get("shielded") is False:
        lines.append(f"  guard NOT shielded from the OOM killer: {info['shield_error']}")
    elif info.get("shielded"):
        lines.append("  guard shielded from the OOM killer (oom_score_adj -1000)")
    if info.get("run"):
        lines.append(f"  command: {' '.join(info['run'])}")
    if info.get("touched"):
        touched = "; ".join(f"{k}: {', '.join(v)}" for k, v in info["touched"].items())
        lines.append(f"  touched: {touched}")
    if info.get("reason") and state != transaction.PENDING:
        lines.append(f"  reason: {info['reason']}")
    if info.get("error"):
        lines.append(f"  error: {info['error']}")
    lines.append(f"  log: {info['log']}")
    return "\n".join(lines)


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=3), default=12.0,
              show_default=True, help="The guard's timeout inside the demo.")
@click.option("--keep", is_flag=True, help="Leave the lab's files for inspection.")
@click.option("--json", "as_json", is_flag=True,
              help="After the show, one JSON object with the measured times on stdout.")
def demo(timeout_s: float, keep: bool, as_json: bool) -> None:
    """Show fwsafe's main job in a throwaway lab (two network namespaces, a real sshd):
    a lockout applied from an SSH session, the session dying, the automatic revert, and a
    new SSH login working again. Your own firewall is never touched."""
    from fwsafe.lab.demo import run_demo

    result = run_demo(timeout_s=timeout_s, keep=keep, quiet=as_json)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))


@cli.command(epilog=EXIT_CODES_EPILOG, context_settings={
    "ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--timeout", "timeout_s", metavar="SECONDS", default=None, help=TIMEOUT_HELP)
@click.option("--detach", is_flag=True, help="Return once the change is live (confirm later).")
@click.option("--force", is_flag=True, help="Apply even when a lockout is predicted.")
@click.option("--no-check", is_flag=True, help="Skip the lockout check.")
@state_options
@click.argument("ufw_args", nargs=-1, type=click.UNPROCESSED, metavar="UFW-ARGS...")
def ufw(timeout_s: str | None, detach: bool, force: bool, no_check: bool, as_json: bool,
        state_dir: str | None, config_path: str | None, ufw_args: tuple[str, ...]) -> None:
    """Run `ufw UFW-ARGS...` under the guard (same as `fwsafe apply -- ufw UFW-ARGS...`).

    fwsafe's own options come before the ufw arguments:

    \b
      fwsafe ufw deny 23/tcp
      fwsafe ufw --timeout 120 enable
    """
    config = _config(config_path)
    options = ApplyOptions(timeout_s=_timeout(config, timeout_s),
                           command=list(sys.argv), check=not no_check, force=force,
                           config_path=_config_path(config), max_timeout=config.max_timeout,
                           boot_hook=config.boot_hook)
    _apply_command(["ufw", *ufw_args], options, detach=detach, yes=False, as_json=as_json,
                   manager=_manager(state_dir, config))


register_commands(cli)


# --------------------------------------------------------------------------------------------
# Entry point: the one place where errors become exit codes
# --------------------------------------------------------------------------------------------
def _wants_json(argv: Sequence[str]) -> bool:
    return "--json" in argv


def fail(exc: FwsafeError, as_json: bool) -> NoReturn:
    code = int(exc.exit_code)
    if as_json:
        data = {"ok": False, "error": exc.message, "hint": exc.hint, "exit_code": code,
                "kind": exc.__class__.__name__}
        if isinstance(exc, InternalError):
            data["traceback_file"] = exc.traceback_file
        click.echo(json.dumps(data))
    click.echo(f"fwsafe: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"fwsafe: {exc.hint}", err=True)
    sys.exit(code)


def _state_dir_of(args: Sequence[str]) -> Path | None:
    """The state directory of this command: the one it resolved, else --state-dir or
    $FWSAFE_STATE_DIR or the default."""
    if RESOLVED:
        return RESOLVED[-1]
    explicit = None
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--state-dir" and index + 1 < len(args):
            explicit = args[index + 1]
        elif arg.startswith("--state-dir="):
            explicit = arg.split("=", 1)[1]
    try:
        return resolve_state_dir(explicit)
    except Exception:  # noqa: BLE001 - only for a report
        return None


def _may_be_live(state_dir: Path | None, *, any_open: bool = True) -> bool:
    """Whether a change may be live after this command failed unexpectedly: the current
    transaction is applying, pending, reverting or revert-failed (`any_open`), or this command
    started its guard and the record does not prove that nothing is live."""
    record = None
    try:
        if state_dir is not None and os.path.isdir(state_dir):
            record = transaction.load_current(StateDir(state_dir))
    except Exception:  # noqa: BLE001 - cannot tell: only what this process did counts
        record = None
    if record is None:
        return bool(guard.SPAWNED)
    if record.id in guard.SPAWNED:
        return record.state not in (transaction.ABORTED, transaction.REJECTED,
                                    transaction.REVERTED, transaction.CONFIRMED)
    return any_open and (record.state in transaction.OPEN_STATES
                         or record.state == transaction.REVERT_FAILED)


def _save_traceback(exc: BaseException, state_dir: Path | None) -> str | None:
    """Keep the full traceback, 0600: STATE/last-error.log, else a new file in the temp dir."""
    text = (f"fwsafe {__version__} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {sys.argv!r}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    if state_dir is not None and os.path.isdir(state_dir) and not os.path.islink(state_dir):
        try:
            atomic_write(state_dir / LAST_ERROR_LOG, text.encode())
            return str(state_dir / LAST_ERROR_LOG)
        except Exception:  # noqa: BLE001 - fall back to the temp dir
            pass
    try:
        fd, name = tempfile.mkstemp(prefix="fwsafe-last-error-", suffix=".log")  # 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return name
    except OSError:
        return None


def internal_error(exc: BaseException, args: Sequence[str]) -> InternalError:
    """An unexpected exception as one line: its type and message, whether a change may be
    live (exit 5) or not (exit 3), where the traceback and the state are."""
    state_dir = _state_dir_of(args)
    live = _may_be_live(state_dir)
    saved = _save_traceback(exc, state_dir)
    detail = " ".join(str(exc).split())[:300] or "no message"
    where = (f"traceback in {saved}" if saved else "the traceback could not be saved") + \
        (f"; state in {state_dir}" if state_dir is not None else "")
    if live:
        message = (f"unexpected error: {type(exc).__name__}: {detail}; a change may be live: "
                   f"run `fwsafe status` (`fwsafe recover` if its guard is gone); {where}")
    else:
        message = (f"unexpected error: {type(exc).__name__}: {detail} (a bug in fwsafe; no "
                   f"change is pending; {where})")
    code = ExitCode.REVERT_FAILED if live else ExitCode.REJECTED
    return InternalError(message, exit_code=code, traceback_file=saved)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    RAW_ARGS[:] = args
    RESOLVED.clear()
    guard.SPAWNED.clear()
    as_json = _wants_json(args)
    try:
        returned = cli.main(args=args, prog_name="fwsafe", standalone_mode=False)
    except FwsafeError as exc:
        fail(exc, as_json)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.Abort:
        click.echo("fwsafe: aborted", err=True)
        sys.exit(int(ExitCode.USAGE))
    except KeyboardInterrupt:
        if _may_be_live(_state_dir_of(args), any_open=False):
            click.echo("\nfwsafe: interrupted; the change may be live and stays under its "
                       "guard: run `fwsafe status`", err=True)
            sys.exit(int(ExitCode.REVERT_FAILED))
        click.echo("\nfwsafe: interrupted; a transaction already live stays under its guard",
                   err=True)
        sys.exit(int(ExitCode.REJECTED))
    except Exception as exc:  # noqa: BLE001 - never a traceback: one line, and the file
        fail(internal_error(exc, args), as_json)
    # With standalone_mode=False, click returns the code of a ctx.exit(N) instead of exiting.
    sys.exit(returned if isinstance(returned, int) else int(ExitCode.OK))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
