"""How a failed command ends: the one place where errors become exit codes and messages, and
where an unexpected exception becomes one clear line (never a traceback)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from fwsafe import __version__
from fwsafe.context import RUN
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, atomic_write, resolve_state_dir
from fwsafe.errors import ExitCode, FwsafeError, InternalError

LAST_ERROR_LOG = "last-error.log"


def wants_json(argv: Sequence[str]) -> bool:
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


def state_dir_of(args: Sequence[str]) -> Path | None:
    """The state directory of this command: the one it resolved, else --state-dir or
    $FWSAFE_STATE_DIR or the default."""
    if RUN.state_dir is not None:
        return RUN.state_dir
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


def may_be_live(state_dir: Path | None, *, any_open: bool = True) -> bool:
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
        return bool(RUN.spawned)
    if record.id in RUN.spawned:
        return record.state not in (transaction.ABORTED, transaction.REJECTED,
                                    transaction.REVERTED, transaction.CONFIRMED)
    return any_open and (record.state in transaction.OPEN_STATES
                         or record.state == transaction.REVERT_FAILED)


def interrupted(args: Sequence[str]) -> NoReturn:
    """Ctrl-C that reached the top: exit 5 if this command's change may be live, else 3.
    (`apply --host` settles its own interruptions with the host: see fwsafe.remote.interrupt.)"""
    if may_be_live(state_dir_of(args), any_open=False):
        click.echo("\nfwsafe: interrupted; the change may be live and stays under its "
                   "guard: run `fwsafe status`", err=True)
        sys.exit(int(ExitCode.REVERT_FAILED))
    click.echo("\nfwsafe: interrupted; a transaction already live stays under its guard",
               err=True)
    sys.exit(int(ExitCode.REJECTED))


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
    state_dir = state_dir_of(args)
    live = may_be_live(state_dir)
    settled = settled_code(state_dir, args)
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
    if settled is not None:
        code = settled
        message += f" (the transaction's record says {settled.name.lower().replace('_', ' ')})"
    return InternalError(message, exit_code=code, traceback_file=saved)


ACTING = ("confirm", "revert", "extend", "recover")


def settled_code(state_dir: Path | None, args: Sequence[str]) -> ExitCode | None:
    """`confirm`, `revert`, `extend` or `recover` that failed unexpectedly answer from the
    record (they may have acted before failing): 4 when it is reverted, 5 when the change is
    live (confirmed, or still open); never 3 ("nothing changed") then."""
    if not any(arg in ACTING for arg in args) or state_dir is None:
        return None
    try:
        record = transaction.load_current(StateDir(state_dir)) if os.path.isdir(state_dir) \
            else None
    except Exception:  # noqa: BLE001 - cannot tell: the usual answer
        return None
    if record is None or record.state in (transaction.ABORTED, transaction.REJECTED):
        return None
    return ExitCode.REVERTED if record.state == transaction.REVERTED else ExitCode.REVERT_FAILED


