"""The shim (fwsafe.persistence.command_shims): which calls pass straight through, what the
script decides without Python, and how an SSH session is recognised. The real thing
(dpkg-divert, ufw typed over SSH on a terminal, the guard): tests/lab/test_shim_typed.py."""

from __future__ import annotations

import functools
import os
import subprocess
import time
from pathlib import Path

import pytest

from fwsafe.errors import EnvironmentProblem
from fwsafe.persistence import command_shims


@pytest.mark.parametrize(("tool", "args", "expected"), [
    ("ufw", [], True),
    ("ufw", ["status"], True),
    ("ufw", ["status", "verbose"], True),
    ("ufw", ["show", "added"], True),
    ("ufw", ["app", "list"], True),
    ("ufw", ["app", "info", "OpenSSH"], True),
    ("ufw", ["--version"], True),
    ("ufw", ["--dry-run", "deny", "22/tcp"], True),
    ("ufw", ["deny", "22/tcp"], False),
    ("ufw", ["--force", "delete", "allow", "22/tcp"], False),
    ("ufw", ["enable"], False),
    ("ufw", ["app", "update", "OpenSSH"], False),
    ("ufw", ["default", "deny", "incoming"], False),
    ("firewall-cmd", ["--state"], True),
    ("firewall-cmd", ["--list-all", "--zone=public"], True),
    ("firewall-cmd", ["--permanent", "--get-services"], True),
    ("firewall-cmd", ["--query-port=22/tcp"], True),
    ("firewall-cmd", ["--check-config"], True),
    ("firewall-cmd", ["--remove-service=ssh"], False),
    ("firewall-cmd", ["--permanent", "--add-port=80/tcp"], False),
    ("firewall-cmd", ["--reload"], False),
    ("firewall-cmd", ["--list-all", "--panic-on"], False),
])
def test_read_only(tool: str, args: list[str], expected: bool) -> None:
    assert command_shims.read_only(tool, args) is expected


def test_from_ssh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.2 5000 10.0.0.1 22")
    assert command_shims.from_ssh()
    monkeypatch.delenv("SSH_CONNECTION")
    assert not command_shims.from_ssh(pid=1)
    # A grandchild of a process named sshd (as under `sudo` in an SSH session, which drops
    # SSH_CONNECTION): found through the parent chain.
    sshd = tmp_path / "sshd"
    sshd.symlink_to("/bin/sh")
    parent = subprocess.Popen([str(sshd), "-c", "sleep 30; true"])
    try:
        children: list[int] = []
        for _ in range(200):
            children = [int(c) for c in Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
                        .read_text().split()]
            if children:
                break
            time.sleep(0.01)
        assert Path(f"/proc/{parent.pid}/comm").read_text().strip() == "sshd"
        assert command_shims.from_ssh(pid=children[0])
    finally:
        parent.kill()
        parent.wait()


def _script(tmp_path: Path) -> Path:
    real = tmp_path / "real"
    real.write_text('#!/bin/sh\necho "REAL $*"\n')
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\n[ "$1" = -c ] && shift 2   # the code that runs the module\n'
                      'echo "GUARD $*"\n')
    script = tmp_path / "ufw"
    script.write_text(command_shims.script_text("ufw", real, python))
    for path in (real, python, script):
        path.chmod(0o755)
    return script


def test_the_script_without_a_terminal_runs_the_real_command(tmp_path: Path) -> None:
    script = _script(tmp_path)
    env = {"PATH": os.environ["PATH"]}

    def run(**extra: str) -> str:
        return subprocess.run([str(script), "deny", "22/tcp"], env={**env, **extra},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30, check=True).stdout

    assert run() == "REAL deny 22/tcp\n"                 # a script: the plain command
    assert run(FWSAFE_SHIM="off") == "REAL deny 22/tcp\n"
    assert run(FWSAFE_SHIM="guard") == "GUARD fwsafe shim run ufw -- deny 22/tcp\n"
    assert command_shims.is_shim(str(script)) and not command_shims.is_shim(str(tmp_path / "real"))


def test_the_firewalld_layer_calls_the_real_firewall_cmd_where_the_shim_is(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Behind the shim (a shell script) the layer still reads firewalld's model in
    firewall-cmd's own Python, in one process: it finds the diverted real command."""
    from fwsafe.backends import firewalld_client

    tool = tmp_path / "firewall-cmd"
    tool.write_text("#!/usr/bin/python3 -s\nprint('real')\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert firewalld_client.firewall_cmd_path() == str(tool)
    os.rename(tool, str(tool) + command_shims.REAL_SUFFIX)
    real = str(tool) + command_shims.REAL_SUFFIX
    tool.write_text(command_shims.script_text("firewall-cmd", real, "/nowhere"))
    tool.chmod(0o755)
    found = firewalld_client.firewall_cmd_path()
    assert found == str(tool) + command_shims.REAL_SUFFIX
    assert firewalld_client._interpreter_of(found) == "/usr/bin/python3"   # noqa: SLF001


def _shimmed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """A ufw of the test's own behind the shim, diverted by the real dpkg-divert on a dpkg
    database of the test's own (DPKG_ADMINDIR): (ufw's path, the database)."""
    admin = tmp_path / "dpkg"
    admin.mkdir()
    (admin / "diversions").write_text("")
    monkeypatch.setenv("DPKG_ADMINDIR", str(admin))
    tool = tmp_path / "ufw"
    tool.write_text("#!/bin/sh\necho REAL\n")
    tool.chmod(0o755)
    monkeypatch.setitem(command_shims.TOOLS, "ufw", str(tool))
    monkeypatch.delitem(command_shims.TOOLS, "firewall-cmd")
    command_shims.install()
    return tool, admin


def _diverted(tool: Path) -> str:
    return subprocess.run(["dpkg-divert", "--list", str(tool)], capture_output=True,
                          text=True, timeout=30, check=True).stdout


def test_a_shim_whose_command_was_removed_says_so_and_goes_with_its_diversion(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The package removed under the shim (its diverted file gone, as `dpkg -r` leaves it):
    the shim says what is wrong instead of failing as a bug, and `remove` takes the diversion
    away too (left, the package's next install would put ufw at the diverted name)."""
    tool, _ = _shimmed(monkeypatch, tmp_path)
    diverted = functools.partial(_diverted, tool)
    real = Path(command_shims.real_path("ufw"))
    assert command_shims.is_shim(str(tool)) and real.read_text() == "#!/bin/sh\necho REAL\n"
    assert str(real) in diverted()
    real.unlink()   # `dpkg -r ufw`: the diverted file goes, the shim (not the package's) stays
    with pytest.raises(EnvironmentProblem, match="cannot run the real ufw") as raised:
        command_shims.run("ufw", ["status"])
    assert raised.value.hint is not None and "package removed" in raised.value.hint
    said = command_shims.remove()
    assert said == [f"ufw: the shim is removed; ufw itself is not installed ({real} was gone: "
                    "its package removed?)"]
    assert not tool.exists() and diverted().strip() == ""


def test_a_real_command_that_cannot_run_is_not_blamed_on_its_package(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool, _ = _shimmed(monkeypatch, tmp_path)
    Path(command_shims.real_path("ufw")).chmod(0o644)   # there, not executable
    with pytest.raises(EnvironmentProblem, match="Permission denied") as raised:
        command_shims.run("ufw", ["status"])
    assert raised.value.hint is not None and "package" not in raised.value.hint
    assert "cannot be run" in raised.value.hint


def test_a_refused_diversion_leaves_the_shim_for_remove_to_try_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The real file gone and dpkg-divert refusing (the diversion now a package's): nothing
    is lost; once dpkg-divert takes it, `remove` does it all."""
    tool, admin = _shimmed(monkeypatch, tmp_path)
    Path(command_shims.real_path("ufw")).unlink()
    local = (admin / "diversions").read_text()
    assert local.splitlines()[2] == ":"   # (dpkg's format: from, to, package; ":" is local)
    (admin / "diversions").write_text(local.replace("\n:\n", "\nsomepkg\n"))
    with pytest.raises(EnvironmentProblem, match="dpkg-divert"):
        command_shims.remove()
    assert command_shims.is_shim(str(tool))   # still there: found by the next remove
    (admin / "diversions").write_text(local)
    assert command_shims.remove()[0].startswith("ufw: the shim is removed")
    assert not tool.exists() and _diverted(tool).strip() == ""
