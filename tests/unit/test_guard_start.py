"""Starting the guard: a late guard never overrides `aborted`, a change that may be live is never
"nothing changed" (exit 5, not 3), and the guard gets the CLI's config, environment and an
absolute state directory; its deadline runs on CLOCK_BOOTTIME."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fwsafe.cli as cli
from fwsafe import config as config_module
from fwsafe.cli import apply as cli_apply
from fwsafe.cli import transaction as cli_transaction
from fwsafe.core import apply as apply_module
from fwsafe.core import transaction
from fwsafe.core.apply import ApplyFlow, ApplyOptions
from fwsafe.core.manager import Manager
from fwsafe.core.statedir import StateDir, resolve_state_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import ChangeMayBeLiveError, ExitCode, GuardError
from fwsafe.guard import clock, process
from fwsafe.guard import spawn as guard

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.delenv("FWSAFE_CONFIG", raising=False)
    monkeypatch.delenv("FWSAFE_STATE_DIR", raising=False)



def new_tx(tmp_path: Path, state_name: str = transaction.PREPARING, **fields: Any
           ) -> tuple[StateDir, Record]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    record = Record(id=transaction.new_tx_id(), state=state_name, created=time.time(),
                    timeout_s=60, backend="rules", layers=[], **fields)
    os.makedirs(state.tx_dir(record.id))
    transaction.save_record(state, record)
    state.set_current(record.id)
    return state, record


def move_to(state: StateDir, tx_id: str, new_state: str) -> None:
    record = transaction.load_record(state, tx_id)
    record.transition(new_state, "by the test")
    transaction.save_record(state, record)


# -- (a) a late guard never overrides `aborted` -------------------------------------------------
def test_guard_that_finds_aborted_exits_without_arming(tmp_path: Path, keep_signals: None) -> None:
    state, record = new_tx(tmp_path)
    move_to(state, record.id, transaction.ABORTED)
    assert process.main(["--foreground", str(state.root), record.id]) == 1
    after = transaction.load_record(state, record.id)
    assert after.state == transaction.ABORTED and after.guard_pid is None
    assert not state.socket_path.exists()
    assert "not preparing: nothing to guard" in (state.tx_dir(record.id) / "guard.log").read_text()


def test_late_guard_waits_for_the_lock_and_then_sees_aborted(tmp_path: Path) -> None:
    """The CLI gives up and aborts under the transaction's lock while the guard is starting:
    the guard blocks on that lock, then reads `aborted` and never applies."""
    state, record = new_tx(tmp_path)
    with state.tx_locked(record.id):
        child = subprocess.Popen(
            [sys.executable, "-m", "fwsafe.guard", "--foreground", str(state.root), record.id],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
        time.sleep(0.5)
        assert child.poll() is None  # waiting for the lock, not applying
        assert transaction.load_record(state, record.id).state == transaction.PREPARING
        move_to(state, record.id, transaction.ABORTED)  # what ApplyFlow.abort writes
    assert child.wait(timeout=30) == 1
    assert child.stderr is not None and b"Traceback" not in child.stderr.read()
    child.stderr.close()
    assert transaction.load_record(state, record.id).state == transaction.ABORTED
    assert not state.socket_path.exists()


def test_abort_never_overwrites_a_guard_that_got_there_first(tmp_path: Path) -> None:
    state, record = new_tx(tmp_path)
    move_to(state, record.id, transaction.APPLYING)
    latest = ApplyFlow(state).abort(record, "gave up")
    assert latest.state == transaction.APPLYING
    assert transaction.load_record(state, record.id).state == transaction.APPLYING


def test_abort_of_a_preparing_transaction(tmp_path: Path) -> None:
    state, record = new_tx(tmp_path)
    latest = ApplyFlow(state).abort(record, "gave up")
    assert latest.state == transaction.ABORTED
    assert transaction.load_record(state, record.id).reason == "gave up"


def test_abort_while_the_guard_holds_the_lock_aborts_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    monkeypatch.setattr(apply_module, "TX_LOCK_TIMEOUT", 0.1)
    with state.tx_locked(record.id):
        latest = ApplyFlow(state).abort(record, "gave up")
    assert latest.state == transaction.PREPARING
    assert transaction.load_record(state, record.id).state == transaction.PREPARING


# -- (b) may be live: exit 5, never 3 ----------------------------------------------------------
def test_spawn_error_after_the_guard_started_is_exit_5(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)

    def spawn(state_: StateDir, tx_id: str, config_path: str | None = None) -> str:
        move_to(state_, tx_id, transaction.APPLYING)  # the guard armed after all
        raise GuardError("systemd-run timed out")

    monkeypatch.setattr(guard, "spawn", spawn)
    with pytest.raises(ChangeMayBeLiveError) as info:
        ApplyFlow(state)._start_guard(record, ApplyOptions())
    assert info.value.exit_code == ExitCode.REVERT_FAILED
    assert "may be live" in info.value.message and "fwsafe status" in (info.value.hint or "")


def test_spawn_error_before_the_guard_started_is_exit_3_and_aborted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)

    def spawn(state_: StateDir, tx_id: str, config_path: str | None = None) -> str:
        raise GuardError("systemd-run could not start the guard")

    monkeypatch.setattr(guard, "spawn", spawn)
    with pytest.raises(GuardError) as info:
        ApplyFlow(state)._start_guard(record, ApplyOptions())
    assert info.value.exit_code == ExitCode.REJECTED
    assert transaction.load_record(state, record.id).state == transaction.ABORTED


def test_guard_died_while_applying_is_exit_5(tmp_path: Path) -> None:
    state, record = new_tx(tmp_path)
    move_to(state, record.id, transaction.APPLYING)  # guard_pid None: not alive
    with pytest.raises(ChangeMayBeLiveError, match="died while applying"):
        ApplyFlow(state)._wait_for_guard(record)


def test_guard_applying_for_too_long_is_exit_5(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    move_to(state, record.id, transaction.APPLYING)
    monkeypatch.setattr(transaction, "guard_alive", lambda record: True)
    monkeypatch.setattr(apply_module, "GUARD_APPLY_TIMEOUT", 0.0)
    with pytest.raises(ChangeMayBeLiveError) as info:
        ApplyFlow(state)._wait_for_guard(record)
    assert info.value.exit_code == 5


def test_guard_that_never_armed_is_aborted_and_exit_3(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    monkeypatch.setattr(apply_module, "GUARD_ARM_TIMEOUT", 0.0)
    with pytest.raises(GuardError, match="nothing was changed") as info:
        ApplyFlow(state)._wait_for_guard(record)
    assert info.value.exit_code == 3
    assert transaction.load_record(state, record.id).state == transaction.ABORTED


def test_finish_of_an_open_transaction_is_exit_5(tmp_path: Path) -> None:
    _, record = new_tx(tmp_path, transaction.PREPARING)
    record.transition(transaction.APPLYING)
    record.transition(transaction.PENDING)
    record.transition(transaction.REVERTING)
    with pytest.raises(ChangeMayBeLiveError):
        cli_apply.finish(record, as_json=False)


# -- 5: what the CLI had reaches the guard ------------------------------------------------------
def test_relative_state_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_state_dir("rel/state") == tmp_path / "rel" / "state"
    monkeypatch.setenv("FWSAFE_STATE_DIR", "envrel")
    assert resolve_state_dir(None) == tmp_path / "envrel"


def test_systemd_run_passes_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWSAFE_GUARD_MODE", "systemd-run")
    monkeypatch.setenv("FWSAFE_SOMETHING", "x y")
    monkeypatch.setenv("PATH", "/custom/bin:/usr/bin")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("UNRELATED_SECRET", "no")
    argv = guard.systemd_run_argv(Path("/s"), "TX", 1, config_path="/etc/x.toml")
    setenv = {a.split("=", 1)[1].split("=", 1)[0]: a.split("=", 2)[2]
              for a in argv if a.startswith("--setenv=")}
    assert setenv["FWSAFE_CONFIG"] == "/etc/x.toml"
    assert setenv["FWSAFE_SOMETHING"] == "x y"
    assert setenv["FWSAFE_GUARD_MODE"] == "systemd-run"
    assert setenv["PATH"] == "/custom/bin:/usr/bin"
    assert setenv["LANG"] == "C.UTF-8"
    assert str(ROOT) in setenv["PYTHONPATH"].split(os.pathsep)
    assert "UNRELATED_SECRET" not in setenv
    assert argv[-3:] == ["--foreground", "/s", "TX"]


class FakePopen:
    seen: dict[str, Any] = {}

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        FakePopen.seen = {"argv": argv, **kwargs}

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_setsid_passes_config_and_environment(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    monkeypatch.setenv("FWSAFE_GUARD_MODE", "setsid")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    assert guard.spawn(state, record.id, config_path="/etc/fw.toml") == "setsid"
    env = FakePopen.seen["env"]
    assert env["FWSAFE_CONFIG"] == "/etc/fw.toml" and env["LANG"] == "de_DE.UTF-8"
    assert FakePopen.seen["argv"][-2:] == [str(state.root), record.id]
    log = state.tx_dir(record.id) / "guard.log"
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)
    assert record.id in guard.SPAWNED


def test_spawn_refuses_a_symlinked_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o644)
    (state.tx_dir(record.id) / "guard.log").symlink_to(victim)
    monkeypatch.setenv("FWSAFE_GUARD_MODE", "setsid")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    with pytest.raises(GuardError, match="cannot open"):
        guard.spawn(state, record.id)
    assert victim.read_text() == "keep" and victim.stat().st_mode & 0o777 == 0o644


def test_cli_records_the_config_path_and_an_absolute_state_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "fw.toml"
    cfg.write_text("max_timeout = 3600\n")
    rules = tmp_path / "r.rules"
    rules.write_text("*filter\nCOMMIT\n")
    seen: dict[str, Any] = {}

    def fake_apply(self: Manager, change: Any, options: ApplyOptions) -> Record:
        seen["options"], seen["root"] = options, self.state.root
        return Record(id="T", state=transaction.PENDING, created=time.time(), timeout_s=5,
                      backend="rules", layers=["ipv4"], deadline=time.time() + 5)

    monkeypatch.setattr(Manager, "apply", fake_apply)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["apply", "--detach", "--config", "fw.toml", "--state-dir", "rel",
                  "--timeout", "5", str(rules)])
    assert info.value.code == 0, capsys.readouterr().err
    options = seen["options"]
    assert options.config_path == str(cfg) and options.max_timeout == 3600
    assert options.timeout_s == 5.0
    assert seen["root"] == tmp_path / "rel"


# -- the deadline on CLOCK_BOOTTIME; status shows the guard's count -------------------------
def make_guard(tmp_path: Path) -> process.Guard:
    state, record = new_tx(tmp_path, transaction.PENDING)
    with open(state.tx_dir(record.id) / "guard.log", "a") as log:
        g = process.Guard(state, record, "setsid", log)
    return g


def test_deadline_ignores_wall_clock_steps_and_counts_boottime(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = make_guard(tmp_path)
    now = {"boot": 1000.0, "wall": 1_700_000_000.0}
    monkeypatch.setattr(clock, "boottime", lambda: now["boot"])
    monkeypatch.setattr(time, "time", lambda: now["wall"])
    g.deadline.set(now["wall"] + 60)
    assert g.deadline.remaining() == 60
    now["wall"] += 3600          # the wall clock steps forward: no early revert
    assert g.deadline.remaining() == 60
    now["boot"] += 10            # ten seconds pass, suspended or not
    assert g.deadline.remaining() == 50
    assert g.handle({"op": "extend", "seconds": 30})["ok"] is True
    assert g.deadline.remaining() == 80
    assert g.record.deadline == now["wall"] + 80  # the display follows the real deadline
    answer = g.handle({"op": "status"})
    assert answer["remaining_s"] == 80 and answer["clock"] == "boottime"


def test_deadline_clock_is_boottime() -> None:
    assert clock.DEADLINE_CLOCK == time.CLOCK_BOOTTIME
    assert abs(clock.boottime() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1


def test_status_takes_the_living_guards_count(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path, transaction.PENDING, deadline=time.time() + 500)
    live = transaction.load_record(state, record.id)
    live.deadline = time.time() + 12.3
    monkeypatch.setattr(transaction, "guard_alive", lambda record: True)
    monkeypatch.setattr(guard, "request", lambda state, op, timeout=30.0, **f: {
        "ok": True, "record": live.to_json(), "remaining_s": 12.3, "clock": "boottime"})
    info = Manager(state).status()
    assert info["remaining_s"] == 12.3 and info["remaining_from"] == "guard"
    assert info["deadline"] == live.deadline
    text = cli_transaction.format_status(info)
    assert "as the guard counts" in text and "wall clock" in text


def test_status_falls_back_to_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path, transaction.PENDING, deadline=time.time() + 100)

    def no_answer(*args: Any, **kwargs: Any) -> Any:
        raise GuardError("busy")

    monkeypatch.setattr(transaction, "guard_alive", lambda record: True)
    monkeypatch.setattr(guard, "request", no_answer)
    info = Manager(state).status()
    assert info["remaining_from"] == "record" and 95 < info["remaining_s"] <= 100
