"""`fwsafe.remote.signals.Interrupts`: Ctrl-C (SIGTERM, SIGHUP) is raised only between steps.

Real signals to this process (pytest runs tests in the main thread, where handlers run).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from fwsafe.remote.signals import Interrupts


def later(delay: float, signum: int = signal.SIGINT) -> threading.Timer:
    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.start()
    return timer


def busy_without_pause(seconds: float, *timers: threading.Timer) -> int:
    """Library-like work (Python calls, no pause): where paramiko would hold its locks. At least
    `seconds`, and until every timer has sent its signal (a loaded machine delays them)."""
    end = time.monotonic() + seconds
    limit = time.monotonic() + 30
    calls = 0
    while time.monotonic() < end or (any(t.is_alive() for t in timers)
                                     and time.monotonic() < limit):
        calls += len(str(calls))
    settle = time.monotonic() + 0.05   # the handler runs in this thread between bytecodes
    while time.monotonic() < settle:
        calls += len(str(calls))
    return calls


def test_a_signal_outside_pause_is_noted_and_raised_at_the_next_check() -> None:
    interrupts = Interrupts()
    with interrupts.installed():
        sent = later(0.05, signal.SIGTERM)
        busy_without_pause(0.3, sent)  # the signal came meanwhile: nothing raised here
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        interrupts.check()  # raised once only
    assert interrupts.name == "SIGTERM"


def test_a_signal_during_pause_raises_at_once() -> None:
    # SIGHUP as a terminal's hang-up delivers it: a suite started under `nohup` inherits it
    # ignored, and Interrupts rightly keeps an ignored signal ignored (the test below)
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        _signal_during_pause()
    finally:
        signal.signal(signal.SIGHUP, inherited)


def _signal_during_pause() -> None:
    interrupts = Interrupts()
    with interrupts.installed():
        later(0.1, signal.SIGHUP)
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            interrupts.pause(10)
        assert time.monotonic() - began < 2
    assert interrupts.name == "SIGHUP"


def test_a_noted_signal_makes_the_next_pause_raise_without_sleeping() -> None:
    interrupts = Interrupts()
    with interrupts.installed():
        sent = later(0.02)
        busy_without_pause(0.2, sent)
        began = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            interrupts.pause(10)
        assert time.monotonic() - began < 1


def test_handlers_are_restored_and_an_ignored_signal_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGINT)
    old_hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        interrupts = Interrupts()
        with interrupts.installed():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not before
        assert signal.getsignal(signal.SIGINT) is before
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old_hup)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen: list[object] = []

    def worker() -> None:
        interrupts = Interrupts()
        with interrupts.installed():
            seen.append(signal.getsignal(signal.SIGINT))
            interrupts.pause(0.01)
            interrupts.check()

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert seen == [before]


def test_two_signals_during_one_step_raise_twice() -> None:
    """"Ctrl-C again: stop now" keeps its meaning when both came during one long step."""
    interrupts = Interrupts()
    with interrupts.installed():
        first, second = later(0.02), later(0.1)
        busy_without_pause(0.4, first, second)
        for _ in range(2):
            with pytest.raises(KeyboardInterrupt):
                interrupts.check()
        interrupts.check()


def test_a_blocking_wait_of_our_own_is_interrupted_at_once() -> None:
    """A wait that holds no library lock (a socket that never answers) may raise at once."""
    interrupts = Interrupts()
    left, right = socket.socketpair()
    try:
        with interrupts.installed():
            later(0.1)
            began = time.monotonic()
            with pytest.raises(KeyboardInterrupt), interrupts.interruptible():
                left.recv(1)
            assert time.monotonic() - began < 2
            interrupts.check()  # raised once
    finally:
        left.close()
        right.close()
