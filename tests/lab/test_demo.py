"""The README's demo command, end to end (it builds and removes its own lab)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import require_capable

pytestmark = pytest.mark.lab


def test_demo_shows_refusal_lockout_and_recovery() -> None:
    require_capable()
    result = subprocess.run([sys.executable, "-m", "fwsafe", "demo", "--timeout", "6"],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "exit 3: fwsafe's check" in out
    assert "connection timed out" in out and "SSH answers" in out
    assert "reason: timeout: not confirmed within 6 s" in out
    assert "ruleset identical to the one before the change: yes" in out
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert "fwdemo" not in listed.stdout
