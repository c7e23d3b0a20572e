"""`fwsafe install-boot-hook --root`: the unit, its wants symlink, the zipapp; and uninstall."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fwsafe.persistence.boothook import UNIT_NAME, render_unit


def fwsafe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fwsafe", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_example_unit_matches_what_is_installed() -> None:
    example = Path(__file__).parents[2] / "examples" / UNIT_NAME
    assert example.read_text() == render_unit("/usr/bin/python3", "/var/lib/fwsafe")
    text = example.read_text()
    for line in ("DefaultDependencies=no", "Type=oneshot", "Wants=network-pre.target",
                 "Before=network-pre.target netfilter-persistent.service ufw.service "
                 "nftables.service", "After=local-fs.target"):
        assert line in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_example_unit_verifies() -> None:
    example = Path(__file__).parents[2] / "examples" / UNIT_NAME
    result = subprocess.run(["systemd-analyze", "verify", str(example)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_install_and_uninstall_under_a_root(tmp_path: Path) -> None:
    result = fwsafe("install-boot-hook", "--root", str(tmp_path), "--state-dir", "/var/lib/fwsafe")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "etc/systemd/system" / UNIT_NAME
    link = tmp_path / "etc/systemd/system/sysinit.target.wants" / UNIT_NAME
    assert (f"ExecStart={sys.executable} -m fwsafe recover --boot --state-dir /var/lib/fwsafe"
            in unit.read_text())
    assert os.readlink(link) == f"/etc/systemd/system/{UNIT_NAME}"
    pyz = tmp_path / "var/lib/fwsafe/fwsafe.pyz"
    assert pyz.is_file() and (pyz.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "var/lib/fwsafe").stat().st_mode & 0o777 == 0o700
    assert "wrote" in result.stdout and "enabled" in result.stdout and "fwsafe.pyz" in result.stdout
    again = fwsafe("install-boot-hook", "--root", str(tmp_path), "--state-dir", "/var/lib/fwsafe")
    assert "up to date" in again.stdout and "enabled already" in again.stdout
    removed = fwsafe("install-boot-hook", "--root", str(tmp_path), "--uninstall",
                     "--state-dir", "/var/lib/fwsafe")
    assert removed.returncode == 0
    assert not os.path.lexists(link) and not unit.exists() and pyz.exists()
    assert "nothing to remove" in fwsafe("install-boot-hook", "--root", str(tmp_path),
                                         "--uninstall").stdout


def test_rescue_help_through_the_cli() -> None:
    result = fwsafe("rescue", "--help")
    assert result.returncode == 0 and "--disable-firewall" in result.stdout
    assert fwsafe("rescue").returncode == 2   # --root is required


def test_install_boot_hook_json(tmp_path: Path) -> None:
    import json

    result = fwsafe("install-boot-hook", "--root", str(tmp_path), "--state-dir", "/var/lib/fwsafe",
                    "--no-zipapp", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] and data["installed"] and data["done"]
    assert (tmp_path / "etc/systemd/system/fwsafe-recover.service").is_file()
