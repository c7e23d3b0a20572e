"""Failpoints: inert by default, each action does what it says, once per process unless `*`,
and every failpoint listed is passed somewhere in the code (and only those)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fwsafe import failpoints
from fwsafe.context import RUN

PACKAGE = Path(__file__).resolve().parents[2] / "fwsafe"


def run_child(code: str, env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env},
                          cwd=PACKAGE.parent, check=False)


def test_inert_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failpoints, "_ACTIVE", {})
    for name in failpoints.POINTS:
        failpoints.hit(name)   # nothing happens


def test_raise_once_per_process_and_every_time_with_a_star(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failpoints, "_ACTIVE", failpoints._parse(
        "guard.pending=raise:MemoryError; guard.waiting=raise*, apply.go = raise:OSError"))
    monkeypatch.setattr(RUN, "fired", set())
    with pytest.raises(MemoryError, match="failpoint guard.pending"):
        failpoints.hit("guard.pending")
    failpoints.hit("guard.pending")   # once
    for _ in range(3):
        with pytest.raises(failpoints.FailpointError):
            failpoints.hit("guard.waiting")
    with pytest.raises(OSError):
        failpoints.hit("apply.go")
    failpoints.hit("apply.locked")   # not named


def test_kill_stop_and_exit_act_on_the_process() -> None:
    code = "from fwsafe import failpoints\nfailpoints.hit('apply.go')\nprint('after')"
    killed = run_child(code, {"FWSAFE_FAILPOINTS": "apply.go=kill"})
    assert killed.returncode == -9 and "after" not in killed.stdout
    ended = run_child(code, {"FWSAFE_FAILPOINTS": "apply.go=exit"})
    assert ended.returncode == 99
    passed = run_child(code, {"FWSAFE_FAILPOINTS": "apply.locked=kill"})
    assert passed.returncode == 0 and "after" in passed.stdout
    stopped = subprocess.Popen([sys.executable, "-c", code], cwd=PACKAGE.parent,
                               stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "FWSAFE_FAILPOINTS": "apply.go=stop"})
    try:
        state = ""
        for _ in range(200):
            state = Path(f"/proc/{stopped.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T":
                break
            time.sleep(0.02)
        assert state == "T"
        os.kill(stopped.pid, 18)   # SIGCONT: it goes on
        out, _ = stopped.communicate(timeout=20)
        assert "after" in out
    finally:
        if stopped.poll() is None:
            stopped.kill()


def test_pause_waits_until_its_marker_is_removed(tmp_path: Path) -> None:
    code = "from fwsafe import failpoints\nfailpoints.hit('guard.armed')\nprint('after')"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=PACKAGE.parent, text=True,
                             stdout=subprocess.PIPE, env={
                                 **os.environ, "FWSAFE_FAILPOINTS": "guard.armed=pause",
                                 "FWSAFE_FAILPOINT_DIR": str(tmp_path)})
    try:
        marker = tmp_path / f"guard.armed.{child.pid}"
        for _ in range(500):
            if marker.exists():
                break
            time.sleep(0.02)
        assert marker.read_text().strip() == str(child.pid)
        time.sleep(0.2)
        assert child.poll() is None   # still waiting
        marker.unlink()
        out, _ = child.communicate(timeout=20)
        assert "after" in out
    finally:
        if child.poll() is None:
            child.kill()


def test_every_failpoint_is_in_the_code_and_every_call_is_listed() -> None:
    called: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        called |= set(re.findall(r'failpoints\.hit\("([^"]+)"\)', path.read_text()))
    assert called == set(failpoints.POINTS)
