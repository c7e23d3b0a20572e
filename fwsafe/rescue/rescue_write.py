"""The rescue's writing: a plan carried out file by file, atomically, each replaced file kept
as NAME.fwsafe-bak. Standard library only, bundled in the zipapp (fwsafe.rescue.tool tells
the whole story).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fwsafe.errors import ExitCode
from fwsafe.ondisk.atomic_files import BACKUP_SUFFIX, local_path, write_file_atomically
from fwsafe.ondisk.ufw_files import APPLICATIONS_DIR
from fwsafe.rescue.rescue_plan import FileChange, Plan, RescueError


def backup_path(change: FileChange, root: Path) -> Path:
    """NAME.fwsafe-bak next to the file, or .fwsafe-bak.N when that exists already. Profiles in
    applications.d go to a sibling directory: ufw reads every file in applications.d."""
    if change.server_path.startswith(APPLICATIONS_DIR + "/"):
        base = local_path(root, APPLICATIONS_DIR + BACKUP_SUFFIX) / change.local.name
    else:
        base = change.local.with_name(change.local.name + BACKUP_SUFFIX)
    candidate, n = base, 1
    while os.path.lexists(candidate):
        candidate = base.with_name(f"{base.name}.{n}")
        n += 1
    return candidate


def write_plan(plan: Plan, root: Path) -> list[FileChange]:
    """Carry out the plan; return the changes made. Stops at the first error (RescueError
    listing what was already written)."""
    done: list[FileChange] = []
    for change in plan.changes:
        try:
            _write_one(change, root)
        except OSError as exc:
            written = ", ".join(c.server_path for c in done) or "nothing"
            raise RescueError(
                f"cannot write {change.local}: {exc.strerror or exc}; already written: {written}",
                code=int(ExitCode.REVERT_FAILED),
                hint="the backups (*.fwsafe-bak) hold the files as they were") from exc
        done.append(change)
    return done


def _write_one(change: FileChange, root: Path) -> None:
    if os.path.lexists(change.local):
        change.backup = backup_path(change, root)
        change.backup.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = os.lstat(change.local)
        if change.new is None or not stat.S_ISREG(st.st_mode):
            os.rename(change.local, change.backup)
        else:
            write_file_atomically(change.backup, change.old or b"", stat.S_IMODE(st.st_mode),
                                  owner=(st.st_uid, st.st_gid))
    if change.new is None:
        return
    if not change.local.parent.is_dir():
        change.local.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file_atomically(change.local, change.new, change.mode,
                          default_mode=change.default_mode, keep_owner=True)


