"""The time limits of `fwsafe apply --host`, in one place.

The phases read them as ``timing.NAME`` when they run, so that a test can shorten one with
``monkeypatch.setattr(timing, "NAME", ...)``.
"""

from __future__ import annotations

from fwsafe.core.apply import ApplyOptions

#: The first connection: TCP connect, key exchange and login together.
FIRST_CONNECT_TIMEOUT = 15.0
#: Small remote commands (mktemp, cleanup) and the upload.
COMMAND_TIMEOUT = 30.0
UPLOAD_TIMEOUT = 120.0
#: How long the apply may stay silent before we also look for its result over new logins.
APPLY_QUIET_MAX = 10.0
APPLY_QUIET_MIN = 2.0
#: One new-login attempt: TCP connect (at most TCP_TIMEOUT) plus the SSH login.
ATTEMPT_TIMEOUT = 5.0
TCP_TIMEOUT = 2.0
#: After the deadline: short TCP attempts, so that the revert is noticed quickly.
WAIT_TCP_TIMEOUT = 0.5
MIN_ATTEMPT = 0.3
RETRY_PAUSE = 0.5
#: New logins stop this long before the deadline (a later confirm is too late anyway).
DEADLINE_MARGIN = 0.5
#: `fwsafe confirm` / `status` over a login that got in: bounded, but not by the deadline.
REMOTE_QUERY_TIMEOUT = 30.0
#: After the deadline, wait this long for SSH to answer again.
AFTER_DEADLINE_S = 120.0
#: While probes settle, poll the host's status this often.
SETTLE_POLL = 1.0
#: The same reason for failed new logins is repeated at most this often.
FAILURE_REPORT_EVERY = 10.0
#: With probes and a close deadline, confirm at the latest this long before it.
CONFIRM_RESERVE = 2.0


def probe_settle_s(options: ApplyOptions) -> float:
    """How long the guard's probes need to revert a change they keep failing on.

    A round lasts max(interval, probe timeout); `probe_failures` failing rounds in a row
    revert. One round and a second more are allowed for slack. 0 without probes.
    """
    if not options.probes:
        return 0.0
    round_s = max(options.probe_interval, options.probe_timeout)
    return (options.probe_failures + 1) * round_s + 1.0
