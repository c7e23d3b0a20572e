"""The shim (opt-in, `fwsafe shim install`) under a real systemd, in a system container
(tests/systemdlab.py): plain `ufw` typed in an SSH session on a terminal runs under the guard,
read-only calls and scripts pass straight through, and `fwsafe shim remove` restores the real
ufw byte for byte."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.systemdlab import SystemdLab

pytestmark = pytest.mark.lab

UFW = "/usr/sbin/ufw"


def _typed(lab: SystemdLab, command: str) -> subprocess.Popen[bytes]:
    """`command` typed in an SSH session on a terminal, left running (nobody answers)."""
    return lab.ssh_popen(command, tty=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)


def _rules(lab: SystemdLab) -> str:
    return lab.exec([f"{UFW}.fwsafe-real" if lab.exec(
        ["test", "-e", f"{UFW}.fwsafe-real"], check=False).returncode == 0 else UFW,
        "show", "added"]).stdout


def _wait_state(lab: SystemdLab, tx: object, states: set[str], limit: float) -> dict[str, object]:
    end = time.monotonic() + limit
    while True:
        info = lab.status()
        if info["id"] == tx and info["state"] in states:
            return info
        assert time.monotonic() < end, f"not {states} in time: {info}"
        time.sleep(0.2)


def test_the_shim_guards_plain_ufw_typed_over_ssh(sdlab: SystemdLab) -> None:
    lab = sdlab
    lab.exec(["ufw", "allow", "22/tcp"])
    lab.exec(["ufw", "--force", "enable"])
    lab.write("/etc/fwsafe/fwsafe.toml", "timeout = 10\n")
    original = lab.exec(["sha256sum", UFW]).stdout.split()[0]
    installed = lab.exec(["fwsafe", "shim", "install", "--json"])
    assert json.loads(installed.stdout)["ok"]
    assert lab.exec(["sha256sum", f"{UFW}.fwsafe-real"]).stdout.split()[0] == original
    assert "fwsafe-real" in lab.exec(["dpkg-divert", "--list", UFW]).stdout
    audit_kinds = lab.exec(["fwsafe", "audit", "--json"], check=False).stdout
    assert '"shim"' in audit_kinds, audit_kinds

    # Read-only: straight through, the same output as the real ufw, no transaction.
    status = subprocess.run(lab.ssh_argv("ufw status", tty=True), capture_output=True,
                            text=True, timeout=60, check=False)
    real = lab.exec([f"{UFW}.fwsafe-real", "status"]).stdout
    assert status.stdout.replace("\r\n", "\n") == real, status
    assert lab.status()["state"] == "none"

    # A change typed on a terminal: under the guard, reverted at the deadline (nobody confirms).
    session = _typed(lab, "ufw deny 8080/tcp")
    info = lab.wait_state({"pending"}, 60)
    assert info["state"] == "pending", info
    assert "8080" in _rules(lab)
    _wait_state(lab, info["id"], {"reverted"}, 40)
    assert session.wait(timeout=30) == 4
    assert "8080" not in _rules(lab)

    # ... kept when confirmed from a NEW session.
    session = _typed(lab, "ufw deny 8081/tcp")
    end = time.monotonic() + 60
    while (info := lab.status())["state"] != "pending" or info["id"] is None:
        assert time.monotonic() < end, info
        time.sleep(0.2)
    assert lab.ssh(f"fwsafe confirm {info['id']}").returncode == 0
    assert session.wait(timeout=30) == 0
    assert "8081" in _rules(lab)
    confirmed = info["id"]

    # Through sudo (its secure_path finds the shim where ufw was; the SSH session is found
    # through sudo's process): guarded the same way.
    session = _typed(lab, "sudo ufw deny 8085/tcp")
    end = time.monotonic() + 60
    while (info := lab.status())["state"] != "pending" or info["id"] == confirmed:
        assert time.monotonic() < end, info
        time.sleep(0.2)
    assert "8085" in _rules(lab)
    assert lab.ssh(f"fwsafe revert {info['id']}").returncode == 4
    assert session.wait(timeout=30) == 4
    assert "8085" not in _rules(lab)
    latest = info["id"]

    # The lockout itself is refused before anything changes, as with `fwsafe ufw` (exit 3).
    cut = subprocess.run(lab.ssh_argv("ufw delete allow 22/tcp", tty=True), capture_output=True,
                         text=True, timeout=120, check=False)
    assert cut.returncode == 3, cut.stdout + cut.stderr
    assert "allow 22/tcp" in _rules(lab) and lab.new_connection_ok()

    # A script (no terminal) gets the plain command; FWSAFE_SHIM=guard chooses the guard.
    plain = lab.ssh("ufw deny 8082/tcp")
    assert plain.returncode == 0 and "8082" in _rules(lab), plain.stdout + plain.stderr
    assert lab.status()["id"] == latest   # no transaction of its own
    chosen = lab.ssh("FWSAFE_SHIM=guard ufw deny 8083/tcp")
    assert chosen.returncode == 0, chosen.stdout + chosen.stderr
    info = lab.status()
    assert info["state"] == "pending" and info["id"] != latest, info
    assert lab.ssh(f"fwsafe revert {info['id']}").returncode == 4
    assert "8083" not in _rules(lab)

    # Removed: the real ufw back, byte for byte; plain ufw on a terminal is plain again.
    removed = lab.exec(["fwsafe", "shim", "remove"])
    assert removed.returncode == 0
    assert lab.exec(["sha256sum", UFW]).stdout.split()[0] == original
    assert lab.exec(["dpkg-divert", "--list", UFW]).stdout.strip() == ""
    before = lab.status()["id"]
    typed = subprocess.run(lab.ssh_argv("ufw deny 8084/tcp", tty=True), capture_output=True,
                           text=True, timeout=60, check=False)
    assert typed.returncode == 0, typed.stdout
    assert "8084" in _rules(lab) and lab.status()["id"] == before
