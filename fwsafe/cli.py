"""The command line: a thin layer over `fwsafe.manager`. Results go to stdout, progress and
prompts to stderr; every error becomes one exit code, in `main()` alone."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from fwsafe import __version__, countdown, transaction
from fwsafe.commands import register as register_commands
from fwsafe.errors import (
    EXIT_CODE_HELP,
    ExitCode,
    FwsafeError,
    NoTransactionError,
    RevertedError,
    RevertFailedError,
)
from fwsafe.manager import ApplyOptions, Change, Manager, read_rules_file
from fwsafe.statedir import StateDir, resolve_state_dir
from fwsafe.transaction import Record

EXIT_CODES_EPILOG = "\b\nExit codes (the same for every command):\n" + "\n".join(
    f"  {int(code)}  {text}" for code, text in EXIT_CODE_HELP.items()
)

STATE_DIR_HELP = "State directory (default: $FWSAFE_STATE_DIR, else /var/lib/fwsafe)."


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, sort_keys=True))
    else:
        click.echo(text)


def _progress(message: str) -> None:
    click.echo(f"fwsafe: {message}", err=True)


def _manager(state_dir: str | None) -> Manager:
    return Manager(StateDir(resolve_state_dir(state_dir)))


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


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
@click.argument("rules", required=False, metavar="[RULES]")
@click.option("--rules6", metavar="RULES6", help="An ip6tables-save file (IPv6).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=60.0,
              show_default=True, help="Seconds until the guard reverts unless confirmed.")
@click.option("--detach", is_flag=True,
              help="Return once the change is live and the guard armed (confirm later).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
def apply(rules: str | None, rules6: str | None, timeout_s: float, detach: bool,
          as_json: bool, state_dir: str | None) -> None:
    """Apply RULES (iptables-save, IPv4) and/or --rules6 under the guard.

    Order: validate, snapshot IPv4 and IPv6, record the transaction, start the guard, apply
    atomically (iptables-restore), then wait for confirmation. Both families change under one
    guard and revert together.

    On a terminal (and without --detach) a countdown runs: type `yes` to keep the change;
    `no`, Ctrl-C, end of input or losing the session reverts at once. The stronger proof is
    `fwsafe confirm` from a NEW SSH session: established connections survive rules that drop
    new ones, so a keypress in the old session proves little.

    Without a terminal, or with --detach, fwsafe returns as soon as the change is live and
    prints the transaction id, the deadline and the confirm command.
    """
    if not rules and not rules6:
        raise click.UsageError("give RULES (IPv4) and/or --rules6 RULES6")
    change = Change()
    if rules:
        change.add("ipv4", read_rules_file(rules), rules)
    if rules6:
        change.add("ipv6", read_rules_file(rules6), rules6)
    manager = _manager(state_dir)
    options = ApplyOptions(timeout_s=timeout_s, command=list(sys.argv))
    record = manager.apply(change, options)
    interactive = not detach and sys.stdin.isatty()
    if not interactive:
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
    raise FwsafeError(f"transaction {record.id} is {record.state}")


# --------------------------------------------------------------------------------------------
# confirm / revert / extend / recover / status
# --------------------------------------------------------------------------------------------
@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
def confirm(tx_id: str | None, as_json: bool, state_dir: str | None) -> None:
    """Keep the pending change. Run it from a NEW SSH session: that is the proof that new
    connections still get in. Exit 4 if it was already reverted."""
    record = _manager(state_dir).confirm(tx_id)
    _finish(record, as_json)


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("tx_id", required=False, metavar="[ID]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
def revert(tx_id: str | None, as_json: bool, state_dir: str | None) -> None:
    """Revert the pending change now (exit 4 once reverted, 5 if the revert failed)."""
    record = _manager(state_dir).revert(tx_id)
    _finish(record, as_json)


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.argument("seconds", type=click.FloatRange(min=1))
@click.argument("tx_id", required=False, metavar="[ID]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
def extend(seconds: float, tx_id: str | None, as_json: bool, state_dir: str | None) -> None:
    """Push the pending change's deadline back by SECONDS."""
    record = _manager(state_dir).extend(seconds, tx_id)
    _emit(record_summary(record), as_json,
          f"transaction {record.id}: deadline now {_clock(record.deadline)} "
          f"(in {countdown.format_duration(record.remaining_s() or 0)})")


@cli.command(epilog=EXIT_CODES_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
def recover(as_json: bool, state_dir: str | None) -> None:
    """Restore the snapshot of a transaction left pending without its guard (after a reboot,
    power loss or SIGKILL). With nothing pending it does nothing and says so."""
    manager = _manager(state_dir)
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
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
def status(as_json: bool, state_dir: str | None) -> None:
    """Show the current transaction: state, time left, the guard and its OOM shield."""
    info = _manager(state_dir).status()
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(format_status(info))


def format_status(info: dict[str, Any]) -> str:
    if info["state"] == "none":
        return "no transaction: nothing has been applied with fwsafe here"
    lines = [f"transaction {info['id']}: {info['state']} ({', '.join(info['layers'])})"]
    state = info["state"]
    if state == transaction.PENDING:
        lines.append(
            f"  reverts in {countdown.format_duration(info['remaining_s'] or 0)} "
            f"(at {_clock(info['deadline'])}) unless confirmed: `fwsafe confirm {info['id']}`")
    if info.get("guard_pid"):
        alive = "running" if info["guard_alive"] else "GONE: run `fwsafe recover`"
        lines.append(f"  guard: PID {info['guard_pid']} ({info['guard_mode']}), {alive}")
    if info.get("shielded") is False:
        lines.append(f"  guard NOT shielded from the OOM killer: {info['shield_error']}")
    elif info.get("shielded"):
        lines.append("  guard shielded from the OOM killer (oom_score_adj -1000)")
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
def demo(timeout_s: float, keep: bool) -> None:
    """Show fwsafe's main job in a throwaway lab (two network namespaces, a real sshd):
    a lockout applied from an SSH session, the session dying, the automatic revert, and a
    new SSH login working again. Your own firewall is never touched."""
    from fwsafe.demo import run_demo

    run_demo(timeout_s=timeout_s, keep=keep)


register_commands(cli)


# --------------------------------------------------------------------------------------------
# Entry point: the one place where errors become exit codes
# --------------------------------------------------------------------------------------------
def _wants_json(argv: Sequence[str]) -> bool:
    return "--json" in argv


def fail(exc: FwsafeError, as_json: bool) -> NoReturn:
    code = int(exc.exit_code)
    if as_json:
        click.echo(json.dumps({"ok": False, "error": exc.message, "hint": exc.hint,
                               "exit_code": code, "kind": exc.__class__.__name__}))
    click.echo(f"fwsafe: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"fwsafe: {exc.hint}", err=True)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(args)
    try:
        cli.main(args=args, prog_name="fwsafe", standalone_mode=False)
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
        click.echo("\nfwsafe: interrupted; a transaction already live stays under its guard",
                   err=True)
        sys.exit(int(ExitCode.REJECTED))
    sys.exit(int(ExitCode.OK))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
