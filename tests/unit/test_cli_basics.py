from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fwsafe.cli.countdown import format_duration
from fwsafe.errors import EXIT_CODE_HELP, ExitCode


def fwsafe(*args: str, env_state: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = None
    if env_state is not None:
        import os
        env = {**os.environ, "FWSAFE_STATE_DIR": str(env_state)}
    return subprocess.run([sys.executable, "-m", "fwsafe", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_help_lists_every_exit_code() -> None:
    out = fwsafe("--help").stdout
    for code in ExitCode:
        assert f"  {int(code)}  {EXIT_CODE_HELP[code]}" in out
    apply_help = fwsafe("apply", "--help").stdout
    assert "NEW SSH session" in apply_help and "Exit codes" in apply_help


def test_usage_error_is_2() -> None:
    assert fwsafe("apply").returncode == 2
    assert fwsafe("apply", "--timeout", "0", "x").returncode == 2
    assert fwsafe("no-such-command").returncode == 2


def test_missing_file_is_3_with_one_clear_line(tmp_path: Path) -> None:
    result = fwsafe("apply", str(tmp_path / "missing.rules"), env_state=tmp_path / "s")
    assert result.returncode == 3
    assert result.stderr.splitlines()[0] == f"fwsafe: error: {tmp_path}/missing.rules: no such file"
    assert not (tmp_path / "s").exists()


def test_json_error_object(tmp_path: Path) -> None:
    result = fwsafe("apply", "--json", str(tmp_path / "nope"), env_state=tmp_path / "s")
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 3 and "no such file" in data["error"]


def test_status_with_no_state_dir(tmp_path: Path) -> None:
    result = fwsafe("status", "--json", env_state=tmp_path / "absent")
    assert result.returncode == 0
    assert json.loads(result.stdout)["state"] == "none"
    assert not (tmp_path / "absent").exists()


def test_confirm_with_nothing_pending_is_3(tmp_path: Path) -> None:
    result = fwsafe("confirm", env_state=tmp_path / "absent")
    assert result.returncode == 3
    assert "nothing has been applied" in result.stderr


def test_recover_with_nothing_pending_says_so(tmp_path: Path) -> None:
    result = fwsafe("recover", "--json", env_state=tmp_path / "absent")
    if result.returncode == 3 and "root" in result.stderr:
        pytest.skip("recover needs root")
    assert result.returncode == 0
    assert json.loads(result.stdout)["recovered"] is False


@pytest.mark.parametrize("seconds,text", [(0, "0 s"), (59.6, "1 min"), (61, "1 min 1 s"),
                                           (3600, "1 h 0 min")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_missing_binary_is_a_clear_rejection() -> None:
    from fwsafe.errors import EnvironmentProblem
    from fwsafe.runner import require_binary

    with pytest.raises(EnvironmentProblem, match="not installed"):
        require_binary("iptables-restore-that-does-not-exist")
