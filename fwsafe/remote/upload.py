"""Step 2 of `fwsafe apply --host` (see `fwsafe.remote.remote_apply`): read the local rules, make a
private ``mktemp -d`` directory on the host and upload the rules into it (SFTP, else ``cat``)
over the first connection, every file 0600 from its creation. Nothing has changed on the host
yet; every failure says so, and the whole upload runs under one overall limit
(`timing.Link.upload`)."""

from __future__ import annotations

from fwsafe.core.change import read_rules_file
from fwsafe.errors import UsageError
from fwsafe.remote.job import RemoteCommandError, RemoteJob
from fwsafe.remote.scripts import MKTEMP_SCRIPT, REMOTE_NAMES, TMPDIR_RE, UPLOAD_SCRIPT, sh
from fwsafe.remote.session import ssh_errors

__all__ = ["make_tmpdir", "read_local", "upload"]


def read_local(job: RemoteJob) -> dict[str, bytes]:
    """The local rules files' contents by layer (and their names in `job.local_paths`)."""
    contents: dict[str, bytes] = {}
    notes: list[str] = []
    for layer, path in (("ipv4", job.req.rules), ("ipv6", job.req.rules6)):
        if path:
            contents[layer] = read_rules_file(path, notes=notes)
            job.local_paths[layer] = path
    for note in notes:
        job.say(note)
    if not contents:
        raise UsageError("give RULES (IPv4) and/or --rules6 RULES6")
    return contents


def make_tmpdir(job: RemoteJob) -> str:
    """A new private upload directory on the host (over the first connection)."""
    assert job.first is not None
    try:
        result = job.first.run(sh(MKTEMP_SCRIPT), job.link.query())
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
    """Write `contents` into the upload directory, each file 0600 before any byte is in it."""
    # paramiko takes long to import: loaded only when an SSH connection is made
    import paramiko

    assert job.first is not None and job.tmpdir is not None
    first = job.first
    names = {f"{job.tmpdir}/{REMOTE_NAMES[layer]}": data for layer, data in contents.items()}
    size = sum(len(data) for data in contents.values())
    limit = job.link.upload(size)
    how = "SFTP"
    try:
        with first.bounded(limit, "the upload"):
            try:
                sftp = first.client.open_sftp()
            except paramiko.SSHException:
                sftp = None
            if sftp is not None:
                try:
                    for path, data in names.items():
                        with sftp.open(path, "wb") as handle:
                            handle.chmod(0o600)  # in the 0700 directory, and before the data
                            handle.set_pipelined(True)
                            handle.write(data)
                finally:
                    sftp.close()
        if sftp is None:
            how = "cat (the host offers no SFTP)"
            for path, data in names.items():
                result = first.run(sh(UPLOAD_SCRIPT, path), limit, stdin=data)
                if result.rc != 0:
                    raise OSError(result.stderr_tail() or f"exit status {result.rc}")
    except (OSError, EOFError, paramiko.SSHException) as exc:
        job.cleanup_over_first(job.link.still_there())
        raise RemoteCommandError(
            f"upload to {job.where} failed: {exc}; nothing was changed") from None
    job.mark("uploaded_s")
    job.say(f"uploaded {', '.join(sorted(contents))} rules ({size} bytes) to "
            f"{job.where}:{job.tmpdir} via {how}")
