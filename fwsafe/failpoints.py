"""Named failpoints: fault injection at every step of the way forward and back, for tests.

Inert unless the environment variable FWSAFE_FAILPOINTS names failpoints (the guard, its
backstop and the systemd unit get FWSAFE_* from the CLI, so one variable reaches every process
of a transaction)::

    FWSAFE_FAILPOINTS="guard.pending=stop;backstop.taking-over=pause"

Each entry is NAME=ACTION; an action fires once per process (the first time the process passes
the failpoint), unless it ends in ``*`` (every time). Actions:

``raise``, ``raise:NAME``
    raise an exception (RuntimeError, or MemoryError / OSError / KeyboardInterrupt / ...)
``kill``
    SIGKILL this process (a crash, the OOM killer)
``stop``
    SIGSTOP this process (a frozen process: SIGCONT resumes it)
``exit``
    end this process at once (os._exit(99))
``sleep:SECONDS``
    sleep (a slow step)
``pause``
    write ``FAILPOINT_DIR/NAME.PID`` (FWSAFE_FAILPOINT_DIR, default /run/fwsafe-failpoints)
    and wait until that file is removed: a test sees who reached the step and acts on the
    processes (kills, stops), then lets it go on (or not).

`POINTS` lists every failpoint with where it is. Standard library only: imported by core and
guard alike, and by the guard and the backstop, which keep their imports small.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from fwsafe.context import RUN

ENV = "FWSAFE_FAILPOINTS"
DIR_ENV = "FWSAFE_FAILPOINT_DIR"
DEFAULT_DIR = "/run/fwsafe-failpoints"

#: Every failpoint: name -> the process it is in and the step it precedes.
POINTS: dict[str, str] = {
    # `fwsafe apply` (the CLI)
    "apply.locked": "cli: the state directory is locked; nothing read yet",
    "apply.standby": "cli: the guard is started, standing by",
    "apply.prepared": "cli: snapshot and record (preparing) saved; the guard not yet told to go",
    "apply.go": "cli: the guard was told to go",
    "apply.pending": "cli: the guard reported the change live (pending)",
    # the guard
    "guard.armed": "guard: the record says applying; the backstop not started yet",
    "guard.applying": "guard: the backstop runs; the change is about to be loaded",
    "guard.applied": "guard: the change is loaded; the record still says applying",
    "guard.pending": "guard: the record says pending; nothing captured after the change yet",
    "guard.waiting": "guard: captured after the change, the hatch checked; waiting",
    "guard.reverting": "guard: the record says reverting; nothing undone yet",
    "guard.reverted": "guard: the change is undone; the record not yet reverted",
    "guard.confirming": "guard: a confirmation arrived; the record still says pending",
    "guard.confirmed": "guard: the record says confirmed; hatch and boot files not yet done",
    # `fwsafe confirm` / `fwsafe revert` (the CLI)
    "confirm.asking": "cli: `fwsafe confirm` is about to ask the guard",
    "confirm.answered": "cli: the guard answered the confirmation",
    "revert.asking": "cli: `fwsafe revert` is about to ask the guard",
    "revert.answered": "cli: the guard answered the revert",
    # the revert loop (guard, backstop, recover)
    "revert.round": "any: a round of the revert begins",
    # `fwsafe recover` and the backstop's take-over
    "recover.claimed": "recover: the transaction is claimed and marked reverting",
    "recover.reverted": "recover: the change is undone; the record not yet written",
    "backstop.killing": "backstop: the guard is stuck past its deadline; about to kill it",
    "backstop.taking-over": "backstop: the guard is gone; about to revert",
}

EXCEPTIONS: dict[str, type[BaseException]] = {
    "RuntimeError": RuntimeError, "MemoryError": MemoryError, "OSError": OSError,
    "KeyboardInterrupt": KeyboardInterrupt, "ValueError": ValueError,
}


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is plain ``raise``."""


def _parse(text: str) -> dict[str, str]:
    points: dict[str, str] = {}
    for entry in text.replace(",", ";").split(";"):
        name, sep, action = entry.strip().partition("=")
        if sep and name.strip() and action.strip():
            points[name.strip()] = action.strip()
    return points


_ACTIVE: dict[str, str] = _parse(os.environ.get(ENV, ""))


def active() -> dict[str, str]:
    """The failpoints this process was started with (empty: inert)."""
    return dict(_ACTIVE)


def hit(name: str) -> None:
    """Pass failpoint `name`: nothing, unless FWSAFE_FAILPOINTS names it."""
    if not _ACTIVE:
        return
    action = _ACTIVE.get(name)
    if action is None:
        return
    every = action.endswith("*")
    action = action.rstrip("*")
    if not every:
        if name in RUN.fired:
            return
        RUN.fired.add(name)
    kind, _, arg = action.partition(":")
    if kind == "raise":
        error = EXCEPTIONS.get(arg, FailpointError) if arg else FailpointError
        raise error(f"failpoint {name}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "exit":
        os._exit(99)
    elif kind == "sleep":
        time.sleep(float(arg or 1))
    elif kind == "pause":
        _pause(name)


def _pause(name: str) -> None:
    directory = Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)
    marker = directory / f"{name}.{os.getpid()}"
    partial = directory / f".{marker.name}"   # whoever sees the marker sees it whole
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial.write_text(f"{os.getpid()}\n")
        os.replace(partial, marker)
    except OSError:
        return   # nowhere to say where we are: go on
    while marker.exists():
        time.sleep(0.02)
