"""confirm, revert, extend, recover, status: the commands that act on the pending transaction."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from fwsafe.cli import countdown
from fwsafe.cli.common import (
    EXIT_CODES_EPILOG,
    clock,
    complete_tx_ids,
    config_from,
    echo_styled,
    emit,
    manager_for,
    progress,
    record_summary,
    state_options,
)
from fwsafe.cli.screens import finish
from fwsafe.cli.ticker import StepTicker
from fwsafe.context import RUN
from fwsafe.control.manager import Manager
from fwsafe.core import transaction
from fwsafe.core.config import Config
from fwsafe.errors import NoTransactionError, RevertFailedError
from fwsafe.guard import hatch
from fwsafe.persistence import powercycle


# --------------------------------------------------------------------------------------------
@click.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]", shell_complete=complete_tx_ids)
@state_options
def confirm(tx_id: str | None, as_json: bool, state_dir: str | None,
            config_path: str | None) -> None:
    """Keep the pending change. Run it from a NEW SSH session: that is the proof that new
    connections still get in. Exit 4 if it was already reverted."""
    record = manager_for(state_dir, config_from(config_path)).confirm(tx_id)
    if hatch.may_be_loaded(record.hatch):
        progress("warning: the escape hatch may still be loaded: "
                 "its guard or backstop removes it; `fwsafe status` says when")
    finish(record, as_json)


@click.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]", shell_complete=complete_tx_ids)
@state_options
def revert(tx_id: str | None, as_json: bool, state_dir: str | None,
           config_path: str | None) -> None:
    """Revert the pending change now (exit 4 once reverted, 5 if the revert failed)."""
    manager = manager_for(state_dir, config_from(config_path), converge=False)
    with StepTicker(sys.stderr, total=1, enabled=not as_json and RUN.verbosity >= 0) as tick:
        tick.step("the guard is restoring the rules as they were")
        record = manager.revert(tx_id)
    finish(record, as_json)


@click.command(epilog=EXIT_CODES_EPILOG)
@click.argument("seconds", metavar="SECONDS")
@click.argument("tx_id", required=False, metavar="[ID]", shell_complete=complete_tx_ids)
@state_options
def extend(seconds: str, tx_id: str | None, as_json: bool, state_dir: str | None,
           config_path: str | None) -> None:
    """Push the pending change's deadline back by SECONDS (1 to max_timeout, 24 h by
    default)."""
    config = config_from(config_path)
    checked = config.seconds(seconds, "SECONDS")  # before anything is asked of the guard
    record = manager_for(state_dir, config).extend(checked, tx_id)
    emit(record_summary(record), as_json,
          f"transaction {record.id}: deadline now {clock(record.deadline)} "
          f"(in {countdown.format_duration(record.remaining_s() or 0)})")


@click.command(epilog=EXIT_CODES_EPILOG)
@state_options
@click.option("--boot", "at_boot", is_flag=True,
              help="As the boot unit runs it: then count this boot for the recovery by power "
                   "cycle (two boots within reboot_recovery_window, no SSH login in between: "
                   "the last known-good state is put back; docs/rescue.md).")
def recover(as_json: bool, state_dir: str | None, config_path: str | None,
            at_boot: bool) -> None:
    """Restore the snapshot of a transaction left pending without its guard (after a reboot,
    power loss or SIGKILL). With nothing pending it does nothing and says so.

    The boot unit runs it with --boot: a host reset twice within reboot_recovery_window
    (10 minutes) with no SSH login in between gets its last known-good state back (the boot
    files of netfilter-persistent and nftables, ufw's files, /etc/firewalld, sshd's
    configuration) before the firewall and sshd start; a single reboot changes nothing
    (docs/rescue.md)."""
    config = config_from(config_path)
    manager = manager_for(state_dir, config, converge=False)
    try:
        with StepTicker(sys.stderr, total=1, enabled=not as_json and RUN.verbosity >= 0) as tick:
            tick.step("restoring the snapshot")
            record = manager.recover()
    except NoTransactionError as exc:
        power = power_cycle(manager, config) if at_boot else {}
        emit({"ok": True, "state": "none", "recovered": False, **power}, as_json,
             "\n".join([exc.message, *power.values()]))
        return
    power = power_cycle(manager, config) if at_boot else {}
    if record.state == transaction.REVERT_FAILED:
        raise RevertFailedError(f"recovery FAILED: {record.error}")
    emit({**record_summary(record), "recovered": True, **power}, as_json,
          "\n".join([f"recovered: transaction {record.id} restored from its snapshot "
                     f"({record.reason})", *power.values()]))


def power_cycle(manager: Manager, config: Config) -> dict[str, str]:
    """The boot unit's count of boots and, when it is due, the recovery by power cycle."""
    if not manager.state.exists():
        return {}
    decision, done = powercycle.at_boot(manager.state, window=config.reboot_recovery_window,
                                        enabled=config.reboot_recovery)
    if done is not None:
        return {"power_cycle": powercycle.describe(done)}
    return {"power_cycle": f"power-cycle recovery: nothing to do ({decision.why})"}


@click.command(epilog=EXIT_CODES_EPILOG)
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
            echo_styled(f"warning: {warning}", fg="yellow")
        return
    manager = manager_for(state_dir, config_from(config_path))
    info = manager.status()
    info["power_cycle"] = powercycle.status_info(manager.state)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(format_status(info, verbose=RUN.verbosity >= 1))
    if info["power_cycle"] is not None and info["power_cycle"]["this_boot"]:
        echo_styled(f"this boot: {powercycle.describe(info['power_cycle'])}", fg="yellow")
    if RUN.verbosity < 1 and info["state"] != "none":
        click.echo(STATUS_LEFT_OUT)
    if RUN.verbosity >= 1:
        for event in info.get("events", []):
            click.echo(f"  {clock(event['t'])}  {event['event']}: {event['detail']}")


STATUS_LEFT_OUT = ("Left out (-v): the guard's PID, its backstop, the hatch, every unit touched, "
                   "the log, the events")


def format_status(info: dict[str, Any], verbose: bool = False) -> str:
    """One screen by default: the state, the time left and how to confirm, what the change
    touched (counted where long), anything wrong; ``verbose`` adds the guard, its backstop,
    the hatch, every unit touched and the log."""
    if info["state"] == "none":
        return "no transaction: nothing has been applied with fwsafe here"
    what = ", ".join(info["layers"]) or "command"
    lines = [f"transaction {info['id']}: {info['state']} ({what})"]
    state = info["state"]
    if state == transaction.PENDING:
        counted = " as the guard counts" if info.get("remaining_from") == "guard" else ""
        lines.append(
            f"  reverts in {countdown.format_duration(info['remaining_s'] or 0)}{counted} "
            f"(deadline {clock(info['deadline'])} wall clock) unless confirmed: "
            f"`fwsafe confirm {info['id']}`")
    if state == transaction.REVERTING and info.get("revert_attempts"):
        lines.append(f"  reverting (attempt {info['revert_attempts']}: "
                     f"{info.get('revert_last_error') or 'in progress'})")
    if info.get("revert_proofs") and state in (transaction.REVERTED,
                                               transaction.REVERT_FAILED):
        lines.append("  verified: " + ("yes (the delta is gone; SSH gets in)"
                                        if info.get("revert_verified") else "NO"))
        lines += [f"  proof: {layer}: {proof}" for layer, proof in info["revert_proofs"].items()]
    if info.get("revert_notes"):
        lines += [f"  FALLBACK: {note}" for note in info["revert_notes"]]
    if info.get("reverted_by") and state in (transaction.REVERTED, transaction.REVERT_FAILED):
        lines.append(f"  reverted by: {info['reverted_by']}")
    if info.get("guard_pid"):
        alive = ("STOPPED (SIGSTOP?): the backstop kills it past the deadline; "
                 "`fwsafe revert` stops it now" if info.get("guard_stopped") else
                 "running" if info["guard_alive"] else
                 "gone; taken over (the backstop is reverting)" if info.get("taken_over") else
                 "GONE: run `fwsafe recover`")
        if verbose or alive != "running":
            lines.append(f"  guard: PID {info['guard_pid']} ({info['guard_mode']}), {alive}")
    if info.get("unsaved"):
        lines.append("  the guard cannot write the record (disk full?): this is its own view; "
                     "the record is written once the disk takes it")
    if info.get("lock_holder"):
        lines.append(f"  the xtables lock is held by {info['lock_holder']}: the legacy tables "
                     "wait for it (the nf_tables ones need no lock)")
    if info.get("backstop") and state in transaction.OPEN_STATES and verbose:
        lines.append(f"  backstop: {info['backstop'].get('how') or info['backstop'].get('kind')}")
    if info.get("shielded") is False:
        lines.append(f"  guard NOT shielded from the OOM killer: {info['shield_error']}")
    elif info.get("shielded") and verbose:
        lines.append("  guard shielded from the OOM killer (oom_score_adj -1000)")
    hatch_line = hatch.describe(info.get("hatch"), final=state in transaction.FINAL_STATES)
    if hatch_line and (verbose or not _hatch_as_planned(hatch_line)):
        lines.append(f"  {hatch_line}")
    if info.get("run"):
        lines.append(f"  command: {' '.join(info['run'])}")
    if info.get("touched"):
        touched = "; ".join(f"{k}: {_units(v, verbose)}" for k, v in info["touched"].items())
        lines.append(f"  touched: {touched}")
    if info.get("reason") and state != transaction.PENDING:
        lines.append(f"  reason: {info['reason']}")
    if info.get("error"):
        lines.append(f"  error: {info['error']}")
    if verbose:
        lines.append(f"  log: {info['log']}")
    return "\n".join(lines)


def _units(units: list[str], verbose: bool) -> str:
    if verbose or len(units) <= 3:
        return ", ".join(units)
    return f"{len(units)} units ({', '.join(units[:2])}, ...)"


def _hatch_as_planned(line: str) -> bool:
    """The kernel escape hatch's usual states, which -v shows; a problem is always shown."""
    return line.startswith(("hatch: armed:", "hatch: removed")) and "NOT" not in line




COMMANDS = [confirm, revert, extend, recover, status]
