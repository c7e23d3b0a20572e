"""ufw: its files, and commands run under the guard.

ufw keeps its configuration in files (/etc/ufw/*.rules, ufw.conf, sysctl.conf,
applications.d/, /etc/default/ufw) and applies it through iptables. The "ufw" layer holds the
files, one unit per file; the runtime rules are in the iptables layers (ufw's chains). A revert
therefore restores both, so that neither `ufw reload` nor a reboot brings a bad rule back.

ufw commands themselves run under the guard in command mode (`fwsafe apply -- ufw ...`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from fwsafe.backends.base import (
    FILE_SET,
    FILES,
    LOADS_IPTABLES,
    MERGE,
    ROLLBACK,
    SANDBOX_FILES,
    Layer,
    RetryLog,
)
from fwsafe.errors import InvalidRulesError
from fwsafe.ondisk.boot import uses_ufw
from fwsafe.ondisk.ufw_files import (
    capture_ufw_files,
    load_ufw_files,
    restore_ufw_files,
    ufw_files_text,
)

PROMPTING = frozenset({"enable", "reset", "delete"})
FORCE_NOTE = ("fwsafe answered ufw's 'may disrupt existing ssh connections' prompt with "
              "--force: the guard is the safety net")


class UfwLayer(Layer):
    name = "ufw"
    label = "ufw files"
    facts = frozenset({FILES, ROLLBACK, FILE_SET, SANDBOX_FILES, LOADS_IPTABLES})

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def available(self) -> bool:
        return (self.root / "etc/ufw").is_dir() or (self.root / "etc/default/ufw").exists()

    def capture(self) -> bytes:
        return capture_ufw_files(self.root)

    def capture_under(self, root: Path) -> bytes:
        return capture_ufw_files(root)

    def kept_under(self, root: Path) -> bool:
        return uses_ufw(root)   # /etc/ufw there: ufw loads its files at that system's boot

    def units(self, data: bytes) -> dict[str, str]:
        return {path: f"mode {mode:o} sha256 {hashlib.sha256(content).hexdigest()}"
                for path, (mode, content) in load_ufw_files(data).items()}

    def unit_texts(self, data: bytes) -> dict[str, str]:
        return ufw_files_text(data)

    def validate(self, change: bytes, source: str) -> None:
        try:
            load_ufw_files(change)
        except ValueError as exc:
            raise InvalidRulesError(f"{source}: {exc}", path=source) from exc

    def apply(self, change: bytes, source: str) -> None:
        """Put ufw's files as a whole into the state of a snapshot (a rollback)."""
        restore_ufw_files(change, self.root)

    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        """Files are put back whole from the snapshot (ufw rewrites them whole, too)."""
        old = self.units(before)
        stale = [u for u in units if self.units(self.capture()).get(u) != old.get(u)]
        if stale:
            restore_ufw_files(before, self.root, stale)
        now = self.units(self.capture())
        return [f"{self.label} {u}" for u in units if now.get(u) != old.get(u)]


def is_ufw(argv: Sequence[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "ufw"


def prepare_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """ufw's own prompts cannot be answered under the guard: add --force where ufw would ask.
    Returns the command to run and notes to show the user."""
    args = list(argv)
    if is_ufw(args) and "--force" not in args and any(a in PROMPTING for a in args[1:]):
        return [args[0], "--force", *args[1:]], [FORCE_NOTE]
    return args, []
