"""What follows an apply (of rules, a command, an sshd change, a rollback): the countdown on a
terminal, the report that the guard is armed, waiting for the probes, and the final report
whose exit code never lies."""

from __future__ import annotations

import sys
import time

import click

from fwsafe.cli import countdown
from fwsafe.cli.common import (
    clock,
    detail,
    echo_styled,
    emit,
    progress,
    record_summary,
)
from fwsafe.context import RUN
from fwsafe.control.manager import Manager
from fwsafe.core import transaction
from fwsafe.core.transaction import Record
from fwsafe.errors import (
    ChangeMayBeLiveError,
    FwsafeError,
    RevertedError,
    RevertFailedError,
)


def after_apply(manager: Manager, record: Record, *, detach: bool, yes: bool,
                 as_json: bool) -> None:
    """Countdown on a terminal; wait for the probes with --yes; otherwise return armed."""
    if yes and record.options.get("confirm_on_probe"):
        if not as_json:
            progress(f"transaction {record.id} is live; the probes decide "
                      f"(deadline {clock(record.deadline)})")
        finish(wait_final(manager, record.id, limit_s=record.timeout_s + 600), as_json)
        return
    if detach or yes or not sys.stdin.isatty():
        report_armed(record, as_json)
        return
    interactive_wait(manager, record, as_json)


def report_armed(record: Record, as_json: bool) -> None:
    summary = record_summary(record)
    text = (
        f"applied transaction {record.id} ({', '.join(record.layers)})\n"
        f"  the guard (PID {record.guard_pid}) reverts it at {clock(record.deadline)} "
        f"(in {countdown.format_duration(record.remaining_s() or 0)}) unless confirmed.\n"
        f"  confirm from a NEW SSH session:  fwsafe confirm {record.id}\n"
        f"  revert now:  fwsafe revert    more time:  fwsafe extend SECONDS"
    )
    if record.shielded is False:
        text += f"\n  warning: the guard is NOT shielded from the OOM killer ({record.shield_error})"
    emit(summary, as_json, text)
    detail(f"snapshot of {', '.join(record.captured)}; guard {record.guard_mode}; backstop: "
           f"{(record.backstop or {}).get('how', 'none')}")
    for note in record.notes:
        detail(f"note: {note}")


def interactive_wait(manager: Manager, record: Record, as_json: bool) -> None:
    tx_id = record.id
    shield = ("shielded from the OOM killer" if record.shielded
              else f"NOT shielded from the OOM killer: {record.shield_error}")
    what = ", ".join(record.layers) or " ".join(record.run or [])
    progress(
        f"transaction {tx_id} is live ({what}). The guard "
        f"(PID {record.guard_pid}, {shield}) reverts it at {clock(record.deadline)} unless "
        "confirmed.")
    if RUN.verbosity >= 0:  # the verdict, in colour on a terminal
        check = record.options.get("check", {})
        echo_styled(f"  Lockout check: {check.get('summary', 'not run')}", err=True,
                    fg="red" if check.get("lockout") else "green" if check.get("ran")
                    else "yellow")
        click.echo(
            "  Stronger proof: open a NEW SSH session and run `fwsafe confirm` there; "
            "established\n  connections survive rules that drop new ones, so this session "
            "staying alive proves little.", err=True)

    def still_open() -> bool:
        return manager.view(tx_id).state == transaction.PENDING

    latest = manager.view(tx_id)
    while True:
        answer = countdown.run_countdown(latest.deadline or time.time(), still_open)
        latest = manager.view(tx_id)
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
            latest = manager.view(tx_id)
    else:
        latest = wait_final(manager, tx_id)
    finish(latest, as_json)


def wait_final(manager: Manager, tx_id: str, limit_s: float = 600) -> Record:
    """The transaction left `pending` elsewhere; wait until the guard (or whoever took it
    over) has finished with it. The guard's own view counts: the disk may refuse the record."""
    end = time.monotonic() + limit_s
    record = manager.view(tx_id)
    while record.state in (transaction.PENDING, transaction.REVERTING) and time.monotonic() < end:
        time.sleep(0.1)
        record = manager.view(tx_id)
    return record


def finish(record: Record, as_json: bool) -> None:
    """Report how the transaction ended; exit codes never lie."""
    if record.state == transaction.CONFIRMED:
        emit(record_summary(record), as_json,
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
