"""The guard's loop decides what comes next after anything goes wrong: an error before the
change is loaded rejects it (nothing changed), one after the deadline reverts, a guard that
was stopped while someone else took its transaction over leaves it alone; and the loop itself
goes on through any exception, and through a disk that refuses the record, until it is over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fwsafe.core import transaction
from fwsafe.guard.clock import boottime
from tests.unit.test_bounds import make_guard


def test_an_error_before_the_change_is_loaded_rejects_it(tmp_path: Path) -> None:
    g = make_guard(tmp_path)
    g.record.state = transaction.APPLYING
    g.on_error(MemoryError("injected"))
    assert g.record.state == transaction.REJECTED and "nothing changed" in (g.record.reason or "")
    assert g.loop.finished()


def test_an_error_once_the_change_may_be_live_reverts(tmp_path: Path) -> None:
    g = make_guard(tmp_path)
    g.record.state = transaction.APPLYING
    g.applied = True
    g.on_error(MemoryError("injected"))
    assert g.revert_reason and "internal error" in g.revert_reason
    pending = make_guard(tmp_path / "2")
    pending.deadline.set(time.time() + 30)
    pending.on_error(RuntimeError("injected"))
    assert pending.revert_reason is None            # before the deadline: wait on
    pending.deadline.set(time.time() - 1)
    pending.on_error(RuntimeError("injected"))
    assert pending.revert_reason is not None        # past it: revert


def test_a_guard_resumed_after_a_take_over_leaves_it_alone(tmp_path: Path) -> None:
    g = make_guard(tmp_path)
    g.deadline.set(time.time() + 30)
    taken = transaction.Record.from_json(g.record.to_json())
    taken.state = transaction.REVERTED
    taken.reverted_by = "backstop"
    transaction.save_record(g.state, taken)
    g.loop.last_step = boottime() - 10   # it was stopped for a while
    g.loop.step()
    assert g.quit and g.loop.finished()
    assert g.record.state == transaction.PENDING   # its own view was never acted on


def test_the_loop_goes_on_after_errors_until_it_is_over(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    g = make_guard(tmp_path)
    g.record.transition(transaction.CONFIRMED, "confirmed")
    g.unsaved = True                     # the record in memory is newer than on disk
    real_step, calls = g.loop.step, []

    def failing_twice() -> None:         # the loop's own step, after two injected failures
        calls.append(1)
        if len(calls) <= 2:
            raise MemoryError("injected")
        real_step()

    monkeypatch.setattr(g.loop, "step", failing_twice)
    g.run()
    assert len(calls) == 3
    assert not g.unsaved and g.loop.finished()
    assert transaction.load_record(g.state, g.record.id).state == transaction.CONFIRMED
    log = (g.state.tx_dir(g.record.id) / "guard.log").read_text()
    assert log.count("guard error: MemoryError('injected')") == 2


def test_a_record_the_disk_refuses_is_kept_and_written_once_it_takes_it(tmp_path: Path) -> None:
    g = make_guard(tmp_path)
    g.record.transition(transaction.CONFIRMED, "confirmed")
    tx_dir = g.state.tx_dir(g.record.id)
    away = tmp_path / "away"
    tx_dir.rename(away)                  # the record cannot be written (as root: no EACCES)
    try:
        assert g.save() is False and g.unsaved
        assert g.handle({"op": "status"})["unsaved"] is True   # `status` asks the guard
        assert not g.loop.finished()     # the guard stays until the record is written
    finally:
        away.rename(tx_dir)
    g.run()                              # the disk takes it again
    assert not g.unsaved
    assert transaction.load_record(g.state, g.record.id).state == transaction.CONFIRMED
