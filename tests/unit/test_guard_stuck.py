"""A guard counts as stuck (stopped, or blocked in the kernel) only when it is: SIGSTOP at
once, state D only when it lasts. A working guard is in D for an instant when it syncs its
record; one look at that took it for stuck (a confirm did not ask it and returned before it
removed its hatch; a revert would have killed it)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from fwsafe.control import manager
from fwsafe.core.transaction import PENDING, Record


def _record(pid: int) -> Record:
    return Record(id="t", state=PENDING, created=time.time(), timeout_s=30.0,
                  backend="iptables", layers=["ipv4"], guard_pid=pid)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_sleeping_process_is_not_stuck(child: subprocess.Popen[bytes]) -> None:
    assert not manager.guard_stopped(_record(child.pid))


def test_a_stopped_process_is_stuck_at_once(child: subprocess.Popen[bytes]) -> None:
    child.send_signal(signal.SIGSTOP)
    end = time.monotonic() + 5
    while not manager.guard_stopped(_record(child.pid)):
        assert time.monotonic() < end, "SIGSTOP not seen"
        time.sleep(0.01)
    child.send_signal(signal.SIGCONT)


def test_no_pid_is_not_stuck() -> None:
    assert not manager.guard_stopped(_record(0))


def test_a_moment_in_d_is_not_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel's D state cannot be had on demand here: the states /proc would show in turn
    states = iter(["D", "D", "S"])
    monkeypatch.setattr("fwsafe.guard.watcher.process_state", lambda _pid: next(states))
    assert not manager.guard_stopped(_record(4242))


def test_d_that_lasts_is_stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fwsafe.guard.watcher.process_state",
                        lambda _pid: "D")
    began = time.monotonic()
    assert manager.guard_stopped(_record(4242))
    assert manager.STUCK_D_S <= time.monotonic() - began < manager.STUCK_D_S + 1
