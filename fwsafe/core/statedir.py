"""The state directory: crash-safe files, permissions, and the one lock.

Layout (default /var/lib/fwsafe, or --state-dir, or FWSAFE_STATE_DIR)::

    lock                 flock(2) taken while a change is being prepared
    current              id of the newest transaction
    guard.sock           the pending transaction's guard listens here
    tx/<id>/record.json  the transaction record (state machine, events)
    tx/<id>/before.*     snapshot of every captured layer before the change
    tx/<id>/change.*     the new rules as given
    tx/<id>/guard.log    the guard's log
    fidelity-proven.json the tables proven to round-trip exactly (fwsafe.core.fidelity_proofs)

Directories are 0700 and files 0600. Every write goes to a temporary file in the same directory
(a new random name, created with O_EXCL|O_NOFOLLOW), is fsync'ed, renamed over the target, and
the directory is fsync'ed: after a crash a file holds either its old or its new content, never
a mix (fwsafe.ondisk.atomic_files, the one writer, which the boot and ufw files use too).

fwsafe acts as root on what it reads here (`recover` restores the snapshot it finds), so the
directory must be root's alone: a state directory that is a symlink, or that it or any existing
parent is writable by group/others or (when running as root) not owned by root, is refused
(`check_state_dir`). A world-writable parent with the sticky bit (such as /tmp) is accepted when
it is root's and the state directory itself is root's and 0700.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from fwsafe.context import RUN
from fwsafe.errors import PendingError, StateError, UnsafeStateDirError
from fwsafe.ondisk.atomic_files import TempFileError, write_file_atomically

DEFAULT_STATE_DIR = "/var/lib/fwsafe"
ENV_STATE_DIR = "FWSAFE_STATE_DIR"
DIR_MODE = 0o700
FILE_MODE = 0o600
SAFE_DIR_HINT = ("use a directory only root can write, e.g. /var/lib/fwsafe (every parent too; "
                 "a sticky world-writable parent such as /tmp is accepted when the state "
                 "directory itself is root's and 0700)")


def resolve_state_dir(explicit: str | None, configured: str | None = None) -> Path:
    """--state-dir, then FWSAFE_STATE_DIR, then the config file's value, then the default;
    made absolute at once (the guard runs in /, and the record names files by this path)."""
    chosen = explicit or os.environ.get(ENV_STATE_DIR) or configured or DEFAULT_STATE_DIR
    resolved = Path(os.path.abspath(chosen))
    RUN.state_dir = resolved
    return resolved


def _unsafe(st: os.stat_result, path: Path, as_root: bool) -> str | None:
    """Why a directory could be changed by someone other than root, or None."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"{path} is writable by group/others (mode {mode:04o})"
    if as_root and st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    return None


def check_state_dir(root: Path, *, creating: bool = False) -> None:
    """Refuse (UnsafeStateDirError, exit 2) a state directory that someone other than root could
    change: a symlink, not a directory, writable by group/others, or, when running as root, not
    owned by root; the same for every existing parent, except that a sticky world-writable
    parent owned by root (/tmp) is accepted when the state directory is root's and 0700
    (`creating`: about to be made 0700, so only group/other write access is refused yet)."""
    as_root = os.geteuid() == 0
    sticky = False
    for link in root.parents:  # a symlink on the way must be root's: its owner can re-point it
        with contextlib.suppress(OSError):
            st = os.lstat(link)
            if stat.S_ISLNK(st.st_mode) and as_root and st.st_uid != 0:
                raise UnsafeStateDirError(
                    f"state directory {root}: refused: {link} is a symlink owned by uid "
                    f"{st.st_uid}, not root", hint=SAFE_DIR_HINT)
    parent = Path(os.path.realpath(root.parent))
    for directory in (parent, *parent.parents):
        try:
            st = os.stat(directory)
        except OSError:
            continue  # not there (yet): nothing to check
        why = _unsafe(st, directory, as_root)
        if why and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            sticky = True  # /tmp: others can create entries but not rename or remove ours
            continue
        if why:
            raise UnsafeStateDirError(f"state directory {root}: refused: {why}",
                                      hint=SAFE_DIR_HINT)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return  # created 0700 by `StateDir.ensure`, which checks again
    except OSError as exc:
        raise StateError(f"cannot use state directory {root}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateDirError(f"state directory {root}: refused: it is a symbolic link",
                                  hint="give the real directory (--state-dir, FWSAFE_STATE_DIR)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateDirError(f"state directory {root}: refused: not a directory")
    why = _unsafe(st, root, as_root)
    if why is None and sticky and not creating and stat.S_IMODE(st.st_mode) & 0o077:
        why = (f"{root} is inside a world-writable directory and is not private "
               f"(mode {stat.S_IMODE(st.st_mode):04o}, needs 0700)")
    if why is None and sticky and st.st_uid not in (0, os.geteuid()):
        why = f"{root} is inside a world-writable directory and owned by uid {st.st_uid}"
    if why:
        raise UnsafeStateDirError(f"state directory {root}: refused: {why}", hint=SAFE_DIR_HINT)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably, mode 0600, owned by this process (never
    the owner of a file planted there); a symlink at `path` is replaced, never followed."""
    try:
        write_file_atomically(path, data, FILE_MODE)
    except TempFileError as exc:
        raise StateError(str(exc)) from exc


def open_private(path: Path, flags: int) -> int:
    """Open (creating it 0600) a file in the state directory without following a symlink."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700; tighten an existing one. A symlink is refused:
    its target would be tightened and used (the mode is set through an O_NOFOLLOW fd)."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafeStateDirError(f"{path}: refused: it is a symbolic link",
                                      hint=SAFE_DIR_HINT) from None
        raise
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != DIR_MODE:
            os.fchmod(fd, DIR_MODE)
    finally:
        os.close(fd)


# The state locks this process holds, by lock file: StateDir.locked is re-entrant.
_HELD: dict[str, int] = {}
_FDS: dict[str, int] = {}


class StateDir:
    """One fwsafe state directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- layout ---------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    @property
    def socket_path(self) -> Path:
        return self.root / "guard.sock"

    @property
    def tx_root(self) -> Path:
        return self.root / "tx"

    def tx_dir(self, tx_id: str) -> Path:
        return self.tx_root / tx_id

    # -- set-up -----------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the directory tree with private permissions (after checking that nobody but
        root can change it or its parents: `check_state_dir`)."""
        check_state_dir(self.root, creating=True)
        try:
            make_private_dir(self.root)
            make_private_dir(self.tx_root)
        except OSError as exc:
            raise StateError(
                f"cannot use state directory {self.root}: {exc.strerror}",
                hint="choose another with --state-dir or FWSAFE_STATE_DIR",
            ) from exc
        check_state_dir(self.root)

    def verify(self) -> None:
        """Refuse a state directory that someone other than root could change (exit 2)."""
        check_state_dir(self.root)

    def exists(self) -> bool:
        """Whether the state directory exists; one that is not safe to use is refused."""
        if not os.path.lexists(self.root):
            return False
        self.verify()
        return self.root.is_dir()

    # -- current transaction ----------------------------------------------------------------
    def current_id(self) -> str | None:
        try:
            value = (self.root / "current").read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.root / 'current'}: {exc.strerror}") from exc
        return value or None

    def set_current(self, tx_id: str) -> None:
        atomic_write(self.root / "current", (tx_id + "\n").encode())

    # -- the lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the state directory's lock; without `wait`, fail at once when it is taken.
        Re-entrant within a process: a holder that calls code which locks again (confirm ->
        history) goes on instead of waiting for itself (flock is per open file, not per
        process)."""
        key = os.path.realpath(self.lock_path)
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        self.ensure()
        fd = open_private(self.lock_path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise PendingError(
                        "another fwsafe command is preparing a change right now",
                        hint="wait for it to finish, then try again",
                    ) from exc
                raise
            _HELD[key] = 1
            _FDS[key] = fd
            try:
                yield
            finally:
                _HELD.pop(key, None)
                _FDS.pop(key, None)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Let go of the state lock this process holds (if it does) for a while, and wait to
        take it back: a long revert (the backstop's) must not keep `confirm`, `revert` or
        `status` of other commands waiting. Who goes on must re-read what may have changed."""
        key = os.path.realpath(self.lock_path)
        fd = _FDS.get(key)
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_EX)

    @contextlib.contextmanager
    def tx_locked(self, tx_id: str, *, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock of one transaction (tx/<id>/lock). The guard holds it while it moves
        the record from preparing to applying, the CLI while it marks it aborted: whichever
        comes second sees what the first wrote. Raises TimeoutError after `timeout` seconds."""
        fd = open_private(self.tx_dir(tx_id) / "lock", os.O_RDWR)
        try:
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if end is None else fcntl.LOCK_NB))
                    break
                except OSError as exc:
                    if end is None or exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() > end:
                        raise TimeoutError(f"transaction {tx_id} is locked") from exc
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def tx_claimed(self, tx_id: str) -> Iterator[None]:
        """Own transaction `tx_id` while reverting or confirming it without its guard: its lock,
        which the guard holds for its whole life, so that only one process at a time acts on
        it. Raises PendingError at once when another process holds it."""
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.tx_locked(tx_id, timeout=0))
        except TimeoutError as exc:
            raise PendingError(
                f"transaction {tx_id} is held by another fwsafe process (its guard, the "
                "backstop or a recover acting on it)",
                hint="`fwsafe status` shows it; wait for it to finish") from exc
        with stack:
            yield

    def tx_held(self, tx_id: str) -> bool:
        """Whether some process holds transaction `tx_id` (its guard, or whoever took it over)."""
        try:
            fd = os.open(self.tx_dir(tx_id) / "lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False
