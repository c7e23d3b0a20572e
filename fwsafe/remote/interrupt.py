"""After Ctrl-C (or SIGTERM, SIGHUP) in `fwsafe apply --host`: the truth, within a bound.

* Before the apply was sent, nothing can have changed: the upload directory is removed (over
  the first connection, else a new login, briefly) and the exit is 3 (`InterruptedBeforeChange`).
* Once it may have been sent, the host may have applied. `AfterInterrupt.settle` reaches the
  host - over the first connection while it still answers (it survives rules that drop new
  logins), else over new logins - learns the transaction (calling off an apply that never
  started: then nothing changed, exit 3), tells the guard to revert it if it is still pending,
  and reports what the host recorded: reverted (exit 4), confirmed after all (exit 0), the revert
  failed (5). If the host cannot be reached within the bound, or a second Ctrl-C says stop now,
  the outcome is unknown: exit 5, with the command that shows it.

The bound: `Link.interrupt()` (twice a new login's budget, 15-60 s), or until one login after
the guard's own deadline if that comes sooner than `timing.INTERRUPT_DEADLINE_WAIT` from now.
"""

from __future__ import annotations

import time
from typing import Any

from fwsafe.errors import RevertFailedError
from fwsafe.remote import timing
from fwsafe.remote.arm import learn_result, take_apply_result
from fwsafe.remote.hostkeys import HostKeyError
from fwsafe.remote.job import InterruptedBeforeChange, RemoteJob
from fwsafe.remote.session import AttemptFailed, Connection, ssh_errors
from fwsafe.remote.verdict import WAITING_STATES, final

__all__ = ["AfterInterrupt", "interrupted_before_change"]


def interrupted_before_change(job: RemoteJob, signame: str) -> InterruptedBeforeChange:
    """Nothing was sent that could change the host: remove the upload directory (briefly)
    and say so."""
    left = ""
    if job.tmpdir is not None and not _remove_upload_dir(job):
        left = f"; the upload directory {job.where}:{job.tmpdir} was left behind (remove it)"
    return InterruptedBeforeChange(
        f"interrupted ({signame}) before anything was applied on {job.where}: nothing was "
        f"changed{left}")


def _remove_upload_dir(job: RemoteJob) -> bool:
    job.until = time.monotonic() + max(job.link.still_there(), job.link.attempt())
    try:
        if job.first is not None and job.first.active() and \
                job.cleanup_over_first(job.link.still_there()):
            return True
        try:
            with job.connect(job.link.attempt(), tcp_timeout=job.link.tcp_timeout()) as conn:
                return job.cleanup(conn)
        except (AttemptFailed, HostKeyError):
            return False
    except KeyboardInterrupt:
        return False
    finally:
        job.until = None


class AfterInterrupt:
    """Reverts what the interrupted apply may have changed, and reports what the host did."""

    def __init__(self, job: RemoteJob, signame: str) -> None:
        self.job = job
        self.signame = signame
        self.last = "no answer yet"

    def bound(self) -> float:
        """Until when (local monotonic time) the client tries."""
        job = self.job
        now = time.monotonic()
        end = now + job.link.interrupt()
        deadline = job.deadline if job.deadline is not None else (
            job.stop_at() + timing.DEADLINE_MARGIN if job.sent_at is not None else None)
        if deadline is not None:
            after = deadline + job.link.attempt()
            if after - now <= timing.INTERRUPT_DEADLINE_WAIT:
                end = max(end, after)
        return end

    def settle(self) -> dict[str, Any]:
        """The result if the host confirmed after all; else raises the typed error: reverted
        (4), called off before it started (3), revert failed or unknown (5)."""
        job = self.job
        end = self.bound()
        job.until = end
        job.say(f"interrupted ({self.signame}): telling {job.where} to revert"
                + (f" transaction {job.tx_id}" if job.tx_id else " what this apply changed")
                + f"; giving up in {end - time.monotonic():.0f} s at the latest "
                  "(Ctrl-C again: stop now, outcome unknown)")
        try:
            outcome = self._settle(end)
        except KeyboardInterrupt:
            self.last = "stopped by a second interrupt"
            outcome = None
        finally:
            job.until = None
        if outcome is not None:
            return outcome
        what = f"transaction {job.tx_id}" if job.tx_id else "the apply"
        when = ""
        if job.deadline is not None:
            when = (f"; unless confirmed, its guard reverts it by itself "
                    f"{max(job.deadline - time.monotonic(), 0):.0f} s from now")
        raise RevertFailedError(
            f"interrupted ({self.signame}): {job.where} could not be told to revert {what} "
            f"({self.last}); the change may be live, its outcome is unknown{when}",
            hint=f"check with `{job.check_command()}`")

    def _settle(self, end: float) -> dict[str, Any] | None:
        job = self.job
        while time.monotonic() < end - timing.MIN_ATTEMPT:
            conn, owned = self._reach(end)
            if conn is None:
                job.pause(max(0.0, min(timing.RETRY_PAUSE, end - time.monotonic())))
                continue
            try:
                while time.monotonic() < end:
                    outcome, wait = self._over(conn)
                    if outcome is not None:
                        return outcome
                    job.pause(max(0.0, min(wait, end - time.monotonic())))
            except ssh_errors() as exc:
                self.last = f"the connection broke off: {exc or type(exc).__name__}"
                if not owned:
                    job.close_first()
            finally:
                if owned:
                    conn.close()
        return None

    def _reach(self, end: float) -> tuple[Connection | None, bool]:
        """The first connection while it still answers, else a new login (owned: close it)."""
        job = self.job
        first = job.first
        if first is not None and first.active():
            try:
                if job.apply_cmd is not None and job.tx_id is None:
                    # The apply's own answer is the quickest news: its channel is still open.
                    result = job.apply_cmd.wait(
                        min(job.link.still_there(), max(end - time.monotonic(), 0.0)),
                        give_up=False)
                    if result is not None:
                        job.apply_cmd = None
                        if result.rc is not None:
                            take_apply_result(job, result, via_first=True)
                first.run("true", min(job.link.still_there(), max(end - time.monotonic(), 0.05)))
                return first, False
            except ssh_errors() as exc:
                self.last = f"the first connection no longer answers ({exc})"
                job.close_first()
        budget = min(job.link.attempt(), end - time.monotonic())
        if budget < timing.MIN_ATTEMPT:
            return None, False
        try:
            return job.connect(budget, tcp_timeout=job.link.tcp_timeout()), True
        except (AttemptFailed, HostKeyError) as exc:
            self.last = f"no new login: {exc.message}"
            return None, False

    def _over(self, conn: Connection) -> tuple[dict[str, Any] | None, float]:
        """Over a login that answers: learn, revert, read the outcome. None: not yet."""
        job = self.job
        if job.tx_id is None:
            if job.tmpdir is None:
                self.last = "the apply's result is unknown and its upload directory is gone"
                return None, 1.0
            learn_result(job, conn)  # raises exit 3 if the apply is called off or refused
            if job.tx_id is None:
                self.last = "the apply is still running on the host"
                return None, 0.3
        status = job.query(conn, "status")
        if status is None:
            self.last = "fwsafe status gave no answer"
            return None, 1.0
        if status.get("id") != job.tx_id:
            raise RevertFailedError(
                f"interrupted ({self.signame}): transaction {job.tx_id} is no longer the "
                f"current one on {job.where} (now {status.get('id')}: {status.get('state')}); "
                "its outcome is unknown", hint=f"check with `{job.check_command()}`")
        if status.get("state") == "pending":
            job.say(f"reverting transaction {job.tx_id} on {job.where}")
            job.query_result(conn, "revert", job.tx_id)
            status = job.query(conn, "status") or status
        if status.get("state") in WAITING_STATES:
            self.last = f"transaction {job.tx_id} is still {status.get('state')}"
            return None, 0.5
        job.last_failure = None
        return final(job, status, conn), 0.0
