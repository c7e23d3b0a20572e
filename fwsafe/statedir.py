"""The state directory: crash-safe files, permissions, and the one lock.

Layout (default /var/lib/fwsafe, or --state-dir, or FWSAFE_STATE_DIR)::

    lock                 flock(2) taken while a change is being prepared
    current              id of the newest transaction
    guard.sock           the pending transaction's guard listens here
    tx/<id>/record.json  the transaction record (state machine, events)
    tx/<id>/before.*     snapshot of every captured layer before the change
    tx/<id>/change.*     the new rules as given
    tx/<id>/guard.log    the guard's log

Directories are 0700 and files 0600. Every write goes to a temporary file in the same directory,
is fsync'ed, renamed over the target, and the directory is fsync'ed: after a crash a file holds
either its old or its new content, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fwsafe.errors import PendingError, StateError

DEFAULT_STATE_DIR = "/var/lib/fwsafe"
ENV_STATE_DIR = "FWSAFE_STATE_DIR"
DIR_MODE = 0o700
FILE_MODE = 0o600


def resolve_state_dir(explicit: str | None, configured: str | None = None) -> Path:
    """--state-dir, then FWSAFE_STATE_DIR, then the config file's value, then the default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env)
    return Path(configured or DEFAULT_STATE_DIR)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably, mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) as 0700; tighten an existing one."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    if (path.stat().st_mode & 0o777) != DIR_MODE:
        os.chmod(path, DIR_MODE)


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
        """Create the directory tree with private permissions."""
        try:
            make_private_dir(self.root)
            make_private_dir(self.tx_root)
        except OSError as exc:
            raise StateError(
                f"cannot use state directory {self.root}: {exc.strerror}",
                hint="choose another with --state-dir or FWSAFE_STATE_DIR",
            ) from exc

    def exists(self) -> bool:
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
        """Hold the state directory's lock; without `wait`, fail at once when it is taken."""
        self.ensure()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
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
            yield
        finally:
            os.close(fd)
