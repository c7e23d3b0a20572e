"""The lab's processes: commands run with the lab's errors, children stopped by PID.

Everything here signals only children this process started (by their PID or the process group
it created for them), never anything found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fwsafe.check.netns import run_command

__all__ = [
    "TERM_GRACE",
    "Children",
    "LabError",
    "LabTimeout",
    "run",
    "stop_popen",
    "tail",
    "teardown",
    "wait_answering",
]

TERM_GRACE = 3.0


class LabError(Exception):
    """The lab could not be built, used or torn down as asked."""


class LabTimeout(LabError):
    """A command run in the lab did not finish within its time limit."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a list, no shell), capture text output, map failures to :class:`LabError`
    (a timeout to :class:`LabTimeout`)."""
    return run_command(argv, check=check, input=input, timeout=timeout, env=env,
                       error=LabError, timeout_error=LabTimeout)


def tail(path: Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a text file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _exited_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for child ``pid`` to exit, leaving it unreaped (a zombie).

    While a zombie, its PID and process-group id cannot be reused, so signalling them still
    reaches only what we started. True if it exited (or was already reaped elsewhere).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True
        if res is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def teardown(steps: Sequence[tuple[str, Callable[[], object]]]) -> list[str]:
    """Run every step of a lab's teardown even when one fails; the failures ("what: error")."""
    errors: list[str] = []
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep tearing down
            errors.append(f"{what}: {exc}")
    return errors


def stop_popen(proc: subprocess.Popen[Any], *, group: bool, grace: float = TERM_GRACE) -> None:
    """Stop a child we started: SIGTERM, then SIGKILL; then reap it.

    With ``group`` (the child leads a process group we created for it) the signals go to the
    whole group; the final SIGKILL is sent while the leader is still unreaped, so the group id
    is certainly still ours.
    """
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)

    send(signal.SIGTERM)
    exited = _exited_unreaped(proc.pid, grace)
    if group or not exited:
        send(signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"pid {proc.pid} did not die after SIGKILL") from exc


def wait_answering(proc: subprocess.Popen[Any], answers: Callable[[], bool], *, what: str,
                   timeout: float, details: Callable[[], str], interval: float = 0.2,
                   on_timeout: Callable[[], object] | None = None) -> None:
    """Poll until ``answers()``: the daemon ``proc`` we started is up. Raises
    :class:`LabError` with ``details()`` (its log) if it exits first, or after ``timeout``
    seconds (having called ``on_timeout``, which stops it)."""
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"{what} exited with {proc.returncode} at start:\n{details()}")
        if answers():
            return
        if time.monotonic() > end:
            if on_timeout is not None:
                on_timeout()
            raise LabError(f"{what} did not answer within {timeout:g}s:\n{details()}")
        time.sleep(interval)


class Children:
    """Children started without waiting, each stopped by PID in :meth:`stop_all`."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[Any], bool]] = []

    def start(self, argv: Sequence[str], popen_kwargs: Mapping[str, Any]) -> subprocess.Popen[Any]:
        """Start ``argv`` (in a new session, i.e. its own process group, unless the caller
        chose otherwise) and track it."""
        kwargs = dict(popen_kwargs)
        own_group = "start_new_session" not in kwargs and "process_group" not in kwargs
        if own_group:
            kwargs["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(list(argv), **kwargs)
        self._procs.append((proc, own_group))
        return proc

    def stop_all(self) -> list[str]:
        """Stop every tracked child (its process group when it got one); the errors."""
        errors: list[str] = []
        for proc, group in self._procs:
            try:
                stop_popen(proc, group=group)
            except Exception as exc:  # keep tearing down
                errors.append(f"stopping pid {proc.pid}: {exc}")
        self._procs.clear()
        return errors
