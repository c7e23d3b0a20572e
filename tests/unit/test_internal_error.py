"""No command prints a traceback: an unexpected exception becomes one line on stderr, exit 5 when a
change may be live (else 3), and the traceback is kept in a 0600 file that the line names."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import fwsafe.cli as cli
from fwsafe.cli.failure import LAST_ERROR_LOG
from fwsafe.context import RUN
from fwsafe.control.manager import Manager
from fwsafe.core import config as config_module
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv("FWSAFE_CONFIG", raising=False)
    monkeypatch.delenv("FWSAFE_STATE_DIR", raising=False)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    out, err = capsys.readouterr()
    code = info.value.code
    assert isinstance(code, int)
    return code, out, err


def boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("boom\nwith a second line")


def with_record(tmp_path: Path, state_name: str) -> StateDir:
    state = StateDir(tmp_path / "state")
    state.ensure()
    record = Record(id=transaction.new_tx_id(), state=state_name, created=time.time(),
                    timeout_s=60, backend="rules", layers=["ipv4"])
    os.makedirs(state.tx_dir(record.id))
    transaction.save_record(state, record)
    state.set_current(record.id)
    return state


def test_unexpected_error_nothing_pending_is_3_one_line_and_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    monkeypatch.setattr(Manager, "status", boom)
    code, out, err = run_main(["status", "--state-dir", str(state.root)], capsys)
    assert code == 3
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("fwsafe: error: unexpected error: RuntimeError: boom with a second line")
    log = state.root / LAST_ERROR_LOG
    assert str(log) in line and str(state.root) in line
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    text = log.read_text()
    assert "Traceback" in text and "RuntimeError: boom" in text


@pytest.mark.parametrize("state_name", [transaction.APPLYING, transaction.PENDING,
                                        transaction.REVERTING])
def test_unexpected_error_with_a_live_change_is_5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        state_name: str) -> None:
    state = with_record(tmp_path, state_name)
    monkeypatch.setattr(Manager, "status", boom)
    code, _, err = run_main(["status", "--state-dir", str(state.root)], capsys)
    assert code == 5
    assert len(err.splitlines()) == 1 and "a change may be live" in err
    assert "fwsafe status" in err and str(state.root / LAST_ERROR_LOG) in err


def test_final_transaction_is_not_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    state = with_record(tmp_path, transaction.ABORTED)
    monkeypatch.setattr(Manager, "status", boom)
    code, _, _ = run_main(["status", "--state-dir", str(state.root)], capsys)
    assert code == 3


def test_error_after_this_command_started_the_guard_is_5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = with_record(tmp_path, transaction.PREPARING)
    tx_id = state.current_id()
    assert tx_id is not None

    def spawned_then_boom(self: Manager) -> Any:
        RUN.spawned.append(tx_id)  # as guard.spawn does
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Manager, "status", spawned_then_boom)
    code, out, err = run_main(["status", "--json", "--state-dir", str(state.root)], capsys)
    assert code == 5 and "OSError" in err and "may be live" in err
    data = json.loads(out)
    assert data["exit_code"] == 5 and data["kind"] == "InternalError"
    assert data["traceback_file"] == str(state.root / LAST_ERROR_LOG)


def test_no_state_dir_keeps_the_traceback_in_the_temp_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(Manager, "status", boom)
    code, _, err = run_main(["status", "--state-dir", str(tmp_path / "absent")], capsys)
    assert code == 3 and len(err.splitlines()) == 1
    saved = list(tmp_path.glob("fwsafe-last-error-*.log"))
    assert len(saved) == 1 and str(saved[0]) in err
    assert stat.S_IMODE(saved[0].stat().st_mode) == 0o600
    assert not (tmp_path / "absent").exists()


def test_a_usage_error_is_still_a_usage_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["extend", "inf", "--state-dir", str(tmp_path / "s")], capsys)
    assert code == 2 and "Traceback" not in err
