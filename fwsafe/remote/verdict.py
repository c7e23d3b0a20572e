"""What the host's answers mean for `fwsafe apply --host`: the result once confirmed, or the
typed error (and exit code) for a refused, reverted or unknown transaction."""

from __future__ import annotations

from typing import Any

from fwsafe.errors import (
    FwsafeError,
    InvalidRulesError,
    PendingError,
    RejectedError,
    RevertedError,
    RevertFailedError,
    UsageError,
)
from fwsafe.remote import timing
from fwsafe.remote.job import RemoteCommandError, RemoteJob
from fwsafe.remote.scripts import CALLED_OFF
from fwsafe.remote.session import Connection, RemoteResult

__all__ = ["WAITING_STATES", "final", "remote_error", "success"]

#: The states of a transaction whose guard has not decided yet.
WAITING_STATES = ("preparing", "applying", "pending", "reverting")


def remote_error(job: RemoteJob, result: RemoteResult, data: dict[str, Any] | None,
                 what: str) -> FwsafeError:
    """The typed error for a failed `fwsafe WHAT` on the host (by its exit status)."""
    rc = result.rc
    message = str(data.get("error")) if data and data.get("error") else (
        result.stderr_tail() or f"exit status {rc}")
    message = job.localize(message.removeprefix("fwsafe: error: "))
    hint = job.localize(str(data["hint"])) if data and data.get("hint") else None
    kind = str(data.get("kind")) if data and data.get("kind") else None
    text = f"{job.where}: {message}"
    if rc == 2:
        return UsageError(text, hint=hint)
    if rc == 3:
        if kind in (None, "InvalidRulesError"):
            return InvalidRulesError(text, hint=hint or "nothing was changed")
        return RejectedError(text, hint=hint or "nothing was changed")
    if rc == 4:
        return RevertedError(text, hint=hint)
    if rc == 5:
        return RevertFailedError(text, hint=hint)
    if rc == 6:
        return PendingError(text, hint=hint)
    if rc == CALLED_OFF:
        return RemoteCommandError(
            f"the apply on {job.where} was called off before it started; nothing was changed")
    if rc == 127:
        return RemoteCommandError(
            f"{job.req.remote_fwsafe!r} was not found on {job.where} (exit 127): "
            f"{result.stderr_tail()}; nothing was changed",
            hint="install fwsafe on the host (root's PATH)")
    return RemoteCommandError(
        f"fwsafe {what} on {job.where} failed (exit {rc}): {message}",
        hint="if it had applied anything, its guard reverts it unless confirmed; "
             "check `fwsafe status` on the host")


def success(job: RemoteJob, data: dict[str, Any], *, how: str) -> dict[str, Any]:
    """The JSON-able result of a confirmed transaction (`data`: the host's answer)."""
    confirmed_s = job.mark("confirmed_s")
    reason = data.get("reason")
    job.say(f"confirmed {how}: transaction {job.tx_id} stays on {job.where} "
            f"({confirmed_s:.2f} s after start)")
    return {
        "ok": True,
        "id": job.tx_id,
        "state": "confirmed",
        "host": job.where,
        "confirmed_via": how,
        "reason": reason,
        "login_attempts": job.attempts,
        "probe_settle_s": timing.probe_settle_s(job.req.options),
        **job.timings,
        "armed": job.armed,
        "remote": data,
    }


def final(job: RemoteJob, status: dict[str, Any], conn: Connection | None) -> dict[str, Any]:
    """Turn the host's final state of our transaction into a result or a typed error.

    Over `conn` (if any) the upload directory is removed first.
    """
    state = status.get("state")
    reason = status.get("reason") or "no reason recorded"
    if conn is not None:
        job.cleanup(conn)
    if state == "confirmed":
        return success(job, status, how=f"on the host ({reason})")
    if state == "reverted":
        job.mark("reverted_s")
        tail = ""
        if job.last_failure and job.timings.get("first_new_login_s") is None:
            tail = f"; no new SSH login got through (last attempt: {job.last_failure})"
        job.say(f"reverted: transaction {job.tx_id} on {job.where}: {reason}")
        raise RevertedError(
            f"the change was reverted on {job.where} (transaction {job.tx_id}): "
            f"{reason}{tail}",
            hint="the rules from before the change are back in force there")
    if state == "revert_failed":
        raise RevertFailedError(
            f"the revert FAILED on {job.where} (transaction {job.tx_id}): "
            f"{status.get('error') or reason}; the firewall may hold the new rules",
            hint="log in (console if need be) and run `fwsafe recover`; check iptables-save")
    if state in ("rejected", "aborted"):
        raise RejectedError(f"{job.where}: transaction {job.tx_id} was {state}: {reason}",
                            hint="nothing was changed")
    raise RevertFailedError(
        f"transaction {job.tx_id} on {job.where} is {state!r}: state unknown",
        hint="check `fwsafe status` on the host")
