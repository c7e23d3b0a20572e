"""`apply --timeout` and `extend SECONDS`: finite, 1 s to max_timeout, checked by the CLI (exit 2)
and again by the guard."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fwsafe.core import config as config_module
from fwsafe.core import transaction
from fwsafe.core.config import Config, check_seconds, load_config
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.errors import ConfigError, ExitCode, UsageError
from fwsafe.guard import process

ROOT = Path(__file__).resolve().parents[2]


def fwsafe(*args: str, state: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FWSAFE_STATE_DIR": str(state), "PYTHONPATH": str(ROOT)}
    env.pop("FWSAFE_CONFIG", None)
    if config is not None:
        env["FWSAFE_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "fwsafe", *args], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv("FWSAFE_CONFIG", raising=False)



@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "infinity", "0", "-5", "0.5",
                                  "86401", "99999999999", "1e400", "abc", ""])
def test_out_of_range_or_not_finite_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as info:
        check_seconds(text, what="--timeout")
    assert info.value.exit_code == ExitCode.USAGE
    assert "\n" not in info.value.message and info.value.message.startswith("--timeout: ")
    assert "1 to 86400 s" in info.value.message


@pytest.mark.parametrize("text,value", [("1", 1.0), ("60", 60.0), ("2.5", 2.5), ("86400", 86400.0)])
def test_valid_seconds(text: str, value: float) -> None:
    assert check_seconds(text, what="--timeout") == value


def test_max_timeout_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_timeout = 600\ntimeout = 30\n")
    config = load_config(str(path), env={})
    assert config.max_timeout == 600
    assert config.seconds("600", "SECONDS") == 600.0
    with pytest.raises(UsageError, match="1 to 600 s"):
        config.seconds("601", "SECONDS")
    assert Config().max_timeout == 86400


def test_config_timeout_beyond_max_timeout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_timeout = 100\ntimeout = 300\n")
    with pytest.raises(ConfigError, match="timeout: must be <= max_timeout"):
        load_config(str(path), env={})
    path.write_text("max_timeout = 0\n")
    with pytest.raises(ConfigError, match="max_timeout"):
        load_config(str(path), env={})


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "99999999999"])
def test_cli_apply_timeout_exit_2_in_one_line(tmp_path: Path, value: str) -> None:
    rules = tmp_path / "r.rules"
    rules.write_text("*filter\nCOMMIT\n")
    result = fwsafe("apply", "--timeout", value, str(rules), state=tmp_path / "s")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("fwsafe: error: --timeout: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


def test_cli_ufw_timeout_is_bounded_too(tmp_path: Path) -> None:
    result = fwsafe("ufw", "--timeout", "inf", "deny", "23/tcp", state=tmp_path / "s")
    assert result.returncode == 2 and "--timeout" in result.stderr


def test_cli_max_timeout_from_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_timeout = 100\n")
    result = fwsafe("extend", "101", state=tmp_path / "s", config=cfg)
    assert result.returncode == 2 and "1 to 100 s" in result.stderr


def _pending_record(state: StateDir, deadline: float) -> Record:
    state.ensure()
    record = Record(id=transaction.new_tx_id(), state=transaction.PENDING, created=time.time(),
                    timeout_s=60, backend="rules", layers=[], deadline=deadline)
    os.makedirs(state.tx_dir(record.id))
    transaction.save_record(state, record)
    state.set_current(record.id)
    return record


@pytest.mark.parametrize("value", ["inf", "nan", "0", "99999999999"])
def test_cli_extend_refused_leaves_the_deadline(tmp_path: Path, value: str) -> None:
    state = StateDir(tmp_path / "s")
    record = _pending_record(state, deadline=time.time() + 30)
    result = fwsafe("extend", value, "--json", state=state.root)
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["exit_code"] == 2
    assert result.stderr.splitlines()[0].startswith("fwsafe: error: SECONDS: ")
    assert transaction.load_record(state, record.id).deadline == record.deadline
    status = fwsafe("status", "--json", state=state.root)
    assert status.returncode == 0 and json.loads(status.stdout)["deadline"] == record.deadline


# -- the guard: the second line of defence -----------------------------------------------------
def make_guard(tmp_path: Path, **options: Any) -> process.Guard:
    state = StateDir(tmp_path / "state")
    state.ensure()
    record = Record(id=transaction.new_tx_id(), state=transaction.PENDING, created=time.time(),
                    timeout_s=60, backend="rules", layers=[], options=dict(options))
    os.makedirs(state.tx_dir(record.id))
    with open(os.devnull, "w") as log:
        g = process.Guard(state, record, "setsid", log)
    g.logfile = open(state.tx_dir(record.id) / "guard.log", "a")  # noqa: SIM115
    return g


@pytest.mark.parametrize("seconds", [math.inf, -math.inf, math.nan, -5, 0, 0.5, 86401, 10**12,
                                     "10", True, None, [1], {"a": 1}])
def test_guard_refuses_a_bad_extend(tmp_path: Path, seconds: Any) -> None:
    g = make_guard(tmp_path)
    g.deadline.set(time.time() + 30)
    before = (g.record.deadline, g.deadline.at_boot)
    answer = g.handle({"op": "extend", "seconds": seconds})
    assert answer["ok"] is False and "seconds must" in answer["error"]
    assert (g.record.deadline, g.deadline.at_boot) == before
    json.dumps(g.handle({"op": "status"}), allow_nan=False)  # nothing infinite in the record


def test_guard_extend_within_bounds_and_the_recorded_max(tmp_path: Path) -> None:
    g = make_guard(tmp_path, max_timeout=100)
    g.deadline.set(time.time() + 30)
    assert g.handle({"op": "extend", "seconds": 101})["ok"] is False
    answer = g.handle({"op": "extend", "seconds": 100})
    assert answer["ok"] is True
    assert g.deadline.remaining() == pytest.approx(130, abs=1)
    assert answer["deadline"] == pytest.approx(time.time() + 130, abs=1)


def test_garbled_extend_over_json_does_not_crash_the_guard(tmp_path: Path) -> None:
    g = make_guard(tmp_path)
    g.deadline.set(time.time() + 30)
    message = json.loads('{"op": "extend", "seconds": Infinity}')
    assert g.handle(message)["ok"] is False


def test_guard_refuses_an_infinite_timeout_before_applying(tmp_path: Path,
                                                           keep_signals: None) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    record = Record(id=transaction.new_tx_id(), state=transaction.PREPARING, created=time.time(),
                    timeout_s=math.inf, backend="rules", layers=[])
    os.makedirs(state.tx_dir(record.id))
    transaction.save_record(state, record)
    assert process.main(["--foreground", str(state.root), record.id]) == 1
    after = transaction.load_record(state, record.id)
    assert after.state == transaction.ABORTED and "timeout" in (after.reason or "")
    assert not state.socket_path.exists()
