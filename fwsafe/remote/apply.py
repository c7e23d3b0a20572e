"""`fwsafe apply --host`: change a remote firewall from the workstation, and confirm the change
only through a brand-new SSH login.

A keypress in the session that made the change proves little: established connections survive
rules that drop new ones. So, like deploy-rs's "magic rollback", the workstation (`RemoteApply`,
one module a phase):

1. connects (`session`: paramiko; keys and ssh-agent only, never passwords) after checking the
   host key against known_hosts (`hostkeys`): an unknown or changed key is refused before
   anything is sent;
2. uploads the rules over SFTP into a private ``mktemp -d`` directory on the host (`upload`);
3. runs ``fwsafe apply --detach --json`` there (`arm`): the host's guard is armed before
   anything changes and reverts by itself at the deadline unless confirmed; once the result
   is in, the connection that ran it is closed;
4. opens NEW connections to the host - a TCP connect, then a full SSH login with a new
   paramiko client and transport, never the first one - and runs ``fwsafe confirm ID`` only
   over such a login, retrying (short per-attempt timeouts) until shortly before the
   deadline (`confirm`). With guard-side probes, the confirmation waits until the probes have
   had the time to fail (`probe_settle_s`); an early revert by a probe is seen meanwhile;
5. if no new login gets through in time it does nothing more: the guard reverts. The
   workstation waits (up to the deadline + 120 s) for SSH to answer again, reads
   ``fwsafe status`` and raises `RevertedError` (exit 4) with the host's reason, or
   `RevertFailedError` (exit 5) when the state cannot be known (`outcome`; the host's answers
   become results and typed errors in `verdict`).

The remote result is also written to files in the upload directory, so a workstation that
lost the connection that ran the apply still learns the transaction from a later login.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fwsafe.errors import RevertedError
from fwsafe.remote import timing
from fwsafe.remote.arm import start_apply
from fwsafe.remote.confirm import NewLoginConfirmer
from fwsafe.remote.hostkeys import KnownHosts, describe_key
from fwsafe.remote.job import RemoteCommandError, RemoteJob, RemoteRequest, SSHConnectError
from fwsafe.remote.outcome import AfterDeadline
from fwsafe.remote.session import AttemptFailed, Connection, Dialer
from fwsafe.remote.timing import probe_settle_s
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
    sent), `SSHConnectError` / `RemoteCommandError` / `InvalidRulesError` (exit 3, nothing
    changed), `PendingError` (6), `RevertedError` (4: reverted, with the host's reason),
    `RevertFailedError` (5: the revert failed, or the state could not be known).
    """
    return RemoteApply(req, progress).run()


class RemoteApply:
    """The phases of `apply_remote`, in order, over one `RemoteJob`."""

    def __init__(self, req: RemoteRequest, progress: Callable[[str], None]) -> None:
        self.job = RemoteJob(req, progress)

    def run(self) -> dict[str, Any]:
        job = self.job
        contents = read_local(job)
        job.first = self.connect_first()
        try:
            self.connected(job.first)
            job.tmpdir = make_tmpdir(job)
            upload(job, contents)
            start_apply(job)
            try:
                return self.confirm_or_report()
            except KeyboardInterrupt as exc:
                if job.tx_id:
                    # The change is live and will not be confirmed from here: exit 4, as the
                    # guard reverts it (exit 3 would claim that nothing changed).
                    raise RevertedError(
                        f"interrupted: not confirmed; the guard on {job.where} reverts "
                        f"transaction {job.tx_id} at its deadline",
                        hint="to keep it, run `fwsafe confirm` there from a NEW SSH session",
                    ) from exc
                raise
        finally:
            job.close_first()

    def connect_first(self) -> Connection:
        """Read known_hosts and log in for the upload and the apply (nothing sent yet)."""
        job = self.job
        req = job.req
        known = KnownHosts(req.known_hosts)
        job.dialer = Dialer(job.target, known, identity=req.identity,
                            accept_new=req.accept_new_host_key, on_accept=job.say)
        job.say(f"connecting to {job.where} (host keys: {known.path})")
        try:
            return job.connect(timing.FIRST_CONNECT_TIMEOUT,
                               tcp_timeout=timing.FIRST_CONNECT_TIMEOUT)
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
