from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, atomic_write, resolve_state_dir
from fwsafe.core.transaction import Record, TransitionError
from fwsafe.errors import StateError


def make_record(state: str = transaction.PREPARING) -> Record:
    return Record(id=transaction.new_tx_id(), state=state, created=time.time(), timeout_s=60,
                  backend="iptables", layers=["ipv4"])


@pytest.mark.parametrize("path", [
    [transaction.APPLYING, transaction.PENDING, transaction.CONFIRMED],
    [transaction.APPLYING, transaction.PENDING, transaction.REVERTING, transaction.REVERTED],
    [transaction.APPLYING, transaction.PENDING, transaction.REVERTING, transaction.REVERT_FAILED,
     transaction.REVERTING, transaction.REVERTED],
    [transaction.APPLYING, transaction.REJECTED],
    [transaction.ABORTED],
])
def test_allowed_paths(path: list[str]) -> None:
    record = make_record()
    for state in path:
        record.transition(state)
    assert record.state == path[-1]
    assert [e.event for e in record.events] == path


@pytest.mark.parametrize("start,target", [
    (transaction.PREPARING, transaction.PENDING),      # never live without the guard applying
    (transaction.PENDING, transaction.REVERTED),       # a revert is always recorded as begun
    (transaction.CONFIRMED, transaction.REVERTING),
    (transaction.REVERTED, transaction.CONFIRMED),     # too late to confirm
    (transaction.REJECTED, transaction.PENDING),
])
def test_forbidden_transitions(start: str, target: str) -> None:
    record = make_record(start)
    with pytest.raises(TransitionError):
        record.transition(target)
    assert record.state == start


def test_every_state_has_a_rule() -> None:
    for targets in transaction.TRANSITIONS.values():
        assert targets <= set(transaction.TRANSITIONS)
    assert transaction.FINAL_STATES - {transaction.REVERT_FAILED} == {
        s for s, t in transaction.TRANSITIONS.items() if not t}


def test_remaining_only_while_pending() -> None:
    record = make_record(transaction.PENDING)
    record.deadline = 1000.0
    assert record.remaining_s(now=990.0) == 10.0
    assert record.remaining_s(now=2000.0) == 0.0
    record.state = transaction.CONFIRMED
    assert record.remaining_s(now=990.0) is None


def test_ids_sort_by_time() -> None:
    a = transaction.new_tx_id(1_700_000_000)
    b = transaction.new_tx_id(1_700_000_001)
    assert a < b


def test_record_round_trip_and_permissions(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    record = make_record()
    record.transition(transaction.APPLYING, "armed")
    os.makedirs(state.tx_dir(record.id))
    transaction.save_record(state, record)
    loaded = transaction.load_record(state, record.id)
    assert loaded == record
    path = transaction.record_path(state, record.id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.root.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_damaged_record_is_a_clear_error(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    os.makedirs(state.tx_dir("x"))
    transaction.record_path(state, "x").write_text("{not json")
    with pytest.raises(StateError, match="damaged"):
        transaction.load_record(state, "x")
    transaction.record_path(state, "x").write_text(json.dumps({"id": "x", "bogus": 1}))
    with pytest.raises(StateError):
        transaction.load_record(state, "x")
    with pytest.raises(StateError, match="missing"):
        transaction.load_record(state, "nope")


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def _other_process_locks(root: Path) -> str:
    code = ("import sys\nfrom pathlib import Path\nfrom fwsafe.core.statedir import StateDir\n"
            "from fwsafe.errors import PendingError\ntry:\n"
            "    with StateDir(Path(sys.argv[1])).locked():\n        print('got it')\n"
            "except PendingError:\n    print('taken')\n")
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def test_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    with state.locked():
        assert _other_process_locks(tmp_path) == "taken"
        with StateDir(tmp_path).locked(wait=True):   # the holder locks again: no self-deadlock
            assert _other_process_locks(tmp_path) == "taken"
        assert _other_process_locks(tmp_path) == "taken"   # still held by the outer block
    assert _other_process_locks(tmp_path) == "got it"      # released again


def test_state_dir_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWSAFE_STATE_DIR", "/env/dir")
    assert resolve_state_dir("/explicit") == Path("/explicit")
    assert resolve_state_dir(None, "/conf") == Path("/env/dir")
    monkeypatch.delenv("FWSAFE_STATE_DIR")
    assert resolve_state_dir(None, "/conf") == Path("/conf")
    assert resolve_state_dir(None) == Path("/var/lib/fwsafe")


def test_process_alive_checks_marker() -> None:
    assert transaction.process_alive(os.getpid(), "python") or transaction.process_alive(
        os.getpid(), "pytest")
    assert not transaction.process_alive(os.getpid(), "no-such-marker-xyz")
    assert not transaction.process_alive(None, "x")
