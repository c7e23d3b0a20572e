"""Who converges a transaction nobody looks after (fwsafe.core.recover.orphaned): only an open
one a guard armed, whose guard is gone and which no process holds, past its deadline (or
being reverted, or never given one); and the take-over's record answered from memory when the
disk refuses it (fwsafe.guard.takeover.Unsaved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwsafe.check.proof import PROVER
from fwsafe.core import transaction
from fwsafe.core.recover import orphaned
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.guard.spawn import converge
from fwsafe.guard.takeover import Unsaved, ask_unsaved


def _state(tmp_path: Path, state: str, *, deadline: float | None, guard_pid: int | None
           ) -> tuple[StateDir, Record]:
    sd = StateDir(tmp_path / "state")
    sd.ensure()
    record = Record(id=transaction.new_tx_id(), state=state, created=time.time(),
                    timeout_s=60, backend="rules", layers=["ipv4"], deadline=deadline,
                    guard_pid=guard_pid)
    os.makedirs(sd.tx_dir(record.id))
    transaction.save_record(sd, record)
    sd.set_current(record.id)
    return sd, record


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(("state", "deadline_in", "expected"), [
    (transaction.PENDING, -1.0, True),          # past its deadline
    (transaction.PENDING, 30.0, False),         # before it: `confirm` may still keep it
    (transaction.APPLYING, None, True),         # never got a deadline: the apply died
    (transaction.REVERTING, 30.0, True),        # someone began reverting and died
    (transaction.CONFIRMED, -1.0, False),
    (transaction.REVERTED, -1.0, False),
])
def test_orphaned(tmp_path: Path, dead_pid: int, state: str, deadline_in: float | None,
                  expected: bool) -> None:
    deadline = None if deadline_in is None else time.time() + deadline_in
    sd, record = _state(tmp_path, state, deadline=deadline, guard_pid=dead_pid)
    assert orphaned(sd, record) is expected


def test_not_orphaned_while_its_guard_lives_or_someone_holds_it(tmp_path: Path,
                                                               dead_pid: int) -> None:
    sd, record = _state(tmp_path, transaction.PENDING, deadline=time.time() - 1,
                        guard_pid=dead_pid)
    with sd.tx_claimed(record.id):   # the backstop (or systemd's take-over) at work
        assert not orphaned(sd, record)
    assert orphaned(sd, record)
    never_armed = Record.from_json({**record.to_json(), "guard_pid": None})
    assert not orphaned(sd, never_armed)   # no guard ever ran it: nothing of ours to undo


def test_converge_leaves_a_transaction_before_its_deadline_alone(tmp_path: Path,
                                                                dead_pid: int) -> None:
    sd, record = _state(tmp_path, transaction.PENDING, deadline=time.time() + 30,
                        guard_pid=dead_pid)
    assert converge(sd) is None
    assert transaction.load_record(sd, record.id).state == transaction.PENDING


def test_a_record_the_disk_refuses_is_answered_from_memory(tmp_path: Path,
                                                          dead_pid: int) -> None:
    sd, record = _state(tmp_path, transaction.PENDING, deadline=time.time() - 1,
                        guard_pid=dead_pid)
    assert ask_unsaved(sd, record.id) is None   # nobody keeps it: the disk is the truth
    kept = Unsaved()
    (sd.tx_dir(record.id)).rename(tmp_path / "away")   # the disk refuses the record
    record.transition(transaction.REVERTING, "the backstop took it over")
    record.transition(transaction.REVERTED, "undone and verified (by backstop)")
    kept.save(sd, record)
    answer = ask_unsaved(sd, record.id)
    assert answer is not None and answer["state"] == transaction.REVERTED
    (tmp_path / "away").rename(sd.tx_dir(record.id))
    kept.flush(sd)
    assert transaction.load_record(sd, record.id).state == transaction.REVERTED
    assert kept.record is None


def test_the_login_hook_starts_converge_in_the_background(tmp_path: Path) -> None:
    """The PAM session hook (fwsafe.persistence.loginhook) starts `--converge` for the state
    directory at an SSH login while its newest transaction is open, in the background: the hook
    returns at once even while the interpreter still runs."""
    from fwsafe.persistence import loginhook

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    seen = tmp_path / "seen"
    python = tmp_path / "python"   # stands in for fwsafe's interpreter: notes its arguments
    python.write_text(f'#!/bin/sh\nsleep 2\necho "$@" > {seen}\n')
    python.chmod(0o755)
    script = tmp_path / "login-mark"
    script.write_text(loginhook.render_script(str(state), str(python)))
    env = {"PATH": os.environ["PATH"], "PAM_TYPE": "open_session", "PAM_SERVICE": "sshd"}

    def login() -> float:
        started = time.monotonic()
        subprocess.run(["sh", str(script)], env=env, check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.monotonic() - started

    assert login() < 1.5
    time.sleep(2.5)
    assert not seen.exists()   # no transaction here ever: nothing started
    tx = "20260101T000000Z-abcd"
    (state / "current").write_text(tx + "\n")
    (state / "tx" / tx).mkdir(parents=True)
    record = state / "tx" / tx / "record.json"
    record.write_text(json.dumps({"id": tx, "state": "confirmed"}, indent=1, sort_keys=True))
    assert login() < 1.5
    time.sleep(2.5)
    assert not seen.exists()   # its newest transaction is settled: no Python at this login
    record.write_text(json.dumps({"id": tx, "state": "pending"}, indent=1, sort_keys=True))
    assert login() < 1.5       # backgrounded: the login does not wait for it
    end = time.monotonic() + 10
    while not seen.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert seen.read_text().split() == ["-m", "fwsafe.guard.backstop", "--converge", str(state)]
    with pytest.raises(ValueError):
        loginhook.render_script(str(state), "python3")   # not an absolute path


def test_confirm_after_the_deadline_with_the_guard_gone_reverts_never_keeps(
        tmp_path: Path, dead_pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the deadline the hatch lets any new login in: such a confirm proves nothing. It
    reverts (exit 4), never keeps the change as known good. The revert itself is stubbed here
    (a unit test never touches a firewall); its lab tests are the crash matrix's."""
    from fwsafe.control.manager import LATE_CONFIRM, Manager
    from fwsafe.errors import RevertedError

    sd, record = _state(tmp_path, transaction.PENDING, deadline=time.time() - 600,
                        guard_pid=dead_pid)
    asked: list[str] = []

    def revert(self: Manager, tx_id: str | None = None, reason: str = "") -> Record:
        asked.append(reason)
        done = transaction.load_record(sd, record.id)
        done.transition(transaction.REVERTING, reason)
        done.transition(transaction.REVERTED, reason)
        transaction.save_record(sd, done)
        return done

    def kept(*args: object, **kwargs: object) -> None:
        raise AssertionError("the late confirm kept the change")

    monkeypatch.setattr(Manager, "revert", revert)
    monkeypatch.setattr("fwsafe.control.manager.confirm_without_guard", kept)
    with pytest.raises(RevertedError):
        Manager(sd, prover=PROVER).confirm(record.id)
    assert asked == [LATE_CONFIRM]
    assert transaction.load_record(sd, record.id).state == transaction.REVERTED


def test_the_login_hook_filter_knows_every_open_state(tmp_path: Path) -> None:
    """The hook's shell filter (grep on record.json) matches exactly the open states of
    fwsafe.core.transaction: a state added there is never missed by the hook."""
    import re as _re

    from fwsafe.core import transaction
    from fwsafe.persistence import loginhook

    script = loginhook.render_script(str(tmp_path), "/usr/bin/python3")
    pattern = _re.search(r"grep -Eqs '([^']+)'", script)
    assert pattern is not None
    record = tmp_path / "record.json"
    finals = {transaction.CONFIRMED, transaction.REVERTED, transaction.ABORTED,
              transaction.REJECTED, transaction.PREPARING}
    for state in sorted(transaction.OPEN_STATES | finals):
        record.write_text(json.dumps({"id": "x", "state": state}, indent=1, sort_keys=True))
        found = subprocess.run(["grep", "-Eqs", pattern.group(1), str(record)], timeout=10)
        assert (found.returncode == 0) == (state in transaction.OPEN_STATES), state


def test_a_revert_racing_the_guard_that_just_finished_says_reverted(
        tmp_path: Path, dead_pid: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`revert` (and a late `confirm`) read the record as reverting, then found its guard
    gone: it had written `reverted` and exited in between, so the recover it started found
    nothing to do. Reverted (exit 4), never "nothing to recover" (exit 3): CI's lab run saw 3."""
    from fwsafe.control import manager as manager_module
    from fwsafe.control.manager import Manager
    from fwsafe.errors import RevertedError

    monkeypatch.setattr("fwsafe.core.recover.require_root", lambda: None)
    real = manager_module.recover_transaction
    finished: list[tuple[StateDir, str]] = []

    def guard_finished_first(*args: object, **kwargs: object) -> Record:
        """The record is final before the real recover reads it: it refuses before it
        touches anything (NoTransactionError)."""
        sd, tx_id = finished[-1]
        done = transaction.load_record(sd, tx_id)
        done.transition(transaction.REVERTED, "the deadline passed")
        transaction.save_record(sd, done)
        return real(*args, **kwargs)   # type: ignore[arg-type]

    monkeypatch.setattr(manager_module, "recover_transaction", guard_finished_first)
    for verb in ("revert", "confirm"):
        sd, record = _state(tmp_path / verb, transaction.REVERTING,
                            deadline=time.time() - 5, guard_pid=dead_pid)
        finished.append((sd, record.id))
        if verb == "revert":
            assert Manager(sd, prover=PROVER).revert(record.id).state == transaction.REVERTED
        else:
            with pytest.raises(RevertedError):
                Manager(sd, prover=PROVER).confirm(record.id)
