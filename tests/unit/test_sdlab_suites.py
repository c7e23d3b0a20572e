"""The systemd lab's second generation: the apt sources a trixie root fs is built from are the
host's Debian sources with the suite names replaced; third-party sources stay out; and the
tests that need systemd are collected once per generation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import systemdlab

DEBIAN = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
LEGACY = ("deb http://deb.debian.org/debian bookworm main\n"
          "deb http://security.debian.org/debian-security bookworm-security/updates main\n")
THIRD_PARTY = "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    files = []
    for name, text in (("debian.sources", DEBIAN), ("legacy.list", LEGACY),
                       ("google.list", THIRD_PARTY)):
        (tmp_path / name).write_text(text)
        files.append(tmp_path / name)
    monkeypatch.setattr(systemdlab, "_host_sources", lambda: files)
    monkeypatch.setattr(systemdlab, "host_suite", lambda: "bookworm")
    return files


def test_the_hosts_suite_uses_the_hosts_sources(host: list[Path], tmp_path: Path) -> None:
    assert systemdlab._suite_sources("bookworm", tmp_path / "out") == host
    assert systemdlab.rootfs_key("bookworm") == systemdlab.rootfs_key()
    assert not systemdlab.rootfs_key("bookworm").startswith("bookworm")


def test_trixie_gets_the_debian_sources_renamed(host: list[Path], tmp_path: Path) -> None:
    made = systemdlab._suite_sources("trixie", tmp_path / "out")
    assert [p.name for p in made] == ["trixie-debian.sources", "trixie-legacy.list"]
    text = made[0].read_text()
    assert "Suites: trixie trixie-updates\n" in text
    assert "Suites: trixie-security\n" in text
    assert "bookworm" not in text
    assert "debian-archive-keyring.gpg" in text
    assert made[1].read_text() == LEGACY.replace("bookworm", "trixie")
    assert systemdlab.rootfs_key("trixie").startswith("trixie-")
    assert systemdlab.rootfs_key("trixie") != systemdlab.rootfs_key("bookworm")


def test_no_debian_source_is_an_error(host: list[Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(systemdlab, "_host_sources", lambda: host[2:])
    with pytest.raises(systemdlab.SystemdLabError, match="no Debian apt source"):
        systemdlab._suite_sources("trixie", tmp_path / "out")


# The lab files that boot the firewalld variant of the systemd lab (`Image.build(extra=...)`
# with firewalld, or test_firewalld.firewalld_outcomes): each runs on both generations
# (firewalld 1.3 on bookworm, 2.x on trixie). Docker on trixie is issue 24's other part:
# tests/lab/test_firewalld_docker.py is held to it once its cases run there.
FIREWALLD_EXEMPT = frozenset({"test_firewalld_docker.py"})


def firewalld_lab_files() -> list[str]:
    lab = systemdlab.REPO / "tests" / "lab"
    return sorted(p.name for p in lab.glob("test_*.py")
                  if re.search(r"extra=\(?[^)\n]*[\"']firewalld[\"']|extra=FIREWALLD\b"
                               r"|\bfirewalld_outcomes\(", p.read_text())
                  and p.name not in FIREWALLD_EXEMPT)


FIREWALLD_FILES = tuple(firewalld_lab_files())


def test_the_firewalld_lab_files_are_found() -> None:
    assert {"test_firewalld.py", "test_firewalld_unguarded.py"} <= set(FIREWALLD_FILES)


def test_every_systemd_test_is_collected_on_both_generations() -> None:
    """Each test of the systemd lab's own files and of the firewalld lab files runs on bookworm
    and on trixie, and anywhere a test runs on bookworm through the generation fixtures it has
    its trixie twin."""
    lab = systemdlab.REPO / "tests" / "lab"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only",
         str(lab)], capture_output=True, text=True, timeout=120, cwd=systemdlab.REPO,
        check=False)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert ids, collected.stdout + collected.stderr
    generations = ("bookworm", systemdlab.TRIXIE)
    for name in ("test_systemd_lab.py", "test_systemd_guard.py", *FIREWALLD_FILES):
        mine = [i for i in ids if f"/{name}::" in i]
        assert mine, name
        assert all(re.search(r"\[(bookworm|trixie)\b", i) for i in mine), mine
    for test in ids:
        if "[bookworm" in test:
            assert test.replace("[bookworm", f"[{systemdlab.TRIXIE}") in ids, test
    for generation in generations:
        assert any(f"[{generation}" in i for i in ids), generation
