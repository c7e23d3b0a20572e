"""Step 2 of `fwsafe apply --host` (see `fwsafe.remote.apply`): read the local rules, make a
private ``mktemp -d`` directory on the host and upload the rules into it (SFTP, else ``cat``)
over the first connection. Nothing has changed on the host yet; every failure says so."""

from __future__ import annotations

import io

from fwsafe.core.change import read_rules_file
from fwsafe.errors import UsageError
from fwsafe.remote import timing
from fwsafe.remote.job import RemoteCommandError, RemoteJob
from fwsafe.remote.scripts import MKTEMP_SCRIPT, REMOTE_NAMES, TMPDIR_RE, UPLOAD_SCRIPT, sh
from fwsafe.remote.session import ssh_errors

__all__ = ["make_tmpdir", "read_local", "upload"]


def read_local(job: RemoteJob) -> dict[str, bytes]:
    """The local rules files' contents by layer (and their names in `job.local_paths`)."""
    contents: dict[str, bytes] = {}
    for layer, path in (("ipv4", job.req.rules), ("ipv6", job.req.rules6)):
        if path:
            contents[layer] = read_rules_file(path)
            job.local_paths[layer] = path
    if not contents:
        raise UsageError("give RULES (IPv4) and/or --rules6 RULES6")
    return contents


def make_tmpdir(job: RemoteJob) -> str:
    """A new private upload directory on the host (over the first connection)."""
    assert job.first is not None
    try:
        result = job.first.run(sh(MKTEMP_SCRIPT), timing.COMMAND_TIMEOUT)
    except ssh_errors() as exc:
        raise RemoteCommandError(
            f"cannot run commands on {job.where}: {exc}; nothing was changed") from None
    path = result.out.decode("utf-8", "replace").strip()
    if result.rc != 0 or not TMPDIR_RE.match(path):
        why = result.stderr_tail() or f"exit status {result.rc}, output {path[:80]!r}"
        raise RemoteCommandError(
            f"cannot make a private upload directory on {job.where} (mktemp -d): {why}; "
            "nothing was changed")
    return path


def upload(job: RemoteJob, contents: dict[str, bytes]) -> None:
    """Write `contents` into the upload directory, mode 0600."""
    import paramiko

    assert job.first is not None and job.tmpdir is not None
    first = job.first
    names = {f"{job.tmpdir}/{REMOTE_NAMES[layer]}": data for layer, data in contents.items()}
    how = "SFTP"
    try:
        try:
            sftp = first.client.open_sftp()
        except paramiko.SSHException:
            sftp = None
        if sftp is not None:
            try:
                sftp.get_channel().settimeout(timing.UPLOAD_TIMEOUT)
                for path, data in names.items():
                    sftp.putfo(io.BytesIO(data), path)
                    sftp.chmod(path, 0o600)
            finally:
                sftp.close()
        else:
            how = "cat (the host offers no SFTP)"
            for path, data in names.items():
                result = first.run(sh(UPLOAD_SCRIPT, path), timing.UPLOAD_TIMEOUT, stdin=data)
                if result.rc != 0:
                    raise OSError(result.stderr_tail() or f"exit status {result.rc}")
    except (OSError, EOFError, paramiko.SSHException) as exc:
        job.cleanup_over_first()
        raise RemoteCommandError(
            f"upload to {job.where} failed: {exc}; nothing was changed") from None
    size = sum(len(data) for data in contents.values())
    job.mark("uploaded_s")
    job.say(f"uploaded {', '.join(sorted(contents))} rules ({size} bytes) to "
            f"{job.where}:{job.tmpdir} via {how}")
