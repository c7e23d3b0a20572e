"""Step 5 of `fwsafe apply --host` (see `fwsafe.remote.remote_apply`): no new login confirmed in
time, so the host's guard reverts by itself. The workstation waits (up to the deadline +
`timing.AFTER_DEADLINE_S`) for SSH to answer again, reads ``fwsafe status`` and reports what
the guard did: `RevertedError` (exit 4) with the host's reason, or `RevertFailedError`
(exit 5) when the state cannot be known."""

from __future__ import annotations

import time
from typing import Any

from fwsafe.errors import RevertFailedError
from fwsafe.remote import timing
from fwsafe.remote.arm import learn_result
from fwsafe.remote.hostkeys import HostKeyError
from fwsafe.remote.job import RemoteJob
from fwsafe.remote.session import AttemptFailed, Connection, ssh_errors
from fwsafe.remote.verdict import WAITING_STATES, final

__all__ = ["AfterDeadline"]

#: A marker result of `_read_outcome`: go back to confirming.
_BACK_TO_CONFIRMING: dict[str, Any] = {}


class AfterDeadline:
    """Waits for the host to answer after the deadline, and reports the guard's decision."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job

    def wait(self) -> dict[str, Any] | None:
        """Wait (bounded) until SSH answers again and report what the guard did.

        Returns the result if the host confirmed after all; None when the apply turned out to
        have finished late with its deadline still ahead: back to confirming through new logins.
        """
        job = self.job
        deadline = (job.deadline if job.deadline is not None
                    else job.stop_at() + timing.DEADLINE_MARGIN)
        end = deadline + timing.AFTER_DEADLINE_S
        # New logins are tried until `end`; a remote command begun by then may finish.
        job.until = end + job.link.query()
        job.say(f"waiting for SSH on {job.where} to answer again (at most "
                f"{timing.AFTER_DEADLINE_S:.0f} s after the deadline)")
        try:
            return self._wait(deadline, end)
        finally:
            job.until = None

    def _wait(self, deadline: float, end: float) -> dict[str, Any] | None:
        job = self.job
        last = "no attempt yet"
        while True:
            now = time.monotonic()
            budget = min(job.link.attempt(), end - now)
            if budget < timing.MIN_ATTEMPT:
                break
            try:
                conn = job.connect(budget, tcp_timeout=job.link.tcp_timeout(after_deadline=True))
            except (AttemptFailed, HostKeyError) as exc:
                last = exc.message
                job.pause(max(0.0, min(0.1, end - time.monotonic())))
                continue
            try:
                with conn:
                    if "answered_s" not in job.timings:
                        job.mark("answered_s")
                    outcome, last = self._read_outcome(conn, deadline)
            except ssh_errors() as exc:
                last = f"a login broke off: {exc or type(exc).__name__}"
                outcome = None
            if outcome is _BACK_TO_CONFIRMING:
                return None
            if outcome is not None:
                return outcome
            job.pause(0.2)
        what = (f"{job.where} answered, but gave no outcome" if "answered_s" in job.timings
                else f"{job.where} did not answer SSH again")
        raise RevertFailedError(
            f"{what} within {timing.AFTER_DEADLINE_S:.0f} s after the deadline (last: {last}); "
            f"whether transaction {job.tx_id or '?'} was reverted is unknown",
            hint=f"check with `{job.check_command()}` once it answers, or reach the host "
                 "another way (console)")

    def _read_outcome(self, conn: Connection,
                      deadline: float) -> tuple[dict[str, Any] | None, str]:
        """After the deadline, over a login that got in: the final result, or None and why
        not yet. Raises the typed error for a reverted (or failed) transaction."""
        job = self.job
        if job.tx_id is None:
            learn_result(job, conn)
            if job.tx_id is not None and job.deadline is not None and \
                    job.deadline - time.monotonic() > timing.DEADLINE_MARGIN + job.link.attempt():
                return _BACK_TO_CONFIRMING, "the transaction is still pending"
        status = job.query(conn, "status", clean=job.tx_id is not None)
        if status is None:
            return None, "fwsafe status gave no answer"
        if job.tx_id is None:
            self._unknown_transaction(status)
            return None, "the apply has not reported back yet"
        if status.get("id") != job.tx_id:
            raise RevertFailedError(
                f"transaction {job.tx_id} is no longer the current one on {job.where} "
                f"(now {status.get('id')}: {status.get('state')}); its outcome is unknown",
                hint="check `fwsafe status` and the firewall on the host")
        if status.get("state") not in WAITING_STATES:
            job.tmpdir = None  # removed by the status command
            return final(job, status, conn), "final"
        if status.get("taken_over"):
            # Its guard is gone and the backstop holds it: reverting, or reverted with the
            # record waiting for the disk (a full state directory). Not decided on disk yet.
            return None, (f"transaction {job.tx_id} is {status.get('state')}: its guard is "
                          "gone and the backstop took it over")
        if status.get("guard_alive") is False and time.monotonic() > deadline + 5:
            raise RevertFailedError(
                f"transaction {job.tx_id} on {job.where} is still {status.get('state')} but "
                "its guard is gone: the change was NOT reverted",
                hint="log in and run `fwsafe recover` (or confirm it)")
        return None, f"transaction {job.tx_id} is still {status.get('state')}"

    def _unknown_transaction(self, status: dict[str, Any]) -> None:
        """The apply never reported back: wait while the host's transaction is undecided,
        else say that the outcome is unknown."""
        job = self.job
        if status.get("state") in WAITING_STATES:
            return
        raise RevertFailedError(
            f"the apply on {job.where} never reported back; `fwsafe status` there shows "
            f"transaction {status.get('id')}: {status.get('state')} ({status.get('reason')}); "
            "the outcome of this apply is unknown",
            hint="check `fwsafe status` and the firewall on the host")
