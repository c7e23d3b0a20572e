"""confirm, revert, extend, recover, status: the commands that act on the pending transaction."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from fwsafe.cli import countdown
from fwsafe.cli.apply import finish
from fwsafe.cli.common import (
    EXIT_CODES_EPILOG,
    VERBOSITY,
    clock,
    complete_tx_ids,
    config_from,
    echo_styled,
    emit,
    manager_for,
    record_summary,
    state_options,
)
from fwsafe.cli.ticker import StepTicker
from fwsafe.core import transaction
from fwsafe.core.manager import Manager
from fwsafe.errors import NoTransactionError, RevertFailedError
from fwsafe.guard import hatch


# --------------------------------------------------------------------------------------------
@click.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]", shell_complete=complete_tx_ids)
@state_options
def confirm(tx_id: str | None, as_json: bool, state_dir: str | None,
            config_path: str | None) -> None:
    """Keep the pending change. Run it from a NEW SSH session: that is the proof that new
    connections still get in. Exit 4 if it was already reverted."""
    record = manager_for(state_dir, config_from(config_path)).confirm(tx_id)
    finish(record, as_json)


@click.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]", shell_complete=complete_tx_ids)
@state_options
def revert(tx_id: str | None, as_json: bool, state_dir: str | None,
           config_path: str | None) -> None:
    """Revert the pending change now (exit 4 once reverted, 5 if the revert failed)."""
    manager = manager_for(state_dir, config_from(config_path))
    with StepTicker(sys.stderr, total=1, enabled=not as_json and VERBOSITY[0] >= 0) as tick:
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
def recover(as_json: bool, state_dir: str | None, config_path: str | None) -> None:
    """Restore the snapshot of a transaction left pending without its guard (after a reboot,
    power loss or SIGKILL). With nothing pending it does nothing and says so."""
    manager = manager_for(state_dir, config_from(config_path))
    try:
        with StepTicker(sys.stderr, total=1, enabled=not as_json and VERBOSITY[0] >= 0) as tick:
            tick.step("restoring the snapshot")
            record = manager.recover()
    except NoTransactionError as exc:
        emit({"ok": True, "state": "none", "recovered": False}, as_json, exc.message)
        return
    if record.state == transaction.REVERT_FAILED:
        raise RevertFailedError(f"recovery FAILED: {record.error}")
    emit({**record_summary(record), "recovered": True}, as_json,
          f"recovered: transaction {record.id} restored from its snapshot ({record.reason})")


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
    info = manager_for(state_dir, config_from(config_path)).status()
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(format_status(info))
    if VERBOSITY[0] >= 1:
        for event in info.get("events", []):
            click.echo(f"  {clock(event['t'])}  {event['event']}: {event['detail']}")


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
        lines.append(f"  guard: PID {info['guard_pid']} ({info['guard_mode']}), {alive}")
    if info.get("unsaved"):
        lines.append("  the guard cannot write the record (disk full?): this is its own view; "
                     "the record is written once the disk takes it")
    if info.get("lock_holder"):
        lines.append(f"  the xtables lock is held by {info['lock_holder']}: the legacy tables "
                     "wait for it (the nf_tables ones need no lock)")
    if info.get("backstop") and state in transaction.OPEN_STATES:
        lines.append(f"  backstop: {info['backstop'].get('how') or info['backstop'].get('kind')}")
    if info.get("shielded") is False:
        lines.append(f"  guard NOT shielded from the OOM killer: {info['shield_error']}")
    elif info.get("shielded"):
        lines.append("  guard shielded from the OOM killer (oom_score_adj -1000)")
    hatch_line = hatch.describe(info.get("hatch"), final=state in transaction.FINAL_STATES)
    if hatch_line:
        lines.append(f"  {hatch_line}")
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




COMMANDS = [confirm, revert, extend, recover, status]
