"""`fwsafe apply --host`: change a remote firewall from the workstation, and confirm the change
only through a brand-new SSH login.

A keypress in the session that made the change proves little: established connections survive
rules that drop new ones. So, like deploy-rs's "magic rollback", the workstation (`RemoteApply`,
one module a phase):

1. connects (`session`: paramiko; keys and ssh-agent only, never passwords) after checking the
   host key against known_hosts (`hostkeys`): an unknown or changed key is refused before
   anything is sent. This first login measures the link while it is good (round trip, login
   time: `timing.Link`); every later budget is scaled from it, with floors and ceilings;
2. uploads the rules over SFTP into a private ``mktemp -d`` directory on the host, each file
   0600 from its creation (`upload`);
3. runs ``fwsafe apply --detach --json`` there (`arm`): the host's guard is armed before
   anything changes and reverts by itself at the deadline unless confirmed. Once that request
   may have gone out, a lost answer means "unknown" until the host says otherwise: a later
   login reads the result the apply left in the upload directory, or calls off for good an
   apply that never started (then, and only then, nothing changed). The first connection is
   never used to confirm; it stays open only to revert at once after Ctrl-C;
4. opens NEW connections to the host - a TCP connect, then a full SSH login with a new
   paramiko client and transport, never the first one - and runs ``fwsafe confirm ID`` only
   over such a login, retrying until shortly before the deadline (`confirm`). With
   guard-side probes, the confirmation waits until the probes have had the time to fail
   (`probe_settle_s`); an early revert by a probe is seen meanwhile;
5. if no new login gets through in time it does nothing more: the guard reverts. The
   workstation waits (up to the deadline + 120 s) for SSH to answer again, reads
   ``fwsafe status`` and raises `RevertedError` (exit 4) with the host's reason, or
   `RevertFailedError` (exit 5) when the state cannot be known (`outcome`; the host's answers
   become results and typed errors in `verdict`).

Every remote step runs under an overall limit enforced around paramiko (`session`), so every
wait is bounded. Ctrl-C, SIGTERM or SIGHUP at any moment end truthfully (`interrupt`): before
the apply was sent, exit 3 (the upload directory removed); after, the host is told to revert
and the client reports what it recorded (4, 0), or 5 with the command to check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fwsafe.errors import RevertFailedError
from fwsafe.remote import timing
from fwsafe.remote.arm import start_apply
from fwsafe.remote.confirm import NewLoginConfirmer
from fwsafe.remote.hostkeys import KnownHosts, describe_key
from fwsafe.remote.interrupt import AfterInterrupt, interrupted_before_change
from fwsafe.remote.job import RemoteCommandError, RemoteJob, RemoteRequest, SSHConnectError
from fwsafe.remote.outcome import AfterDeadline
from fwsafe.remote.session import AttemptFailed, Connection, Dialer
from fwsafe.remote.timing import Link, probe_settle_s
from fwsafe.remote.upload import make_tmpdir, read_local, upload

__all__ = [
    "RemoteApply",
    "RemoteCommandError",
    "RemoteRequest",
    "SSHConnectError",
    "apply_remote",
    "probe_settle_s",
]


def apply_remote(req: RemoteRequest, progress: Callable[[str], None]) -> dict[str, Any]:
    """Apply on the host under its guard; confirm only through a new SSH login.

    Returns a JSON-able summary once confirmed. Raises: `HostKeyError` (exit 3, nothing
    sent), `SSHConnectError` / `RemoteCommandError` / `InvalidRulesError` /
    `InterruptedBeforeChange` (exit 3, nothing changed), `PendingError` (6), `RevertedError`
    (4: reverted, with the host's reason), `RevertFailedError` (5: the revert failed, or the
    state could not be known). Ctrl-C, SIGTERM and SIGHUP never escape as KeyboardInterrupt:
    they end in one of these (`fwsafe.remote.interrupt`), raised only between steps
    (`fwsafe.remote.signals`).
    """
    return RemoteApply(req, progress).run()


class RemoteApply:
    """The phases of `apply_remote`, in order, over one `RemoteJob`."""

    def __init__(self, req: RemoteRequest, progress: Callable[[str], None]) -> None:
        self.job = RemoteJob(req, progress)

    def run(self) -> dict[str, Any]:
        job = self.job
        with job.interrupts.installed() as caught:
            try:
                try:
                    return self.phases()
                except KeyboardInterrupt:
                    return self.interrupted(caught.name)
                except BaseException:
                    if not job.may_have_applied() and job.tmpdir is not None:
                        interrupted_before_change(job, "")  # removes the upload directory
                    raise
            except KeyboardInterrupt:  # again, while the first one was handled
                if job.may_have_applied():
                    raise RevertFailedError(
                        f"interrupted ({caught.name}) twice: the change may be live on "
                        f"{job.where}; its outcome is unknown",
                        hint=f"check with `{job.check_command()}`") from None
                raise interrupted_before_change(job, caught.name) from None
            finally:
                try:
                    job.close_first()
                except BaseException:  # noqa: BLE001 - closing must not change the verdict
                    pass

    def phases(self) -> dict[str, Any]:
        job = self.job
        contents = read_local(job)
        job.first = self.connect_first()
        self.connected(job.first)
        job.interrupts.check()
        job.tmpdir = make_tmpdir(job)
        upload(job, contents)
        job.interrupts.check()  # the last moment at which Ctrl-C means "nothing changed"
        start_apply(job)
        return self.confirm_or_report()

    def interrupted(self, signame: str) -> dict[str, Any]:
        """What Ctrl-C (SIGTERM, SIGHUP) means at this point: see `fwsafe.remote.interrupt`."""
        job = self.job
        if not job.may_have_applied():
            raise interrupted_before_change(job, signame)
        return AfterInterrupt(job, signame).settle()

    def connect_first(self) -> Connection:
        """Read known_hosts and log in for the upload and the apply (nothing sent yet)."""
        job = self.job
        req = job.req
        known = KnownHosts(req.known_hosts)
        job.dialer = Dialer(job.target, known, identity=req.identity,
                            accept_new=req.accept_new_host_key, on_accept=job.say,
                            interrupts=job.interrupts)
        job.say(f"connecting to {job.where} (host keys: {known.path})")
        try:
            return job.connect(timing.FIRST_CONNECT_TIMEOUT, tcp_timeout=timing.FIRST_TCP_TIMEOUT)
        except AttemptFailed as exc:
            hint = ("check -i KEY / ssh-agent and the user name" if exc.auth
                    else "check the host name, port and network")
            raise SSHConnectError(f"cannot connect to {job.where}: {exc.message}; nothing was "
                                  "changed", hint=hint) from None

    def connected(self, first: Connection) -> None:
        job = self.job
        job.say(f"connected to {job.where} (host key {describe_key(first.server_key)}); "
                f"login took {first.login_s * 1000:.0f} ms")
        job.mark("connected_s")
        job.first_login_s = first.login_s
        job.link = Link(rtt_s=first.tcp_s, login_s=first.login_s)
        job.timings["rtt_s"] = round(first.tcp_s, 3)
        job.say(f"link: {job.link.describe()}")

    def confirm_or_report(self) -> dict[str, Any]:
        """Confirm through new logins; else wait for the host and report the guard's revert.

        A result learned only after the deadline may send us back to confirming.
        """
        confirmer = NewLoginConfirmer(self.job)
        after = AfterDeadline(self.job)
        while True:
            outcome = confirmer.confirm()
            if outcome is None:
                outcome = after.wait()
            if outcome is not None:
                return outcome
