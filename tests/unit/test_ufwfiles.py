"""ufw's files as one layer: capture, restore, refusal of foreign paths, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fwsafe.ondisk.atomic_files import write_file_atomically
from fwsafe.ondisk.ufw_files import (
    UfwFilesError,
    capture_ufw_files,
    dump_ufw_files,
    is_ufw_path,
    load_ufw_files,
    restore_ufw_files,
    ufw_paths,
)


def make_ufw(root: Path) -> None:
    (root / "etc/ufw/applications.d").mkdir(parents=True)
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/ufw/user.rules").write_text("*filter\n-A ufw-user-input -p tcp --dport 22 -j ACCEPT\n")
    (root / "etc/ufw/user.rules").chmod(0o640)
    (root / "etc/ufw/before.rules").write_text("# before\n")
    (root / "etc/ufw/ufw.conf").write_text("ENABLED=yes\nLOGLEVEL=low\n")
    (root / "etc/ufw/sysctl.conf").write_text("net/ipv4/tcp_syncookies=1\n")
    (root / "etc/ufw/before.init").write_text("#!/bin/sh\n")        # not covered
    (root / "etc/ufw/applications.d/openssh-server").write_text("[OpenSSH]\nports=22/tcp\n")
    (root / "etc/default/ufw").write_text('IPV6=yes\nDEFAULT_INPUT_POLICY="DROP"\n')
    os.symlink("/etc/passwd", root / "etc/ufw/link.rules")            # symlinks: left alone


def test_capture_covers_exactly_ufws_files(tmp_path: Path) -> None:
    make_ufw(tmp_path)
    assert ufw_paths(tmp_path) == [
        "/etc/default/ufw", "/etc/ufw/applications.d/openssh-server", "/etc/ufw/before.rules",
        "/etc/ufw/sysctl.conf", "/etc/ufw/ufw.conf", "/etc/ufw/user.rules"]
    data = json.loads(capture_ufw_files(tmp_path))
    assert data["files"]["/etc/ufw/user.rules"]["mode"] == 0o640 == 416
    files = load_ufw_files(capture_ufw_files(tmp_path))
    assert files["/etc/ufw/ufw.conf"] == (0o644, b"ENABLED=yes\nLOGLEVEL=low\n")
    assert capture_ufw_files(tmp_path) == capture_ufw_files(tmp_path)  # deterministic


def test_no_ufw_gives_an_empty_layer(tmp_path: Path) -> None:
    assert load_ufw_files(capture_ufw_files(tmp_path)) == {}


def test_restore_round_trip_removes_new_files_and_keeps_others(tmp_path: Path) -> None:
    make_ufw(tmp_path)
    snapshot = capture_ufw_files(tmp_path)
    (tmp_path / "etc/ufw/user.rules").write_text("*filter\n-A ufw-user-input -p tcp --dport 22 -j DROP\n")
    (tmp_path / "etc/ufw/user.rules").chmod(0o600)
    (tmp_path / "etc/ufw/applications.d/evil").write_text("[Evil]\nports=1/tcp\n")
    (tmp_path / "etc/ufw/ufw.conf").unlink()
    (tmp_path / "etc/ufw/after.init").write_text("not ours\n")
    restore_ufw_files(snapshot, tmp_path)
    assert capture_ufw_files(tmp_path) == snapshot
    assert stat.S_IMODE((tmp_path / "etc/ufw/user.rules").stat().st_mode) == 0o640
    assert not (tmp_path / "etc/ufw/applications.d/evil").exists()
    assert (tmp_path / "etc/ufw/after.init").read_text() == "not ours\n"  # not covered
    assert os.path.islink(tmp_path / "etc/ufw/link.rules")
    assert not [p for p in (tmp_path / "etc/ufw").iterdir() if "fwsafe-tmp" in p.name]


def test_restore_only_given_paths(tmp_path: Path) -> None:
    make_ufw(tmp_path)
    snapshot = capture_ufw_files(tmp_path)
    (tmp_path / "etc/ufw/user.rules").write_text("changed\n")
    (tmp_path / "etc/ufw/before.rules").write_text("changed\n")
    restore_ufw_files(snapshot, tmp_path, ["/etc/ufw/user.rules"])
    assert (tmp_path / "etc/ufw/before.rules").read_text() == "changed\n"
    assert (tmp_path / "etc/ufw/user.rules").read_text().endswith("-j ACCEPT\n")


@pytest.mark.parametrize("path", [
    "/etc/shadow", "/etc/ufw/../shadow", "/etc/ufw/sub/x.rules", "/etc/ufw/.hidden.rules",
    "etc/ufw/user.rules", "/etc/ufw/applications.d/x.fwsafe-bak", "/etc//ufw/user.rules",
])
def test_foreign_paths_are_refused(tmp_path: Path, path: str) -> None:
    assert not is_ufw_path(path)
    crafted = json.dumps({"files": {path: {"mode": 0o644, "data": "eA=="}}}).encode()
    with pytest.raises(UfwFilesError):
        load_ufw_files(crafted)
    with pytest.raises(UfwFilesError):
        restore_ufw_files(crafted, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"files": []}',
                                  b'{"files": {"/etc/ufw/ufw.conf": {"mode": "x", "data": ""}}}',
                                  b'{"files": {"/etc/ufw/ufw.conf": {"mode": 420, "data": "!!"}}}'])
def test_damaged_layer_is_refused(data: bytes) -> None:
    with pytest.raises(UfwFilesError):
        load_ufw_files(data)


def test_dump_refuses_foreign_paths() -> None:
    with pytest.raises(UfwFilesError):
        dump_ufw_files({"/etc/passwd": (0o644, b"")})


def test_atomic_write_keeps_mode_and_owner_and_replaces_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "rules.v4"
    target.write_text("old\n")
    target.chmod(0o640)
    os.chown(target, 12345, 54321)
    write_file_atomically(target, b"new\n", keep_owner=True)
    st = target.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 12345, 54321)
    assert target.read_bytes() == b"new\n"
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    link = tmp_path / "link"
    link.symlink_to(outside)
    write_file_atomically(link, b"file now\n", default_mode=0o600)
    assert not link.is_symlink() and outside.read_text() == "keep\n"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "outside", "rules.v4"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_atomic_write_owner_and_mode_options(tmp_path: Path) -> None:
    """The one writer: the state directory's files are the writer's and 0600 whatever was
    there; system files keep their owner (keep_owner) or get one (owner, the rescue's backups)."""
    planted = tmp_path / "record.json"
    planted.write_text("planted\n")
    planted.chmod(0o666)
    os.chown(planted, 12345, 54321)
    write_file_atomically(planted, b"mine\n", 0o600)
    st = planted.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    backup = tmp_path / "rules.v4.fwsafe-bak"
    write_file_atomically(backup, b"old\n", 0o640, owner=(12345, 54321))
    st = backup.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 12345, 54321)
    write_file_atomically(backup, b"older\n", keep_mode=False, default_mode=0o644)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o644
    fresh = tmp_path / "nftables.conf"
    write_file_atomically(fresh, b"flush ruleset\n", default_mode=0o755, keep_owner=True)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o755
    with pytest.raises(IsADirectoryError):
        write_file_atomically(tmp_path, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "nftables.conf", "record.json", "rules.v4.fwsafe-bak"]


def test_restore_keeps_the_owner_of_ufw_files(tmp_path: Path) -> None:
    make_ufw(tmp_path)
    data = capture_ufw_files(tmp_path)
    user_rules = tmp_path / "etc/ufw/user.rules"
    if os.geteuid() == 0:
        os.chown(user_rules, 0, 4321)
    user_rules.write_text("changed\n")
    restore_ufw_files(data, tmp_path)
    st = user_rules.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and user_rules.read_text().startswith("*filter")
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (0, 4321)
