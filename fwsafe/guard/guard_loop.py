"""The guard's loop (`Loop`: wait, revert, clean up, answer requests meanwhile, never ending
while the transaction is open) and its answers on its socket (`Requests`: status, confirm,
revert, extend). Both act on the one `Guard` of fwsafe.guard.process.

Imported by the guard process: it keeps its imports small.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import TYPE_CHECKING, Any

from fwsafe.core import transaction
from fwsafe.guard.clock import boottime, max_seconds, seconds_problem
from fwsafe.guard.host_facts import system_stopping
from fwsafe.guard.requests import serve_one

if TYPE_CHECKING:
    from fwsafe.guard.process import Guard


class Loop:
    """The guard's loop: wait, revert, clean up, answer requests meanwhile. It never ends
    while the transaction is open: every exception is logged and the step tried again with
    backoff."""

    def __init__(self, guard: Guard) -> None:
        self.g = guard
        self.last_step = boottime()

    def pause(self, seconds: float) -> None:
        """Wait `seconds`, answering requests meanwhile and beating for the backstop."""
        end = boottime() + seconds
        while True:
            self.g.backstop.beat()
            left = end - boottime()
            if left <= 0:
                return
            watched: list[Any] = [self.g.wake_r] + ([self.g.server] if self.g.server else [])
            try:
                readable, _, _ = select.select(watched, [], [], min(left, 0.5))
            except InterruptedError:
                continue
            self._dispatch(readable)

    def finished(self) -> bool:
        return self.g.quit or (self.g.record.is_final and not self.g.unsaved
                             and not self.g.hatch.removing and self.g.revert_reason is None)

    def run(self) -> None:
        """Until the transaction is over, the hatch gone and the record written: wait, revert,
        clean up. Nothing that goes wrong ends it while the transaction is open."""
        delay = 0.1
        while not self.finished():
            try:
                self.step()
                delay = 0.1
            except BaseException as exc:  # noqa: BLE001 - the way back must not stop
                self.g.log(f"guard error: {exc!r}; going on in {delay:g} s")
                self.on_error(exc)
                with contextlib.suppress(BaseException):
                    self.pause(delay)
                delay = min(delay * 2, 5.0)

    def on_error(self, exc: BaseException) -> None:
        """After an error: what must happen next so that nothing is left live."""
        state = self.g.record.state
        if state == transaction.APPLYING and not self.g.applied:
            self.g.record.reason = f"the guard failed before applying ({exc!r}); nothing changed"
            self.g.record.transition(transaction.REJECTED, self.g.record.reason)
            self.g.hatch.removing = self.g.hatch.spec is not None
            self.g.save()
        elif state == transaction.APPLYING or (state == transaction.PENDING
                                                and self.g.deadline.left() <= 0):
            self.g.revert_reason = self.g.revert_reason or f"the guard hit an internal error: {exc!r}"

    def step(self) -> None:
        now = boottime()
        resumed, self.last_step = now - self.last_step > 3.0, now
        self.g.backstop.beat()
        if resumed and self.taken_over():
            self.g.log("the transaction was taken over while this guard was stopped; leaving it")
            self.g.quit = True
            return
        if self.g.revert_reason is not None or self.g.record.state == transaction.REVERTING:
            self.g.revert(self.g.revert_reason or "the revert goes on")
        elif self.g.record.state == transaction.APPLYING:
            self.g.revert_reason = "the guard lost track of the change while applying it"
        elif self.g.record.state == transaction.PENDING:
            if self.g.after.adopt(wanted=not self.g.done):
                self.g.after_capture()
            self.wait_once()
        else:   # over: what is left to do
            if self.g.hatch.removing:   # (it changes the record: its hatch removed, or not)
                self.g.hatch.remove()
                self.g.save()
            elif self.g.unsaved:
                self.g.save()
            if not self.finished():
                self.pause(1.0)

    def taken_over(self) -> bool:
        """Someone else acted on the transaction meanwhile (this guard was stopped)."""
        try:
            disk = transaction.load_record(self.g.state, self.g.record.id)
        except Exception:  # noqa: BLE001 - cannot tell: carry on
            return False
        return disk.reverted_by not in (None, "guard") or (
            disk.is_final and not self.g.record.is_final)

    def wait_once(self) -> None:
        if self.g.terminate:
            self.g.revert(
                "reboot or shutdown: systemd stopped the guard while the change was pending; "
                "it was undone before the machine went down" if system_stopping() else
                "the guard was terminated (SIGTERM) before confirmation")
            return
        left = self.g.deadline.left()
        if left <= 0:
            self.g.revert(
                f"timeout: not confirmed within {self.g.record.timeout_s:g} s"
                + (" (deadline extended)" if any(e.event == "extended"
                                                 for e in self.g.record.events) else ""))
            return
        if self.g.after.reading is None:   # (its commits would make the capture's stamp stale)
            self.g.hatch.follow(self.g.deadline.wall(), self.g.record.watch)   # a clock step
        if self.g.unsaved:
            self.g.save()
        if self.g.backstop.missing:
            self.g.backstop.start()  # it could not be started before: try again
        watched: list[Any] = [self.g.wake_r] + ([self.g.server] if self.g.server else [])
        if self.g.backstop.fd is not None:
            watched.append(self.g.backstop.fd)
        try:
            readable, _, _ = select.select(watched, [], [], min(left, 1.0))
        except InterruptedError:
            return
        self._dispatch(readable)

    def _dispatch(self, readable: list[Any]) -> None:
        if self.g.backstop.fd is not None and self.g.backstop.fd in readable:
            self.g.backstop.died(restart=not self.g.record.is_final)
            self.g.save()
        if self.g.wake_r in readable:
            try:
                os.read(self.g.wake_r, 4096)
            except BlockingIOError:
                pass
            verdict = self.g.probes.verdict() if self.g.probes and not self.g.done else None
            if verdict and verdict[0] == "revert":
                self.g.revert(verdict[1])
            elif verdict:
                self.g.confirm({"how": verdict[1]})
        if self.g.server is not None and self.g.server in readable:
            try:
                conn, _ = self.g.server.accept()
            except BlockingIOError:
                return
            serve_one(conn, self.g.handle, self.g.log)



class Requests:
    """The guard's answers on its socket: status from memory (the truth even when the disk
    refuses the record), confirm, revert, extend."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        guard, record = self.guard, self.guard.record
        op = message.get("op")
        if op == "status":
            left = guard.deadline.remaining() if record.state == transaction.PENDING else None
            return {"ok": True, "record": record.to_json(),
                    "remaining_s": round(left, 1) if left is not None else None,
                    "clock": "boottime", "unsaved": guard.unsaved}
        if record.state != transaction.PENDING:
            return {"ok": False, "state": record.state,
                    "error": f"transaction is {record.state}"}
        if op == "confirm":
            by = message.get("by") or {}
            guard.confirm({str(k): str(v) for k, v in dict(by).items()})
            return {"ok": True, "state": record.state}
        if op == "revert":
            guard.revert(str(message.get("reason") or "reverted on request"))
            return {"ok": record.state == transaction.REVERTED, "state": record.state,
                    "error": record.error}
        if op == "extend":
            return self.extend(message)
        return {"ok": False, "state": record.state, "error": f"unknown request {op!r}"}

    def extend(self, message: dict[str, Any]) -> dict[str, Any]:
        guard, record = self.guard, self.guard.record
        seconds = message.get("seconds")
        problem = seconds_problem(seconds, max_seconds(record))
        if problem is not None:  # the CLI checks too; this is the second line of defence
            return {"ok": False, "state": record.state, "error": problem}
        assert isinstance(seconds, (int, float))
        guard.deadline.extend(float(seconds))
        # The backstop's copy and systemd's limit first: nobody may act on the old deadline.
        guard.backstop.deadline(guard.deadline.at_boot)
        guard.backstop.set_limit(guard.deadline.left() + guard.limit_margin())
        guard.hatch.follow(guard.deadline.wall(), record.watch)
        record.log("extended", f"+{seconds:g} s by {message.get('by', '?')}")
        guard.save()
        guard.log(f"deadline extended by {seconds:g} s")
        return {"ok": True, "state": record.state, "deadline": record.deadline}
