"""Step 3 of `fwsafe apply --host` (see `fwsafe.remote.apply`): run ``fwsafe apply --detach
--json`` on the host over the first connection. The host's guard is armed before anything
changes and reverts by itself at the deadline unless confirmed.

The apply leaves its result in the upload directory too (`scripts.APPLY_SCRIPT`): when the
first connection goes silent, `poll_apply` and `learn_result` (over a new login) still learn
the transaction.
"""

from __future__ import annotations

import time

from fwsafe.errors import FwsafeError
from fwsafe.remote import timing
from fwsafe.remote.job import RemoteCommandError, RemoteJob
from fwsafe.remote.scripts import (
    APPLY_SCRIPT,
    NOT_YET,
    READ_RESULT_SCRIPT,
    REMOTE_NAMES,
    TX_ID_RE,
    sh,
)
from fwsafe.remote.session import Connection, RemoteResult, ssh_errors
from fwsafe.remote.verdict import remote_error

__all__ = ["apply_argv", "learn_result", "poll_apply", "start_apply", "take_apply_result"]


def apply_argv(job: RemoteJob) -> list[str]:
    """The host's ``fwsafe apply --detach --json ...`` for the uploaded files."""
    assert job.tmpdir is not None
    options = job.req.options
    argv = ["apply", "--detach", "--json", "--timeout", repr(float(options.timeout_s))]
    if options.force:
        argv.append("--force")
    if options.partial:
        argv.append("--partial")
    if not options.check:
        argv.append("--no-check")
    for url in options.probes:
        argv += ["--probe", url]
    if options.probes:
        argv += ["--probe-interval", repr(float(options.probe_interval)),
                 "--probe-failures", str(int(options.probe_failures)),
                 "--probe-timeout", repr(float(options.probe_timeout))]
        if options.confirm_on_probe:
            argv += ["--confirm-on-probe", str(int(options.confirm_on_probe))]
    argv = job.fw(*argv)
    if "ipv4" in job.local_paths:
        argv.append(f"{job.tmpdir}/{REMOTE_NAMES['ipv4']}")
    if "ipv6" in job.local_paths:
        argv += ["--rules6", f"{job.tmpdir}/{REMOTE_NAMES['ipv6']}"]
    return argv


def start_apply(job: RemoteJob) -> None:
    """Run the apply over the first connection; take its result if it comes back soon.

    Once the result is in, the first connection is closed: from there on only new logins
    count. If it stays silent, `job.apply_cmd` keeps the running command for `poll_apply`.
    """
    assert job.first is not None and job.tmpdir is not None
    command = sh(APPLY_SCRIPT, job.tmpdir, *apply_argv(job))
    job.sent_at = time.monotonic()
    try:
        job.apply_cmd = job.first.start(command)
    except ssh_errors() as exc:
        raise RemoteCommandError(
            f"cannot run fwsafe on {job.where}: {exc}; nothing was changed") from None
    quiet_limit = min(timing.APPLY_QUIET_MAX,
                      max(timing.APPLY_QUIET_MIN, job.req.options.timeout_s / 3))
    try:
        result = job.apply_cmd.wait(quiet_limit, give_up=False)
    except ssh_errors():
        result = RemoteResult(None, b"", b"")  # the connection broke: new logins will tell
    if result is not None:
        job.apply_cmd = None  # finished, or its connection is gone
    if result is not None and result.rc is not None:
        take_apply_result(job, result, via_first=True)
        first, job.first = job.first, None
        if first is not None:
            first.close()  # from here on only new logins count
        return
    job.say(f"the connection that ran the apply went silent (no result within "
            f"{quiet_limit:.1f} s); looking for the result through new logins")


def take_apply_result(job: RemoteJob, result: RemoteResult, *, via_first: bool,
                      late: bool = False) -> None:
    """Record the armed transaction, or raise the typed error for a refused apply.

    `late`: the result was read from the host's files through a later login; its
    `remaining_s` is stale then, and the caller asks the host for the current deadline.
    """
    data = result.json()
    if result.rc == 0 and data and isinstance(data.get("id"), str) and \
            TX_ID_RE.match(data["id"]) and data.get("state") == "pending":
        job.tx_id = data["id"]
        job.armed = data
        if late:
            job.say(f"the apply on {job.where} had armed transaction {job.tx_id} "
                    f"(guard PID {data.get('guard_pid')}); learned through a new login")
            return
        remaining = data.get("remaining_s")
        if not isinstance(remaining, (int, float)):
            deadline = data.get("deadline")
            remaining = (float(deadline) - time.time()
                         if isinstance(deadline, (int, float)) else job.req.options.timeout_s)
        job.deadline = time.monotonic() + float(remaining)
        armed_s = job.mark("armed_s")
        shield = "" if data.get("shielded") is not False else \
            f"; warning: the guard is NOT shielded from the OOM killer ({data.get('shield_error')})"
        job.say(f"armed: the guard on {job.where} (PID {data.get('guard_pid')}) reverts "
                f"transaction {job.tx_id} in {float(remaining):.1f} s unless confirmed{shield}")
        job.say(f"applied: {', '.join(data.get('layers') or [])} rules are live on "
                f"{job.where} ({armed_s:.2f} s after start)")
        return
    if via_first:
        job.cleanup_over_first()
    raise remote_error(job, result, data, "apply")


def poll_apply(job: RemoteJob) -> None:
    """With the result unknown: has the first connection's apply answered meanwhile?"""
    if job.apply_cmd is None:
        return
    try:
        result = job.apply_cmd.poll()
    except Exception:  # noqa: BLE001 - a dead channel: the new logins will tell
        job.apply_cmd = None
        return
    if result is None:
        return
    job.apply_cmd = None
    if result.rc is not None:
        take_apply_result(job, result, via_first=False, late=True)


def learn_result(job: RemoteJob, conn: Connection) -> None:
    """Read the apply's result left in the upload directory (if it has finished) over a new
    login, and the current deadline from the host's `fwsafe status`."""
    assert job.tmpdir is not None
    result = conn.run(sh(READ_RESULT_SCRIPT, job.tmpdir), timing.REMOTE_QUERY_TIMEOUT)
    if result.rc == NOT_YET or result.rc is None:
        job.say("the apply has not finished on the host yet")
        return
    first_line, _, rest = result.out.partition(b"\n")
    try:
        rc = int(first_line.strip())
    except ValueError:
        return
    try:
        take_apply_result(job, RemoteResult(rc, rest, result.err), via_first=False, late=True)
    except FwsafeError:
        job.cleanup(conn)
        raise
    status = job.query(conn, "status")
    remaining = status.get("remaining_s") if status else None
    if job.tx_id and status and status.get("id") == job.tx_id and \
            isinstance(remaining, (int, float)):
        job.deadline = time.monotonic() + float(remaining)
