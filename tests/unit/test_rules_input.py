"""Rules files: a regular file (or `-`) of at most max_rules_bytes; anything else is exit 3 at
once, never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fwsafe.core import config as config_module
from fwsafe.core.change import _read_capped, change_from_files, read_rules_file
from fwsafe.errors import ExitCode, InvalidRulesError

ROOT = Path(__file__).resolve().parents[2]
RULES = b"*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"


def read_quickly(path: str, limit: int | None = None, within: float = 1.0) -> BaseException | bytes:
    """read_rules_file in a thread: it must finish within `within` seconds."""
    result: list[BaseException | bytes] = []

    def run() -> None:
        try:
            result.append(read_rules_file(path, limit))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"read_rules_file({path!r}) hung"
    assert time.monotonic() - started < within
    return result[0]


def refused(path: str, limit: int | None = None) -> InvalidRulesError:
    outcome = read_quickly(path, limit)
    assert isinstance(outcome, InvalidRulesError), outcome
    assert outcome.exit_code == ExitCode.REJECTED
    assert outcome.message.startswith(path)
    return outcome


def test_dev_zero_is_refused_at_once() -> None:
    assert "character device" in refused("/dev/zero").message


def test_fifo_without_a_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)
    assert "FIFO" in refused(str(fifo)).message


def test_directory_is_refused(tmp_path: Path) -> None:
    assert "is a directory, not a rules file" in refused(str(tmp_path)).message


def test_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert "socket" in refused(str(path)).message


def test_oversize_file_names_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.rules"
    path.write_bytes(RULES * 100)
    message = refused(str(path), limit=1024).message
    assert "1 KiB" in message and "max_rules_bytes" in message
    assert read_rules_file(str(path), limit=len(RULES) * 100) == RULES * 100


def test_regular_file_and_a_symlink_to_one(tmp_path: Path) -> None:
    path = tmp_path / "ok.rules"
    path.write_bytes(RULES)
    link = tmp_path / "link.rules"
    link.symlink_to(path)
    assert read_rules_file(str(path)) == RULES
    assert read_rules_file(str(link)) == RULES


def test_missing_and_binary(tmp_path: Path) -> None:
    assert "no such file" in refused(str(tmp_path / "nope")).message
    path = tmp_path / "bin.rules"
    path.write_bytes(b"*filter\0")
    assert "binary data" in refused(str(path)).message


def test_change_from_files_passes_the_limit_on(tmp_path: Path) -> None:
    path = tmp_path / "r.rules"
    path.write_bytes(RULES)
    with pytest.raises(InvalidRulesError, match="larger than the limit of 10 bytes"):
        change_from_files([str(path)], None, limit=10)
    with pytest.raises(InvalidRulesError, match="larger than the limit"):
        change_from_files([], str(path), limit=10)


def test_capped_read_of_a_pipe() -> None:
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    os.close(w)
    try:
        with pytest.raises(InvalidRulesError, match="larger than the limit of 99 bytes"):
            _read_capped(r, 99, "standard input")
    finally:
        os.close(r)
    r, w = os.pipe()
    os.write(w, b"abc")
    os.close(w)
    try:
        assert _read_capped(r, 3, "standard input") == b"abc"
    finally:
        os.close(r)


def _stdin_read(stdin: int, limit: int) -> str:
    """read_rules_file('-') in a child whose standard input is `stdin`."""
    code = ("import sys\nfrom fwsafe.core.change import read_rules_file\nfrom fwsafe.errors import "
            "InvalidRulesError\ntry:\n    print(len(read_rules_file('-', int(sys.argv[1]))))\n"
            "except InvalidRulesError as e:\n    print('refused:', e.message)\n")
    result = subprocess.run([sys.executable, "-c", code, str(limit)], stdin=stdin,
                            capture_output=True, text=True, timeout=30, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result.stdout.strip()


def _from_file(tmp_path: Path, data: bytes, limit: int) -> str:
    path = tmp_path / "stdin"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        return _stdin_read(handle.fileno(), limit)


def test_stdin_whole_and_over_the_cap(tmp_path: Path) -> None:
    big = RULES * 10000
    assert _from_file(tmp_path, big, len(big)) == str(len(big))
    assert _from_file(tmp_path, big, len(big) - 1).startswith(
        "refused: standard input: larger than the limit")
    # a pipe: more than one pipe buffer, so it must be read to its end, not with one read()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write("
                              f"b'x' * {len(big)})"], stdout=subprocess.PIPE)
    assert child.stdout is not None
    try:
        assert _stdin_read(child.stdout.fileno(), len(big)) == str(len(big))
    finally:
        child.stdout.close()
        child.wait()
    with open("/dev/zero", "rb") as zero:
        started = time.monotonic()
        assert _stdin_read(zero.fileno(), 1 << 20).startswith(
            "refused: standard input: larger than the limit of 1 MiB")
    assert time.monotonic() - started < 10


def test_cli_apply_dev_zero_and_fifo_exit_3_fast(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    env = {**os.environ, "FWSAFE_STATE_DIR": str(tmp_path / "s"), "PYTHONPATH": str(ROOT),
           "FWSAFE_CONFIG": str(tmp_path / "c.toml")}
    (tmp_path / "c.toml").write_text("max_rules_bytes = 16\n")
    big = tmp_path / "big.rules"
    big.write_bytes(RULES)
    for path, expect in (("/dev/zero", "character device"), (str(fifo), "FIFO"),
                         (str(big), "larger than the limit of 16 bytes")):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "fwsafe", "apply", path],
                                capture_output=True, text=True, env=env, timeout=30)
        assert result.returncode == 3, result.stderr
        assert expect in result.stderr.splitlines()[0]
        assert time.monotonic() - started < 10
    assert not (tmp_path / "s").exists()


def test_default_limit_is_64_mib() -> None:
    assert config_module.DEFAULT_MAX_RULES_BYTES == 64 * 1024 * 1024
    assert config_module.Config().max_rules_bytes == 64 * 1024 * 1024


def test_windows_line_ends_are_read_as_plain_ones_and_said(tmp_path: Path) -> None:
    path = tmp_path / "crlf.rules"
    path.write_bytes(RULES.replace(b"\n", b"\r\n"))
    change = change_from_files([str(path)], None)
    assert change.layers["ipv4"] == RULES
    assert change.notes == [f"{path}: Windows line ends (CRLF) on 3 lines: read as plain "
                            "newlines (LF)"]


def test_a_carriage_return_inside_a_line_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cr.rules"
    path.write_bytes(b"*filter\n:INPUT ACCEPT\r[0:0]\nCOMMIT\n")
    with pytest.raises(InvalidRulesError) as info:
        read_rules_file(str(path))
    assert info.value.exit_code == ExitCode.REJECTED
    assert f"{path}:2: a carriage return" in info.value.message
    assert info.value.line == 2 and "dos2unix" in (info.value.hint or "")
