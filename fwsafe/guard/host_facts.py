"""What the guard asks of its host: whether systemd is shutting the machine down (a SIGTERM
then is a shutdown, not a revert asked for), its shield from the OOM killer, and that the C
library gives freed memory back.

Imported by the guard process: it keeps its imports small.
"""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from fwsafe.guard.spawn import systemd_is_init

OOM_SHIELD = -1000
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
GIVE_BACK_FROM = 128 * 1024                   # glibc's own starting value for both
KEEPS_FREED = ("the C library keeps what the guard frees (no glibc mallopt): it may wait with "
               "more memory than it needs")


SHUTDOWN_TARGETS = ("shutdown.target", "reboot.target", "poweroff.target", "halt.target",
                    "kexec.target", "final.target")


def _systemctl(*args: str) -> str:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10,
                              check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def system_stopping() -> bool:
    """True while systemd is shutting the machine down (or rebooting it): the manager says
    `stopping`, or a shutdown target is queued or starting."""
    if not systemd_is_init():
        return False
    if _systemctl("is-system-running").strip() == "stopping":
        return True
    jobs = _systemctl("list-jobs", "--no-legend", "--no-pager")
    return any(target in jobs for target in SHUTDOWN_TARGETS)


def set_oom_shield(value: int = OOM_SHIELD) -> tuple[bool, str | None]:
    """Lower our oom_score_adj; children inherit it. Returns (shielded, why not)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(value))
    except OSError as exc:
        return False, f"cannot set oom_score_adj to {value}: {exc.strerror} (needs CAP_SYS_RESOURCE)"
    try:
        current = int(Path("/proc/self/oom_score_adj").read_text().strip())
    except (OSError, ValueError) as exc:
        return False, f"cannot read oom_score_adj back: {exc}"
    if current != value:
        return False, f"oom_score_adj is {current}, not {value}"
    return True, None




def give_back_freed_memory() -> bool:
    """Make glibc's malloc map every block from GIVE_BACK_FROM up on its own (unmapped, so
    given back, when freed) and give back the heap's free top from that size up, for good.
    By default glibc raises both thresholds each time a large mapped block is freed (up to
    32 MiB), so a guard that has read a 12 MB ruleset once keeps the memory of every later
    text it reads and frees in its heap: at 50,000 rules that was a third of its RSS while
    it waits (docs/performance.md). False where the C library has no mallopt (nothing is
    changed; musl's is a no-op)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, GIVE_BACK_FROM)) and bool(
        mallopt(M_TRIM_THRESHOLD, GIVE_BACK_FROM))
