"""Step 4 of `fwsafe apply --host` (see `fwsafe.remote.remote_apply`): confirm only through NEW logins.

Every attempt is a new TCP connection and a full SSH login with a new paramiko client and
transport - never the first connection, which may have survived rules that drop new ones.
Attempts have short timeouts and go on until shortly before the deadline. With guard-side
probes, the confirmation waits until the probes have had the time to fail
(`timing.probe_settle_s`); an early revert by a probe is seen meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

from fwsafe.remote import timing
from fwsafe.remote.arm import learn_result, poll_apply
from fwsafe.remote.hostkeys import HostKeyError
from fwsafe.remote.job import RemoteJob
from fwsafe.remote.session import AttemptFailed, Connection, ssh_errors
from fwsafe.remote.verdict import WAITING_STATES, final, remote_error, success

__all__ = ["NewLoginConfirmer"]


class NewLoginConfirmer:
    """Tries new logins until one confirms, the host decides, or the deadline is close."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job
        self._last_report = 0.0

    def confirm(self) -> dict[str, Any] | None:
        """The result once confirmed (or decided on the host: a typed error); None when no
        new login confirmed before the deadline, and the guard reverts by itself."""
        job = self.job
        settle = timing.probe_settle_s(job.req.options)
        settle_until: float | None = None
        job.say(f"probing: opening NEW SSH connections to {job.where} (TCP connect, then a "
                "full login with a new client); only such a login confirms")
        while True:
            now = time.monotonic()
            if job.tx_id is None:
                poll_apply(job)
            if job.tx_id is not None and settle_until is None:
                settle_until = self._settle_until(settle)
            stop_at = job.stop_at()
            budget = min(job.link.attempt(), stop_at - now)
            if budget < timing.MIN_ATTEMPT:
                break
            job.attempts += 1
            number = job.attempts
            try:
                conn = job.connect(budget, tcp_timeout=job.link.tcp_timeout())
            except (AttemptFailed, HostKeyError) as exc:
                self._report_failure(number, exc.message)
                self._pause(stop_at)
                continue
            try:
                with conn:
                    outcome, wait = self._over_new_login(conn, number, settle_until)
            except ssh_errors() as exc:
                job.last_failure = f"new login #{number} broke off: {exc or type(exc).__name__}"
                job.say(job.last_failure)
                self._pause(stop_at)
                continue
            if outcome is not None:
                return outcome
            self.job.pause(max(0.0, min(wait, stop_at - time.monotonic())))
        job.say("no new SSH login confirmed before the deadline"
                + (f" (last: {job.last_failure})" if job.last_failure else "")
                + f"; the guard on {job.where} reverts the change by itself")
        return None

    def _report_failure(self, number: int, text: str) -> None:
        """Say why a new login failed: at once when the reason changes, else every 10 s."""
        job = self.job
        now = time.monotonic()
        if text != job.last_failure or now - self._last_report >= timing.FAILURE_REPORT_EVERY:
            job.say(f"new login #{number} failed: {text}")
            self._last_report = now
        job.last_failure = text

    def _over_new_login(self, conn: Connection, number: int,
                        settle_until: float | None) -> tuple[dict[str, Any] | None, float]:
        """Use one new login: learn the transaction, watch the probes settle, or confirm.

        Returns the final result (or None) and how long to wait before the next login.
        """
        job = self.job
        if "first_new_login_s" not in job.timings and job.tx_id is not None:
            job.mark("first_new_login_s")
        job.say(f"new login #{number} got in (TCP {conn.tcp_s * 1000:.0f} ms, "
                f"login {conn.login_s * 1000:.0f} ms)")
        if job.tx_id is None:
            # This login may predate the change: it only tells us the transaction.
            learn_result(job, conn)
            return None, 0.0
        assert settle_until is not None
        if time.monotonic() < settle_until:
            outcome = self._settle_status(conn)
            return outcome, max(0.0, min(timing.SETTLE_POLL, settle_until - time.monotonic()))
        return self._confirm_over(conn), timing.RETRY_PAUSE

    def _settle_until(self, settle: float) -> float:
        """Until when the probes settle before a confirm (local monotonic time)."""
        job = self.job
        now = time.monotonic()
        if settle <= 0:
            return now
        # Leave enough time for a login and the confirm (a few first logins' worth).
        assert job.first_login_s is not None
        reserve = min(job.link.attempt(),
                      max(timing.CONFIRM_RESERVE, 4 * job.first_login_s))
        latest = job.stop_at() - reserve
        until = min(now + settle, latest)
        if until < now + settle:
            job.say(f"the probes need about {settle:.0f} s to decide but the deadline is "
                    f"closer: confirming at the latest {max(until - now, 0):.0f} s from now")
        else:
            job.say(f"letting the guard's probes run for {settle:.0f} s before confirming")
        return until

    def _pause(self, stop_at: float) -> None:
        self.job.pause(max(0.0, min(timing.RETRY_PAUSE, stop_at - time.monotonic())))

    def _settle_status(self, conn: Connection) -> dict[str, Any] | None:
        """While the probes settle: stop at once if the guard already decided."""
        job = self.job
        status = job.query(conn, "status")
        if status is None or status.get("id") != job.tx_id:
            return None
        if status.get("state") in WAITING_STATES:
            return None
        return final(job, status, conn)

    def _confirm_over(self, conn: Connection) -> dict[str, Any] | None:
        """`fwsafe confirm ID` over a new login. None: try again with another login."""
        job = self.job
        assert job.tx_id is not None
        result = job.query_result(conn, "confirm", job.tx_id, clean=True)
        data = result.json()
        if result.rc == 0 and data and data.get("state") == "confirmed":
            job.tmpdir = None  # removed by the confirm command
            return success(job, data, how="through a new SSH login")
        if result.rc in (4, 5):
            status = job.query(conn, "status")
            if status and status.get("id") == job.tx_id and \
                    status.get("state") not in WAITING_STATES:
                return final(job, status, conn)
            raise remote_error(job, result, data, "confirm")
        why = (data or {}).get("error") or result.stderr_tail() or f"exit status {result.rc}"
        job.last_failure = f"fwsafe confirm: {why}"
        job.say(f"confirm over the new login did not succeed ({why}); trying again")
        return None
