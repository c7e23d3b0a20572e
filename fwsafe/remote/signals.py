"""Ctrl-C (SIGTERM, SIGHUP) in `fwsafe apply --host`, raised only where that is safe.

A signal handler that raises KeyboardInterrupt wherever the main thread happens to be can stop
paramiko between taking one of its locks and entering the ``try`` that releases it (e.g.
``Transport._send_user_message`` takes ``clear_to_send_lock``, then calls ``is_set()`` before
its ``try``); whatever needs that lock next waits forever, and paramiko's state is torn midway
through a step. In a CI run, SIGINT as the confirming login got in left the client hanging,
silent, for 400 s until it was killed (a rare timing: 36 stress runs did not repeat it).

So the handler here only notes the signal, unless the main thread is inside `Interrupts.pause`
or `interruptible()` (fwsafe's own waits, which hold no lock: sleeps between steps, a plain TCP
connect): then it raises at once. `check()`
raises a noted signal; `pause()` checks before and after it sleeps, and the remote code calls
`check()` before every step that would start something new (a login, a command). Every step
over paramiko is bounded (`fwsafe.remote.session`), so a noted signal is acted upon within one
step's limit, and usually within milliseconds (most of the time is spent in `pause`).

Outside the main thread (the Ansible module's worker, tests), nothing is installed: `check()`
never raises and `pause()` is `time.sleep`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupts"]

CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """The signals that interrupt one `apply --host`; `name` is the last one's name."""

    def __init__(self) -> None:
        self.name = "SIGINT"
        self._pending = 0
        self._in_pause = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Catch SIGINT, SIGTERM and SIGHUP while the body runs (in the main thread only; a
        signal ignored when we start stays ignored), and put the old handlers back."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[signal.Signals, Any] = {}
        for signum in CAUGHT:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, self._handler)
        try:
            yield self
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)

    def _handler(self, signum: int, frame: object) -> None:
        self.name = signal.Signals(signum).name
        if self._in_pause:
            self._in_pause = False
            raise KeyboardInterrupt
        self._pending += 1

    def check(self) -> None:
        """Raise KeyboardInterrupt for a signal noted and not yet raised (two signals noted
        during one step raise twice: "Ctrl-C again" keeps its meaning)."""
        if self._pending:
            self._pending -= 1
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A signal raises at once inside the body: fwsafe's own waits that hold no lock
        (a sleep, a plain TCP connect), never a call into paramiko."""
        self.check()
        self._in_pause = True
        try:
            if self._pending:  # noted between check() and the flag
                self._in_pause = False
                self.check()
            yield
        finally:
            self._in_pause = False
        self.check()

    def pause(self, seconds: float) -> None:
        """Sleep `seconds`; a signal noted before, or coming meanwhile, raises
        KeyboardInterrupt (at once)."""
        with self.interruptible():
            time.sleep(max(seconds, 0.0))
