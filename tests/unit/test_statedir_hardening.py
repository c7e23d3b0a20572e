"""The state directory is root's alone: unsafe directories are refused (exit 2), temp files are
never written through a planted symlink, and records carry a format version."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, atomic_write, check_state_dir, make_private_dir, open_private
from fwsafe.core.transaction import RECORD_FORMAT, Record
from fwsafe.errors import ExitCode, RecordFormatError, StateError, UnsafeStateDirError
from fwsafe.ondisk import atomic_files

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply to root")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A private directory to build layouts in (tmp_path's own parents are private)."""
    tmp_path.chmod(0o700)
    return tmp_path


def refused(path: Path, match: str) -> None:
    with pytest.raises(UnsafeStateDirError, match=match) as info:
        StateDir(path).ensure()
    assert info.value.exit_code == ExitCode.USAGE


# -- temp files and symlinks ------------------------------------------------------------------
def test_atomic_write_never_follows_a_planted_temp_symlink(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = base / "victim"
    victim.write_text("precious")
    victim.chmod(0o644)
    names: Iterator[str] = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(atomic_files.secrets, "token_hex", lambda n: next(names))
    planted = base / ".record.json.aaaa.tmp"
    planted.symlink_to(victim)
    target = base / "record.json"
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert planted.is_symlink()  # left alone, not written through


def test_atomic_write_gives_up_when_every_name_is_taken(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic_files.secrets, "token_hex", lambda n: "same")
    (base / ".f.same.tmp").symlink_to(base / "elsewhere")
    with pytest.raises(StateError, match="temporary file"):
        atomic_write(base / "f", b"x")
    assert not (base / "elsewhere").exists()


def test_atomic_write_replaces_a_symlinked_target_not_its_target(base: Path) -> None:
    victim = base / "victim"
    victim.write_text("precious")
    (base / "current").symlink_to(victim)
    atomic_write(base / "current", b"tx\n")
    assert victim.read_text() == "precious"
    assert not (base / "current").is_symlink() and (base / "current").read_bytes() == b"tx\n"


def test_temp_names_are_random(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".tmp"):
            seen.append(str(path))
            assert flags & os.O_EXCL and flags & os.O_NOFOLLOW
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic_files.os, "open", spy)
    atomic_write(base / "f", b"1")
    atomic_write(base / "f", b"2")
    assert len(seen) == 2 and seen[0] != seen[1]


def test_make_private_dir_refuses_a_symlink_and_never_chmods_its_target(base: Path) -> None:
    target = base / "real"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    link = base / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeStateDirError, match="symbolic link"):
        make_private_dir(link)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    make_private_dir(target)  # a real directory is tightened
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_open_private_refuses_a_symlink(base: Path) -> None:
    (base / "lock").symlink_to(base / "x")
    with pytest.raises(OSError):
        open_private(base / "lock", os.O_RDWR)
    assert not (base / "x").exists()


# -- the state directory and its parents --------------------------------------------------------
def test_state_dir_that_is_a_symlink_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    (base / "state").symlink_to(real)
    refused(base / "state", "symbolic link")
    with pytest.raises(UnsafeStateDirError):
        StateDir(base / "state").exists()


def test_world_writable_state_dir_is_refused(base: Path) -> None:
    state = base / "state"
    state.mkdir()
    state.chmod(0o777)
    refused(state, r"writable by group/others \(mode 0777\)")
    state.chmod(0o770)
    refused(state, "writable by group/others")


def test_world_writable_parent_without_sticky_bit_is_refused(base: Path) -> None:
    parent = base / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    refused(parent / "state", f"{parent} is writable by group/others")
    assert not (parent / "state").exists()  # refused before anything is created


@needs_root
def test_sticky_parent_is_accepted_for_a_private_root_owned_state_dir(base: Path) -> None:
    sticky = base / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    state = StateDir(sticky / "state")
    state.ensure()  # created 0700: accepted
    assert state.exists()
    state.root.chmod(0o755)
    with pytest.raises(UnsafeStateDirError, match="needs 0700"):
        state.exists()
    state.ensure()  # apply tightens it again
    assert stat.S_IMODE(state.root.stat().st_mode) == 0o700
    os.chown(state.root, 65534, 65534)
    with pytest.raises(UnsafeStateDirError, match="owned by uid 65534"):
        state.exists()


@needs_root
def test_state_dir_or_parent_not_owned_by_root_is_refused(base: Path) -> None:
    parent = base / "p"
    parent.mkdir(mode=0o755)
    os.chown(parent, 65534, 65534)
    refused(parent / "state", "owned by uid 65534, not root")
    own = base / "own"
    own.mkdir(mode=0o700)
    os.chown(own, 65534, 65534)
    refused(own, "owned by uid 65534, not root")


@needs_root
def test_symlink_on_the_way_owned_by_someone_else_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    link = base / "via"
    link.symlink_to(real)
    os.lchown(link, 65534, 65534)
    refused(link / "state", "symlink owned by uid 65534")


@needs_root
def test_the_lab_layout_is_accepted() -> None:
    """The lab tests use tempfile.mkdtemp() in /tmp (1777) and a state dir inside it."""
    workdir = Path(tempfile.mkdtemp(prefix="fwsafe-lab-test-"))
    try:
        state = StateDir(workdir / "state")
        state.ensure()
        assert state.exists()
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=True)


def test_cli_refuses_an_unsafe_state_dir_with_exit_2(base: Path) -> None:
    state = base / "state"
    state.mkdir()
    state.chmod(0o777)
    result = subprocess.run([sys.executable, "-m", "fwsafe", "status", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0].startswith(f"fwsafe: error: state directory {state}: refused")
    assert "Traceback" not in result.stderr


def test_missing_state_dir_is_fine(base: Path) -> None:
    check_state_dir(base / "nope" / "state")
    assert not StateDir(base / "nope").exists()


# -- records: format version, unknown fields ------------------------------------------------------
def make_record() -> Record:
    return Record(id=transaction.new_tx_id(), state=transaction.PENDING, created=time.time(),
                  timeout_s=60, backend="rules", layers=["ipv4"])


def saved(base: Path, data: dict[str, object]) -> StateDir:
    state = StateDir(base / "state")
    state.ensure()
    os.makedirs(state.tx_dir(str(data["id"])), exist_ok=True)
    transaction.record_path(state, str(data["id"])).write_text(json.dumps(data))
    return state


def test_records_carry_the_format(base: Path) -> None:
    record = make_record()
    assert record.to_json()["format"] == RECORD_FORMAT == 1
    data = record.to_json()
    del data["format"]  # a record written before the field existed
    state = saved(base, data)
    assert transaction.load_record(state, record.id) == record


def test_unknown_fields_are_kept_not_refused(base: Path) -> None:
    record = make_record()
    data = {**record.to_json(), "format": "1.7", "from_the_future": {"x": [1, 2]}}
    data["events"] = [{"t": 1.0, "event": "pending", "detail": "", "new_key": True}]
    state = saved(base, data)
    loaded = transaction.load_record(state, record.id)
    assert loaded.state == transaction.PENDING and loaded.extra == {"from_the_future": {"x": [1, 2]}}
    loaded.transition(transaction.CONFIRMED, "ok")
    transaction.save_record(state, loaded)  # written back with the field it did not know
    again = json.loads(transaction.record_path(state, record.id).read_text())
    assert again["from_the_future"] == {"x": [1, 2]} and again["format"] == 1
    assert again["state"] == transaction.CONFIRMED


@pytest.mark.parametrize("version", [2, "2.0", 17])
def test_newer_major_format_is_a_clear_error(base: Path, version: object) -> None:
    record = make_record()
    state = saved(base, {**record.to_json(), "format": version})
    with pytest.raises(RecordFormatError, match="newer than this fwsafe reads") as info:
        transaction.load_record(state, record.id)
    assert "newer fwsafe" in (info.value.hint or "")


def test_garbled_format_is_damaged(base: Path) -> None:
    record = make_record()
    state = saved(base, {**record.to_json(), "format": [1]})
    with pytest.raises(StateError, match="damaged"):
        transaction.load_record(state, record.id)
