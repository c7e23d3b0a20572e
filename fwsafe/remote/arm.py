"""Step 3 of `fwsafe apply --host` (see `fwsafe.remote.remote_apply`): run ``fwsafe apply --detach
--json`` on the host over the first connection. The host's guard is armed before anything
changes and reverts by itself at the deadline unless confirmed.

The apply leaves its result in the upload directory too (`scripts.APPLY_SCRIPT`): when the
first connection goes silent, `poll_apply` and `learn_result` (over a new login) still learn
the transaction.
"""

from __future__ import annotations

import time

from fwsafe.errors import FwsafeError
from fwsafe.remote.job import RemoteCommandError, RemoteJob
from fwsafe.remote.scripts import (
    APPLY_SCRIPT,
    CALLED_OFF_NOW,
    NO_UPLOAD_DIR,
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

    Once the exec request may have gone out, the host may be applying, whatever happens to
    the connection: from then on a lost answer is "unknown" and new logins find out (never
    "nothing was changed" unless the host says so). If the apply stays silent, `job.apply_cmd`
    keeps the running command for `poll_apply`. The first connection stays open (idle) once
    the result is in: it is never used to confirm, only to revert at once after Ctrl-C.
    """
    assert job.first is not None and job.tmpdir is not None
    command = sh(APPLY_SCRIPT, job.tmpdir, *apply_argv(job))
    cmd = job.first.command()
    job.apply_cmd = cmd
    quiet_limit = job.link.apply_quiet(job.req.options.timeout_s)
    try:
        job.sent_at = time.monotonic()
        cmd.start(command, None, job.link.query())
    except ssh_errors() as exc:
        if not cmd.sent:
            job.sent_at = None
            job.apply_cmd = None
            raise RemoteCommandError(
                f"cannot run fwsafe on {job.where}: {exc}; nothing was changed") from None
        job.apply_cmd = None
        job.say(f"the connection that ran the apply broke before its answer "
                f"({exc or type(exc).__name__}); "
                "whether the host applied is unknown until a new login finds out")
        return
    try:
        result = cmd.wait(quiet_limit, give_up=False)
    except ssh_errors():
        result = RemoteResult(None, b"", b"")  # the connection broke: new logins will tell
    if result is not None:
        job.apply_cmd = None  # finished, or its connection is gone
    if result is not None and result.rc is not None:
        take_apply_result(job, result, via_first=True)
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
        # The answer left the host up to a round trip ago: count the deadline from then.
        job.deadline = time.monotonic() - job.link.rtt_s + float(remaining)
        armed_s = job.mark("armed_s")
        shield = "" if data.get("shielded") is not False else \
            f"; warning: the guard is NOT shielded from the OOM killer ({data.get('shield_error')})"
        job.say(f"armed: the guard on {job.where} (PID {data.get('guard_pid')}) reverts "
                f"transaction {job.tx_id} in {float(remaining):.1f} s unless confirmed{shield}")
        job.say(f"applied: {', '.join(data.get('layers') or [])} rules are live on "
                f"{job.where} ({armed_s:.2f} s after start)")
        return
    error = remote_error(job, result, data, "apply")  # names the local files, not the upload
    if via_first:
        job.cleanup_over_first(job.link.still_there())
    raise error


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


def learn_result(job: RemoteJob, conn: Connection, *, call_off: bool = True) -> None:
    """Read the apply's result left in the upload directory (if it has finished) over a new
    login, and the current deadline from the host's `fwsafe status`.

    An apply that has not even started by now (its exec request was lost with the first
    connection) is called off for good (`call_off`): then nothing was changed, and that is
    what the host says (`RemoteCommandError`, exit 3)."""
    assert job.tmpdir is not None
    args = [job.tmpdir] + (["call-off"] if call_off else [])
    result = conn.run(sh(READ_RESULT_SCRIPT, *args), job.limit(job.link.query()))
    if result.rc == CALLED_OFF_NOW:
        job.tmpdir = None  # removed with the call-off
        raise RemoteCommandError(
            f"the apply never started on {job.where} (its connection was lost before the "
            "command arrived); it is called off for good: nothing was changed")
    if result.rc in (NOT_YET, NO_UPLOAD_DIR) or result.rc is None:
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
        job.deadline = time.monotonic() - job.link.rtt_s + float(remaining)
