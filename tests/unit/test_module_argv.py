"""fwsafe's own `python -m` (the shim, the simulation) never imports from the current
directory: root typing `ufw` in /tmp must not run a planted `fwsafe/` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fwsafe.persistence.command_shims import script_text
from fwsafe.runner import module_argv


def planted(tmp_path: Path) -> Path:
    pkg = tmp_path / "fwsafe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("print('HIJACKED'); raise SystemExit(42)\n")
    (pkg / "__main__.py").write_text("print('HIJACKED'); raise SystemExit(42)\n")
    return tmp_path


def test_plain_python_m_would_be_hijacked(tmp_path: Path) -> None:
    """The danger this guards against (so the test below can fail)."""
    out = subprocess.run([sys.executable, "-m", "fwsafe", "--version"], cwd=planted(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert "HIJACKED" in out.stdout


def test_module_argv_ignores_the_current_directory(tmp_path: Path) -> None:
    out = subprocess.run(module_argv("fwsafe", "--version"), cwd=planted(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert "HIJACKED" not in out.stdout and out.returncode == 0, out
    assert "fwsafe" in out.stdout.lower()


def test_the_shim_script_ignores_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "cwd").mkdir()
    script = tmp_path / "ufw-shim"
    script.write_text(script_text("ufw", "/nonexistent/ufw", sys.executable))
    script.chmod(0o755)
    out = subprocess.run([str(script), "status"], cwd=planted(tmp_path / "cwd"),
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "FWSAFE_SHIM": "guard"})
    assert "HIJACKED" not in out.stdout + out.stderr and out.returncode != 42, out
    # there is no real ufw behind it here: said as such, not as a bug of fwsafe
    assert out.returncode == 3 and "cannot run the real ufw" in out.stderr, out
    assert "unexpected error" not in out.stderr and "traceback" not in out.stderr, out
