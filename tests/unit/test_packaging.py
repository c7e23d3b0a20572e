"""The Debian package's files, without building it (tests/lab/test_deb.py builds and installs it):
the packaged boot unit is the one fwsafe itself would write and `apply` recognises it, the
conffile sets nothing, the manual page covers every command, the prerm's check finds open
transactions, and the versions and the license agree everywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fwsafe import __version__
from fwsafe.persistence import boothook
from fwsafe.persistence.boothook import UNIT_NAME, render_unit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
PACKAGED_UNIT = DEBIAN / "fwsafe.fwsafe-recover.service"


def _script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _directives(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# --------------------------------------------------------------------------- the boot unit


def test_the_packaged_unit_is_the_one_fwsafe_writes_for_the_system_python() -> None:
    wanted = render_unit("/usr/bin/python3", "/var/lib/fwsafe")
    assert _directives(PACKAGED_UNIT.read_text()) == _directives(wanted)


def _packaged_layout(root: Path, unit_dir: str = "/lib/systemd/system") -> Path:
    """What dpkg and deb-systemd-helper leave: the unit in /lib, the wants symlink to it."""
    unit = root / unit_dir.lstrip("/") / UNIT_NAME
    unit.parent.mkdir(parents=True)
    shutil.copyfile(PACKAGED_UNIT, unit)
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True)
    (wants / UNIT_NAME).symlink_to(f"{unit_dir}/{UNIT_NAME}")
    return wants / UNIT_NAME


@pytest.mark.parametrize("unit_dir", ["/lib/systemd/system", "/usr/lib/systemd/system"])
def test_apply_recognises_the_enabled_packaged_unit(tmp_path: Path, unit_dir: str) -> None:
    link = _packaged_layout(tmp_path, unit_dir)
    assert boothook.is_installed(tmp_path, "/var/lib/fwsafe", python="/usr/bin/python3")
    # another interpreter (a venv) or another state directory needs a unit of its own
    assert not boothook.is_installed(tmp_path, "/var/lib/fwsafe", python="/opt/fwsafe/bin/python")
    assert not boothook.is_installed(tmp_path, "/srv/fwsafe", python="/usr/bin/python3")
    link.unlink()  # disabled
    assert not boothook.is_installed(tmp_path, "/var/lib/fwsafe", python="/usr/bin/python3")


def test_a_unit_in_etc_overrides_the_packaged_one(tmp_path: Path) -> None:
    _packaged_layout(tmp_path)
    done = boothook.install(tmp_path, "/srv/fwsafe", python="/usr/bin/python3", with_zipapp=False)
    assert any("wrote" in line for line in done), done
    assert boothook.is_installed(tmp_path, "/srv/fwsafe", python="/usr/bin/python3")
    assert not boothook.is_installed(tmp_path, "/var/lib/fwsafe", python="/usr/bin/python3")
    boothook.uninstall(tmp_path, "/srv/fwsafe")
    assert (tmp_path / "lib/systemd/system" / UNIT_NAME).is_file()   # the package's stays


def test_a_changed_packaged_unit_is_not_taken_for_ours(tmp_path: Path) -> None:
    _packaged_layout(tmp_path)
    unit = tmp_path / "lib/systemd/system" / UNIT_NAME
    unit.write_text(unit.read_text().replace("TimeoutStartSec=300", "TimeoutStartSec=5"))
    assert not boothook.is_installed(tmp_path, "/var/lib/fwsafe", python="/usr/bin/python3")


# --------------------------------------------------------------------------- conffile, man page


def test_the_conffile_sets_nothing_and_names_every_key() -> None:
    gen = _script(REPO / "scripts/gen-conffile.py")
    example = (REPO / "examples/fwsafe.toml").read_text()
    text = gen.commented(example)
    assert tomllib.loads(text) == {}
    for key in tomllib.loads(example):
        if key != "hosts":
            assert re.search(rf"^# {key} = ", text, re.M), key
    assert "# [hosts.web1]" in text


def test_the_manual_page_covers_every_command() -> None:
    from fwsafe.cli import cli

    gen = _script(REPO / "scripts/gen-manpage.py")
    page = gen.render(cli, __version__)
    assert page.startswith(".TH FWSAFE 8 ")
    for name, command in cli.commands.items():
        if not command.hidden:
            assert f'.SS "fwsafe {name} ' in page, name
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "FILES"):
        assert f".SH {section}\n" in page
    assert "\\fB\\-h, \\-\\-help\\fR" in page
    assert not [ln for ln in page.splitlines() if ln.startswith("'")]
    if shutil.which("groff"):
        checked = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8"], input=page,
                                 capture_output=True, text=True, timeout=60, check=False)
        assert checked.returncode == 0 and checked.stderr == "", checked.stderr


# --------------------------------------------------------------------------- the prerm's check


def _transaction(state_dir: Path, tx_id: str, state: str) -> None:
    tx = state_dir / "tx" / tx_id
    tx.mkdir(parents=True)
    (tx / "record.json").write_text(json.dumps({"format": 1, "id": tx_id, "state": state,
                                                "events": [{"state": "confirmed"}]}))
    (state_dir / "current").write_text(tx_id + "\n")


def test_the_prerm_check_finds_open_transactions(tmp_path: Path) -> None:
    check = DEBIAN / "open-transactions.py"
    config = tmp_path / "fwsafe.toml"
    config.write_text('# state_dir = "/nowhere"\n')
    default, custom = tmp_path / "default", tmp_path / "custom"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(check), str(config), str(default)],
                              capture_output=True, text=True, timeout=60, check=False)

    assert run().stdout == "" and run().returncode == 0   # no state directory at all
    _transaction(default, "20261130T010101Z-aaaa", "confirmed")
    assert run().stdout == ""
    for state in ("applying", "pending", "reverting"):
        (default / "tx/20261130T010101Z-aaaa/record.json").write_text(json.dumps({"state": state}))
        assert run().stdout == f"20261130T010101Z-aaaa {state} {default}\n"
    for state in ("reverted", "aborted", "rejected", "revert-failed"):
        (default / "tx/20261130T010101Z-aaaa/record.json").write_text(json.dumps({"state": state}))
        assert run().stdout == "", state
    config.write_text(f'timeout = 60\nstate_dir = "{custom}"   # the admin\'s\n')
    _transaction(custom, "20261130T020202Z-bbbb", "pending")
    assert run().stdout == f"20261130T020202Z-bbbb pending {custom}\n"
    (custom / "tx/20261130T020202Z-bbbb/record.json").write_text("{damaged")
    damaged = run()
    assert damaged.returncode == 2 and "record" in damaged.stderr, damaged


# --------------------------------------------------------------------------- metadata


def test_versions_agree() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"fwsafe \(([^)]+)\) ", changelog)
    assert match, changelog
    assert project["version"] == __version__ == match.group(1).split("-")[0]


def test_the_license_is_a_file_both_setuptools_find() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # No `license` key: a table is deprecated by current setuptools, a string (SPDX) is an
    # error before setuptools 77 (Debian 12 has 66). LICENSE matches the default patterns.
    assert "license" not in project and "license-files" not in project
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "fwsafe contributors" in text
    assert "License: Expat" in (DEBIAN / "copyright").read_text()


def test_the_package_depends_on_the_distributions_libraries_unversioned() -> None:
    control = (DEBIAN / "control").read_text()
    depends = re.search(r"^Depends:(.*?)^\S", control.split("Package: fwsafe")[1], re.S | re.M)
    assert depends, control
    entries = [e.strip() for e in depends.group(1).replace("\n", " ").split(",") if e.strip()]
    for needed in ("python3-click", "python3-paramiko", "iptables | nftables"):
        assert needed in entries, entries
    assert os.access(DEBIAN / "rules", os.X_OK)
