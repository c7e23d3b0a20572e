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
from fwsafe.cli import pending as cli_transaction
from fwsafe.cli import screens
from fwsafe.context import RUN
from fwsafe.control import flow as apply_module
from fwsafe.control.flow import ApplyFlow, ApplyOptions
from fwsafe.control.manager import Manager
from fwsafe.core import config as config_module
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, resolve_state_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import ChangeMayBeLiveError, ExitCode, GuardError
from fwsafe.guard import clock, process, spawn

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
    monkeypatch.setattr(transaction, "TX_LOCK_TIMEOUT", 0.1)
    with state.tx_locked(record.id):
        latest = ApplyFlow(state).abort(record, "gave up")
    assert latest.state == transaction.PREPARING
    assert transaction.load_record(state, record.id).state == transaction.PREPARING


# -- (b) may be live: exit 5, never 3 ----------------------------------------------------------
class FailingStandby:
    """A standing-by guard whose `go` fails (with `armed`: after the guard armed after all)."""

    def __init__(self, state: StateDir, tx_id: str, message: str, armed: bool) -> None:
        self.state, self.tx_id, self.message, self.armed = state, tx_id, message, armed
        self.closed = False

    def go(self) -> None:
        if self.armed:
            move_to(self.state, self.tx_id, transaction.APPLYING)
        raise GuardError(self.message)

    def close(self) -> None:
        self.closed = True


def test_go_error_after_the_guard_started_is_exit_5(tmp_path: Path) -> None:
    state, record = new_tx(tmp_path)
    standby = FailingStandby(state, record.id, "cannot tell the guard to go", armed=True)
    with pytest.raises(ChangeMayBeLiveError) as info:
        ApplyFlow(state)._start_guard(record, ApplyOptions(), standby)  # type: ignore[arg-type]
    assert info.value.exit_code == ExitCode.REVERT_FAILED
    assert "may be live" in info.value.message and "fwsafe status" in (info.value.hint or "")
    assert standby.closed


def test_go_error_before_the_guard_started_is_exit_3_and_aborted(tmp_path: Path) -> None:
    state, record = new_tx(tmp_path)
    standby = FailingStandby(state, record.id, "the guard died while standing by", armed=False)
    with pytest.raises(GuardError) as info:
        ApplyFlow(state)._start_guard(record, ApplyOptions(), standby)  # type: ignore[arg-type]
    assert info.value.exit_code == ExitCode.REJECTED
    assert transaction.load_record(state, record.id).state == transaction.ABORTED
    assert standby.closed


def test_guard_died_while_applying_is_exit_5(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    move_to(state, record.id, transaction.APPLYING)  # guard_pid None: not alive
    # Not waited for under the state lock (its backstop needs it to take over) ...
    waited = ApplyFlow(state)._wait_for_guard(record, None)
    assert waited.state == transaction.APPLYING
    # ... but after it: nobody took it over, so it may be live (exit 5, never 3)
    monkeypatch.setattr(spawn, "NOBODY_S", 0.0)
    with pytest.raises(ChangeMayBeLiveError, match="died while applying"):
        apply_module.reported(state, waited)


def test_guard_applying_for_too_long_is_exit_5(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    move_to(state, record.id, transaction.APPLYING)
    monkeypatch.setattr(transaction, "guard_alive", lambda record: True)
    monkeypatch.setattr(apply_module, "GUARD_APPLY_TIMEOUT", 0.0)
    with pytest.raises(ChangeMayBeLiveError) as info:
        ApplyFlow(state)._wait_for_guard(record, None)
    assert info.value.exit_code == 5


def test_guard_that_never_armed_is_aborted_and_exit_3(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    monkeypatch.setattr(apply_module, "GUARD_ARM_TIMEOUT", 0.0)
    with pytest.raises(GuardError, match="nothing was changed") as info:
        ApplyFlow(state)._wait_for_guard(record, None)
    assert info.value.exit_code == 3
    assert transaction.load_record(state, record.id).state == transaction.ABORTED


def test_finish_of_an_open_transaction_is_exit_5(tmp_path: Path) -> None:
    _, record = new_tx(tmp_path, transaction.PREPARING)
    record.transition(transaction.APPLYING)
    record.transition(transaction.PENDING)
    record.transition(transaction.REVERTING)
    with pytest.raises(ChangeMayBeLiveError):
        screens.finish(record, as_json=False)


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
    argv = spawn.systemd_run_argv(Path("/s"), "TX", 1, config_path="/etc/x.toml")
    setenv = {a.split("=", 1)[1].split("=", 1)[0]: a.split("=", 2)[2]
              for a in argv if a.startswith("--setenv=")}
    assert setenv["FWSAFE_CONFIG"] == "/etc/x.toml"
    assert setenv["FWSAFE_SOMETHING"] == "x y"
    assert setenv["FWSAFE_GUARD_MODE"] == "systemd-run"
    assert setenv["PATH"] == "/custom/bin:/usr/bin"
    assert setenv["LANG"] == "C.UTF-8"
    assert str(ROOT) in setenv["PYTHONPATH"].split(os.pathsep)
    assert "UNRELATED_SECRET" not in setenv
    assert argv[-4:] == ["--foreground", "/s", "TX", "--standby"]


class FakePopen:
    seen: dict[str, Any] = {}

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        FakePopen.seen = {"argv": argv, **kwargs}
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = 0
        return 0


def fifo_content(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""
    finally:
        os.close(fd)


def test_setsid_passes_config_and_environment(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    monkeypatch.setenv("FWSAFE_GUARD_MODE", "setsid")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    standby = spawn.standby(state, record.id, config_path="/etc/fw.toml")
    assert standby.mode == "setsid"
    env = FakePopen.seen["env"]
    assert env["FWSAFE_CONFIG"] == "/etc/fw.toml" and env["LANG"] == "de_DE.UTF-8"
    assert FakePopen.seen["argv"][-3:] == [str(state.root), record.id, "--standby"]
    log = state.tx_dir(record.id) / "guard.log"
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)
    fifo = state.tx_dir(record.id) / spawn.GO_FIFO
    assert oct(fifo.stat().st_mode & 0o777) == oct(0o600)
    assert record.id not in RUN.spawned and fifo_content(fifo) == b""  # nothing said yet
    standby.go()
    assert record.id in RUN.spawned
    assert fifo_content(fifo) == spawn.GO   # kept until closed, for a guard that opens it late
    standby.close()


def test_go_to_a_guard_that_died_standing_by_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    monkeypatch.setenv("FWSAFE_GUARD_MODE", "setsid")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    standby = spawn.standby(state, record.id)
    assert standby.intermediate is not None
    standby.intermediate.returncode = -9   # type: ignore[misc]
    with pytest.raises(GuardError, match="died while standing by"):
        standby.go()
    standby.close()


def test_standby_refuses_a_symlinked_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state, record = new_tx(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o644)
    (state.tx_dir(record.id) / "guard.log").symlink_to(victim)
    monkeypatch.setenv("FWSAFE_GUARD_MODE", "setsid")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    with pytest.raises(GuardError, match="cannot open"):
        spawn.standby(state, record.id)
    assert victim.read_text() == "keep" and victim.stat().st_mode & 0o777 == 0o644


def test_a_guard_standing_by_goes_only_when_told(tmp_path: Path) -> None:
    """`wait_for_go`: true once `go` is written; false when every writer is gone without it
    (the CLI called the change off, or died), or when there is no pipe at all."""
    import threading

    def waits(writes: bytes) -> bool:
        tx_dir = tmp_path / f"tx{len(writes)}"
        tx_dir.mkdir()
        os.mkfifo(tx_dir / spawn.GO_FIFO, 0o600)
        writer = os.open(tx_dir / spawn.GO_FIFO, os.O_RDWR)
        answer: list[bool] = []
        waiter = threading.Thread(target=lambda: answer.append(spawn.wait_for_go(tx_dir)))
        waiter.start()
        time.sleep(0.2)
        assert waiter.is_alive()   # nothing said yet: it waits
        os.write(writer, writes)
        time.sleep(0.1)
        os.close(writer)
        waiter.join(timeout=5)
        assert not waiter.is_alive()
        return answer[0]

    assert waits(spawn.GO) is True
    assert waits(b"") is False           # called off: closed without a word
    assert waits(b"stop\n") is False
    assert spawn.wait_for_go(tmp_path / "gone") is False


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
    monkeypatch.setattr(spawn, "request", lambda state, op, timeout=30.0, **f: {
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
    monkeypatch.setattr(spawn, "request", no_answer)
    info = Manager(state).status()
    assert info["remaining_from"] == "record" and 95 < info["remaining_s"] <= 100


def test_guard_called_off_while_standing_by_changes_nothing(
        tmp_path: Path, keep_signals: None, capsys: pytest.CaptureFixture[str]) -> None:
    state, record = new_tx(tmp_path)   # no pipe: the CLI called it off and removed it
    assert process.main(["--foreground", str(state.root), record.id, "--standby"]) == 0
    after = transaction.load_record(state, record.id)
    # nothing applied, and the record says so (it no longer stays preparing with nobody on it)
    assert after.state == transaction.ABORTED and after.guard_pid is None
    assert "nothing was applied" in (after.reason or "")
    assert not state.socket_path.exists()
    assert "called off before the guard was needed" in capsys.readouterr().out


# -- reading the firewall ahead (fwsafe.entry, fwsafe.core.prefetch) ---------------------------
@pytest.mark.parametrize("args,reads", [
    (["apply", "new.rules"], True), (["apply", "--no-check", "-"], True),
    (["apply", "--help"], False), (["apply", "-h"], False), (["apply", "--host", "h", "x"], False),
    (["apply", "--host=h", "x"], False), (["check", "x"], True), (["check", "--help"], False),
    (["status"], False), ([], False),
])
def test_only_a_local_apply_or_check_reads_ahead(args: list[str], reads: bool) -> None:
    from fwsafe.entry import reads_the_firewall

    assert reads_the_firewall(args) is reads


def test_a_reading_ahead_is_handed_over_once_and_only_if_nothing_changed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fwsafe.core import prefetch

    generations = iter([7, 7, 8, 9])
    monkeypatch.setattr(prefetch.nflist, "generation", lambda: next(generations))
    monkeypatch.setattr(prefetch, "available_layers", lambda: [])
    prefetch.start()                         # read at generation 7 ...
    reading = prefetch.take()                # ... still 7: handed over
    assert reading is not None and reading.generation == 7
    assert prefetch.take() is None           # once
    prefetch.start()                         # read at 8 ...
    assert prefetch.take() is None           # ... now 9: somebody changed nf_tables meanwhile


def test_the_cli_reads_the_record_when_the_guard_says_it_saved_it(tmp_path: Path) -> None:
    """No polling every few milliseconds (issue 26, item 9): the guard writes a byte on the
    transaction's `saved` pipe after each save; the CLI wakes at once, and reads the record at
    least every SAVED_POLL_S anyway; a guard with nobody listening loses nothing."""
    import threading
    import time

    state, record = new_tx(tmp_path)
    tx_dir = state.tx_dir(record.id)
    spawn.tell_saved(tx_dir)                       # nobody waits: nothing happens
    fd = spawn.watch_saves(state, record.id)
    assert fd is not None
    began = time.monotonic()
    spawn.wait_saved(fd, 0.3)                      # nothing said: the poll interval
    assert 0.25 <= time.monotonic() - began < 2
    threading.Timer(0.05, spawn.tell_saved, (tx_dir,)).start()
    began = time.monotonic()
    spawn.wait_saved(fd, 10)
    assert time.monotonic() - began < 2            # woken by the guard, not the interval
    for _ in range(3):
        spawn.tell_saved(tx_dir)                   # several saves: one wake-up drains them
    spawn.wait_saved(fd, 10)
    began = time.monotonic()
    spawn.wait_saved(fd, 0.3)
    assert time.monotonic() - began >= 0.25
    spawn.stop_watching(state, record.id, fd)
    assert not (tx_dir / spawn.SAVED_FIFO).exists()
    spawn.tell_saved(tx_dir)                       # after the CLI: still harmless
