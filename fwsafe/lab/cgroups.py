"""cgroup v1 helpers that put processes under memory or process-count pressure:
:class:`MemoryCgroup` (a hard memory limit, the cgroup's OOM killer) and :class:`PidsCgroup`
(a cap on the number of tasks). Each is a child of the cgroup this process is in, removed again
on :meth:`close` after its processes were moved back to the parent.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from fwsafe.lab.procs import LabError

__all__ = ["CGROUP_ROOT", "MemoryCgroup", "PidsCgroup", "remove_cgroup_tree"]

CGROUP_ROOT = Path("/sys/fs/cgroup")

_CGROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# Shell program for cgroup wrapping: "$0" is the cgroup.procs file, "$@" the command.
_CGROUP_EXEC_SCRIPT = 'echo $$ > "$0" && exec "$@"'


def remove_cgroup_tree(top: Path, *, while_busy: Callable[[], object],
                       timeout: float = 10.0) -> None:
    """Remove cgroup ``top`` and the cgroups below it, deepest first (a no-op if it is gone).

    One still busy (a process is left in it) is tried again, after ``while_busy()`` (which moves
    or kills what is left), until ``timeout`` seconds have passed; then :class:`LabError`.
    """
    end = time.monotonic() + timeout
    for dirpath, _, _ in os.walk(top, topdown=False):  # children first
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > end:
                    raise LabError(f"cannot remove cgroup {dirpath}: {exc}") from exc
                while_busy()
                time.sleep(0.05)


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in the v1 hierarchy of ``controller`` ("/" if unknown)."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return "/"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2] or "/"
    return "/"


class _CgroupV1:
    """A child cgroup in one cgroup v1 controller hierarchy.

    It is created below the cgroup this process already belongs to (the hierarchy root when
    that is "/"), so processes put into it stay inside their enclosing cgroup's accounting.
    """

    controller: ClassVar[str] = ""

    def __init__(self, name: str, *, parent: str | None = None) -> None:
        if not _CGROUP_NAME_RE.match(name):
            raise LabError(f"invalid cgroup name {name!r}")
        root = CGROUP_ROOT / self.controller
        if not (root / "cgroup.procs").exists():
            raise LabError(f"cgroup v1 {self.controller} controller not mounted at {root}")
        rel = _own_cgroup(self.controller) if parent is None else parent
        self.name = name
        self.parent_path: Path = root / rel.strip("/") if rel.strip("/") else root
        self.path: Path = self.parent_path / name
        self._closed = False
        if self.path.exists():  # stale, from a crashed run
            self._evacuate()
            self._rmdir()
        self.path.mkdir()

    def _write(self, fname: str, value: str) -> None:
        try:
            (self.path / fname).write_text(value)
        except OSError as exc:
            raise LabError(f"cannot write {value!r} to {self.path / fname}: {exc}") from exc

    def _read(self, fname: str) -> str:
        return (self.path / fname).read_text()

    def pids(self) -> list[int]:
        """PIDs currently in this cgroup."""
        try:
            return [int(x) for x in self._read("cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        if self._closed:
            raise LabError(f"cgroup {self.path} is closed")
        self._write("cgroup.procs", str(pid))

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """argv that joins this cgroup and then execs ``argv`` (same PID): no race at start."""
        return ["sh", "-c", _CGROUP_EXEC_SCRIPT, str(self.path / "cgroup.procs"), *argv]

    def _evacuate(self, timeout: float = 5.0) -> None:
        """Move every process back to the parent cgroup (retrying while they fork)."""
        deadline = time.monotonic() + timeout
        target = self.parent_path / "cgroup.procs"
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    target.write_text(str(pid))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise LabError(f"cannot move pid {pid} out of {self.path}: {exc}") from exc
            if time.monotonic() > deadline:
                raise LabError(f"processes keep appearing in {self.path}: {pids}")
            time.sleep(0.02)

    def _rmdir(self, timeout: float = 5.0) -> None:
        remove_cgroup_tree(self.path, while_busy=self._evacuate, timeout=timeout)

    def close(self) -> None:
        """Move remaining processes back to the parent cgroup and remove this one. Idempotent."""
        if self._closed:
            return
        self._evacuate()
        self._rmdir()
        self._closed = True

    def __enter__(self) -> _CgroupV1:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MemoryCgroup(_CgroupV1):
    """cgroup v1 memory controller group with a hard limit (``memory.limit_in_bytes``).

    A process that allocates past the limit is killed by the cgroup's OOM killer (SIGKILL).
    Swap accounting (``memory.memsw.*``) is left alone: on a machine with swap, pages may be
    swapped out instead.
    """

    controller: ClassVar[str] = "memory"

    def __init__(self, name: str, limit_bytes: int, *, parent: str | None = None) -> None:
        if limit_bytes <= 0:
            raise LabError(f"memory limit must be positive, got {limit_bytes}")
        super().__init__(name, parent=parent)
        try:
            self._write("memory.limit_in_bytes", str(limit_bytes))
        except BaseException:
            self.close()
            raise
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryCgroup:
        return self

    def oom_kills(self) -> int:
        """Number of OOM kills in this cgroup.

        Read from ``oom_kill N`` in ``memory.oom_control`` (kernels >= 4.13); on older kernels a
        best effort: 1 if the limit was ever hit (``memory.failcnt`` > 0) and the group is or was
        under OOM, else 0.
        """
        ctl: dict[str, int] = {}
        for line in self._read("memory.oom_control").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                ctl[k] = int(v)
        if "oom_kill" in ctl:
            return ctl["oom_kill"]
        failcnt = int(self._read("memory.failcnt").strip() or "0")
        return 1 if failcnt > 0 and ctl.get("under_oom", 0) else 0

    def usage_bytes(self) -> int:
        """Current memory usage of the group."""
        return int(self._read("memory.usage_in_bytes"))

    def max_usage_bytes(self) -> int:
        """Peak memory usage of the group."""
        return int(self._read("memory.max_usage_in_bytes"))


class PidsCgroup(_CgroupV1):
    """cgroup v1 pids controller group: caps how many tasks may exist (fork fails past it)."""

    controller: ClassVar[str] = "pids"

    def __init__(self, name: str, max_pids: int | None, *, parent: str | None = None) -> None:
        super().__init__(name, parent=parent)
        try:
            self.set_max(max_pids)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PidsCgroup:
        return self

    def set_max(self, max_pids: int | None) -> None:
        """Set ``pids.max``; None means unlimited ("max")."""
        if max_pids is not None and max_pids < 0:
            raise LabError(f"max_pids must be >= 0, got {max_pids}")
        self._write("pids.max", "max" if max_pids is None else str(max_pids))

    def current(self) -> int:
        """Number of tasks now in the group (``pids.current``)."""
        return int(self._read("pids.current"))
