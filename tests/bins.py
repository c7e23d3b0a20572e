"""The programs the tests run: always this interpreter's own (the repo's venv), never whatever
else PATH might find. A `fwsafe` installed outside the repo once hid 77 failing tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
FWSAFE = str(VENV_BIN / "fwsafe")


def put_venv_first_on_path() -> None:
    """Make the venv's bin directory win for every child (namespaced shells, sshd sessions)."""
    rest = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{rest}"
