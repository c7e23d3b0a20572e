"""The time limits of `fwsafe apply --host`, in one place.

Before the change, the first login measures the link while it is good (`Link`: its TCP connect
is one round trip; its login the TCP connect, key exchange and authentication). Every later
budget is scaled from those two numbers, with a floor (what a fast LAN needs, and what fwsafe
always allowed) and a ceiling (so that a bad measurement never makes a wait unbounded):

=====================  ==================================  =======  =======
budget                  scaled as                           floor    ceiling
=====================  ==================================  =======  =======
TCP connect, new login  2 s + 3 x round trip                2 s      20 s
 ... after the deadline 0.5 s + 3 x round trip              0.5 s    20 s
one new login           2 s + 3 x first login               5 s      60 s
remote command/query    30 s + 10 x round trip              30 s     120 s
upload                  60 s + 10 x rtt + size / 64 KiB/s   60 s     600 s
apply's quiet time      timeout/3 (2..10 s) + 4 x rtt       2 s      10 s + 4 x rtt
after Ctrl-C            2 x one new login                   15 s     60 s
=====================  ==================================  =======  =======

After the deadline the client waits `AFTER_DEADLINE_S` for SSH to answer again; after Ctrl-C
it waits for the guard's own deadline too (and one new login after it) when that comes within
`INTERRUPT_DEADLINE_WAIT`. Every remote step runs under an overall limit enforced around
paramiko (`session.Connection.bounded`), so these are the real upper bounds of the client's
waits.

The phases read the constants as ``timing.NAME`` when they run, so that a test can shorten one
with ``monkeypatch.setattr(timing, "NAME", ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fwsafe.control.flow import ApplyOptions

#: The first connection (before anything is measured): TCP connect, then the whole login.
FIRST_TCP_TIMEOUT = 10.0
FIRST_CONNECT_TIMEOUT = 30.0

TCP_FLOOR = 2.0
TCP_AFTER_DEADLINE_FLOOR = 0.5
TCP_CEILING = 20.0
ATTEMPT_FLOOR = 5.0
ATTEMPT_CEILING = 60.0
QUERY_FLOOR = 30.0
QUERY_CEILING = 120.0
UPLOAD_FLOOR = 60.0
UPLOAD_CEILING = 600.0
#: The slowest upload rate the upload budget allows for (bytes per second).
UPLOAD_MIN_RATE = 64 * 1024
APPLY_QUIET_MAX = 10.0
APPLY_QUIET_MIN = 2.0
INTERRUPT_FLOOR = 15.0
INTERRUPT_CEILING = 60.0
#: After Ctrl-C, wait for the guard's own deadline when it passes within this time.
INTERRUPT_DEADLINE_WAIT = 120.0
#: How long a connection that may be dead gets to show that it still answers.
STILL_THERE_FLOOR = 3.0
STILL_THERE_CEILING = 15.0

MIN_ATTEMPT = 0.3
RETRY_PAUSE = 0.5
#: New logins stop this long before the deadline (a later confirm is too late anyway).
DEADLINE_MARGIN = 0.5
#: After the deadline, wait this long for SSH to answer again.
AFTER_DEADLINE_S = 120.0
#: While probes settle, poll the host's status this often.
SETTLE_POLL = 1.0
#: The same reason for failed new logins is repeated at most this often.
FAILURE_REPORT_EVERY = 10.0
#: With probes and a close deadline, confirm at the latest this long before it.
CONFIRM_RESERVE = 2.0
#: Closing a channel (a CHANNEL_CLOSE message) may take this long, else the connection goes.
CLOSE_LIMIT = 2.0


def clamp(value: float, low: float, high: float) -> float:
    return max(low, min(value, high))


@dataclass(frozen=True)
class Link:
    """The link as the first login measured it, before the change (zero: not measured)."""

    rtt_s: float = 0.0      #: the first login's TCP connect: one round trip
    login_s: float = 0.0    #: the first login: TCP connect, key exchange, authentication

    def tcp_timeout(self, *, after_deadline: bool = False) -> float:
        """The TCP connect limit of a new login (shorter after the deadline, so that the
        revert is noticed quickly; never shorter than the round trip allows)."""
        floor = TCP_AFTER_DEADLINE_FLOOR if after_deadline else TCP_FLOOR
        return clamp(floor + 3 * self.rtt_s, floor, TCP_CEILING)

    def attempt(self) -> float:
        """One new login: TCP connect, key exchange and authentication."""
        return clamp(2.0 + 3 * self.login_s, ATTEMPT_FLOOR, ATTEMPT_CEILING)

    def query(self) -> float:
        """A remote command over a login that got in (`fwsafe status/confirm/revert`, mktemp)."""
        return clamp(QUERY_FLOOR + 10 * self.rtt_s, QUERY_FLOOR, QUERY_CEILING)

    def upload(self, size: int) -> float:
        """The whole upload of `size` bytes."""
        return clamp(UPLOAD_FLOOR + 10 * self.rtt_s + size / UPLOAD_MIN_RATE,
                     UPLOAD_FLOOR, UPLOAD_CEILING)

    def apply_quiet(self, timeout_s: float) -> float:
        """How long the apply may stay silent before we also look for its result over new
        logins."""
        return clamp(timeout_s / 3, APPLY_QUIET_MIN, APPLY_QUIET_MAX) + 4 * self.rtt_s

    def still_there(self) -> float:
        """How long a connection that may have died gets to answer a small command."""
        return clamp(STILL_THERE_FLOOR + 4 * self.rtt_s, STILL_THERE_FLOOR, STILL_THERE_CEILING)

    def interrupt(self) -> float:
        """After Ctrl-C: how long to try to reach the host, revert and read the outcome."""
        return clamp(2 * self.attempt(), INTERRUPT_FLOOR, INTERRUPT_CEILING)

    def describe(self) -> str:
        return (f"round trip {self.rtt_s * 1000:.0f} ms, login {self.login_s * 1000:.0f} ms: "
                f"new logins get {self.attempt():.1f} s (TCP {self.tcp_timeout():.1f} s), "
                f"remote commands {self.query():.0f} s")


def probe_settle_s(options: ApplyOptions) -> float:
    """How long the guard's probes need to revert a change they keep failing on.

    A round lasts max(interval, probe timeout); `probe_failures` failing rounds in a row
    revert. One round and a second more are allowed for slack. 0 without probes.
    """
    if not options.probes:
        return 0.0
    round_s = max(options.probe_interval, options.probe_timeout)
    return (options.probe_failures + 1) * round_s + 1.0
