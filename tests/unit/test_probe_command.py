"""`fwsafe probe`: run probes once against real loopback listeners; exit 0/1/2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest


def fwsafe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fwsafe", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()  # bound, never listened: connecting is refused
    return port


def test_all_pass_is_0_with_a_table(listener: int) -> None:
    result = fwsafe("probe", f"tcp://127.0.0.1:{listener}", "cmd:true")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["URL", "RESULT", "LATENCY", "ERROR"]
    assert lines[1].startswith(f"tcp://127.0.0.1:{listener}") and " ok " in lines[1]
    assert lines[2].startswith("cmd:true") and lines[2].endswith("-")


def test_one_failure_is_1(listener: int, closed_port: int) -> None:
    result = fwsafe("probe", f"tcp://127.0.0.1:{listener}", f"tcp://127.0.0.1:{closed_port}")
    assert result.returncode == 1
    failed = result.stdout.splitlines()[2]
    assert "FAIL" in failed and "connection refused" in failed
    assert result.stderr == ""


def test_json_object_with_results(listener: int, closed_port: int) -> None:
    result = fwsafe("probe", "--json", "--timeout", "1", f"tcp://127.0.0.1:{listener}",
                    f"tcp://127.0.0.1:{closed_port}")
    assert result.returncode == 1
    data = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert data["ok"] is False
    assert [r["ok"] for r in data["results"]] == [True, False]
    assert data["results"][1]["error"] == "connection refused"
    assert isinstance(data["results"][0]["latency_s"], float)


@pytest.mark.parametrize("url", ["tcp://127.0.0.1", "nope://x", "127.0.0.1:22", "tcp://[::1:22"])
def test_bad_url_is_2(url: str) -> None:
    result = fwsafe("probe", url)
    assert result.returncode == 2
    assert "invalid probe" in result.stderr
    assert result.stdout == ""


def test_no_url_is_2() -> None:
    assert fwsafe("probe").returncode == 2


def test_help_documents_the_exit_codes() -> None:
    out = fwsafe("probe", "--help").stdout
    assert "0  every probe passed" in out and "1  at least one probe failed" in out
    assert "2  a bad probe URL" in out
