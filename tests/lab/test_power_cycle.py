"""Recovery by power cycle, under a real systemd (PID 1) in a system container (tests/systemdlab.py).

The seed's incident: a plain `ufw delete allow 22/tcp` typed over SSH, saved to ufw's files, no
fwsafe involved. One hard reboot must change nothing (fwsafe did not guard it: still locked
out); a second one within the window with no SSH login in between puts the last known-good
state back before ufw and sshd start, and SSH gets in. With an SSH login between the two
reboots nothing is changed. The boot unit and the login hook are those the first `fwsafe
apply` installs. Times are printed (run with -s).
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.systemdlab import SystemdLab

pytestmark = pytest.mark.lab


def _ufw_rules(lab: SystemdLab) -> str:
    """ufw's rules as its files hold them (what the next boot loads)."""
    return lab.exec(["ufw", "show", "added"]).stdout


def _hard_reboot(lab: SystemdLab) -> float:
    """`reboot -ff` (no shutdown at all: the power button); returns once the next boot has
    finished starting (SSH itself is not waited for). Seconds from the request to PID 1."""
    took = lab.reboot(hard=True)
    end = time.monotonic() + 60
    state = lab.wait_booted()
    while state in ("offline", "unknown", "") and time.monotonic() < end:
        time.sleep(0.2)   # PID 1 is there, its manager does not answer yet
        state = lab.wait_booted()
    assert state in ("running", "degraded"), state
    return took


def _diagnostics(lab: SystemdLab) -> str:
    return "\n".join([
        lab.journal("-b", "-u", "fwsafe-recover.service", "-u", "ufw.service", lines=40),
        lab.exec(["cat", "/var/lib/fwsafe/boots.json", "/var/lib/fwsafe/login-mark"],
                 check=False).stdout,
        lab.exec(["ufw", "status"], check=False).stdout,
    ])


def _history(lab: SystemdLab) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(
        lab.exec(["fwsafe", "history", "--json"]).stdout)["entries"]
    return entries


def test_two_hard_reboots_without_a_login_bring_back_the_last_known_good_state(
        sdlab: SystemdLab) -> None:
    lab = sdlab
    lab.exec(["ufw", "allow", "22/tcp"])
    lab.exec(["ufw", "--force", "enable"])
    # A change through fwsafe, confirmed from a NEW session: the last known-good state is
    # 22 + 80. The first apply installs the boot unit and the login hook.
    applied = lab.ssh("fwsafe apply --detach --json --timeout 120 -- ufw allow 80/tcp",
                      timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    tx_id = json.loads(applied.stdout)["id"]
    confirmed = lab.ssh(f"fwsafe confirm {tx_id}")
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    assert "fwsafe" in lab.read("/etc/pam.d/common-session")   # the login hook is enabled
    good = _ufw_rules(lab)
    assert "allow 22/tcp" in good and "allow 80/tcp" in good, good

    # 1. With an SSH login between the two reboots nothing is changed. An unguarded change
    #    that does not lock out, saved to ufw's files:
    changed = lab.ssh("ufw delete allow 80/tcp")
    assert changed.returncode == 0, changed.stdout + changed.stderr
    unguarded = _ufw_rules(lab)
    assert "allow 80/tcp" not in unguarded
    _hard_reboot(lab)
    lab.wait_ssh(30)
    assert lab.ssh("true").returncode == 0       # someone got in
    _hard_reboot(lab)
    lab.wait_ssh(30)
    assert _ufw_rules(lab) == unguarded, _diagnostics(lab)
    assert lab.status()["power_cycle"] is None, _diagnostics(lab)
    entries = _history(lab)

    # 2. The incident: a plain `ufw delete allow 22/tcp` over SSH, saved to ufw's files.
    cut = lab.ssh("ufw --force delete allow 22/tcp")
    assert cut.returncode == 0, cut.stdout + cut.stderr
    assert not lab.new_connection_ok(timeout=1.0), "the lockout is not live"
    locked = _ufw_rules(lab)

    # One hard reboot: fwsafe did not guard it, so nothing changes: still locked out.
    _hard_reboot(lab)
    time.sleep(1.0)
    assert not lab.new_connection_ok(timeout=1.0), (
        "a single reboot changed a state fwsafe did not guard\n" + _diagnostics(lab))
    assert _ufw_rules(lab) == locked
    assert _history(lab) == entries

    # A second hard reboot within a minute, no login in between: SSH gets in.
    issued = time.monotonic()
    lab.reboot(hard=True)
    pid1 = lab.boot_leader[-1]
    try:
        lab.wait_ssh(60)
    except Exception as exc:
        raise AssertionError(f"SSH does not answer after the second reboot: {exc}\n"
                             f"{_diagnostics(lab)}") from exc
    answered = time.monotonic()
    print(f"\n[power cycle] second hard reboot issued -> SSH answering: {answered - issued:.2f} s"
          f" (PID 1 -> SSH answering: {answered - pid1:.2f} s)")
    assert lab.ssh("true").returncode == 0
    status = lab.exec(["ufw", "status"]).stdout
    assert "Status: active" in status, status
    assert _ufw_rules(lab) == good, _diagnostics(lab)

    info = lab.status()
    power = info["power_cycle"]
    assert power is not None and power["this_boot"], info
    assert "no SSH login" in power["why"]
    assert "/etc/ufw/user.rules" in power["written"]
    text = lab.ssh("fwsafe status").stdout
    assert "power-cycle recovery" in text and f"fwsafe rollback {power['undo']}" in text, text
    after = _history(lab)
    undo = [e for e in after if e["id"] == power["undo"]]
    assert undo and undo[0]["kind"] == "before-recovery", after
    listing = lab.exec(["fwsafe", "history"]).stdout
    assert "before-recovery" in listing and power["entry"] in listing, listing
    # Announced at the next login (pam_motd shows /run/motd.d to an interactive login).
    motd = subprocess.run(lab.ssh_argv("", tty=True), input="exit\n", capture_output=True,
                          text=True, timeout=60, check=False)
    assert "power-cycle recovery" in motd.stdout + motd.stderr, motd

    # Undone with `fwsafe rollback`: the files found at boot come back, under the guard.
    rolled = lab.ssh(f"fwsafe rollback --detach --json --timeout 120 {power['undo']}",
                     timeout=120)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert _ufw_rules(lab) == locked
    reverted = lab.ssh(f"fwsafe revert {json.loads(rolled.stdout)['id']}")
    assert reverted.returncode == 4, reverted.stdout + reverted.stderr
    assert _ufw_rules(lab) == good


def test_sshd_files_are_kept_and_put_back_by_the_rescue_tool_and_a_power_cycle(
        sdlab: SystemdLab) -> None:
    """A confirmed `fwsafe sshd set` records sshd's files in the history; an unguarded drop-in
    that refuses root's login (the banner still answers: only a login tells) is moved aside by
    the rescue zipapp and by the power-cycle recovery, and a rollback to the state with it goes
    through sshd's own lockout check."""
    lab = sdlab
    applied = lab.ssh("fwsafe sshd set --detach --json --timeout 120 MaxAuthTries=5",
                      timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    confirmed = lab.ssh(f"fwsafe confirm {json.loads(applied.stdout)['id']}")
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    last = json.loads(lab.exec(["fwsafe", "show", "last", "--json"]).stdout)
    assert "sshd" in last["layers"], last
    assert "MaxAuthTries 5" in "".join(last["content"]["sshd"].values()), last["content"]["sshd"]

    bad = "/etc/ssh/sshd_config.d/00-no-root.conf"

    def break_sshd() -> None:
        lab.write(bad, "PermitRootLogin no\n")
        lab.exec(["systemctl", "restart", "ssh.service"])
        lab.wait_ssh(30)
        assert lab.ssh("true").returncode == 255, "root still logs in"

    # The rescue tool (the zipapp on the server's disk), on the disk as a rescue system sees it.
    break_sshd()
    rescued = lab.exec(["python3", "/var/lib/fwsafe/fwsafe.pyz", "rescue", "--root", "/",
                        "--last-good", "--yes"], check=False)
    assert rescued.returncode == 0, rescued.stdout + rescued.stderr
    assert f"remove   {bad}" in rescued.stdout, rescued.stdout
    lab.exec(["systemctl", "restart", "ssh.service"])
    lab.wait_ssh(30)
    assert lab.ssh("true").returncode == 0

    # The power cycle: the drop-in comes back unguarded (over SSH, so that boot had a login),
    # then two hard resets with nobody getting in between.
    lab.exec(["rm", "-f", f"{bad}.fwsafe-bak"])
    break_sshd()
    for _ in range(2):
        _hard_reboot(lab)
    lab.wait_ssh(30)
    assert lab.ssh("true").returncode == 0, _diagnostics(lab)
    power = lab.status()["power_cycle"]
    assert power is not None and power["this_boot"] and bad in power["written"], power
    assert lab.exec(["test", "-e", bad], check=False).returncode != 0

    # Undoing it is a rollback, which sshd's lockout check refuses here (exit 3, nothing done).
    rolled = lab.ssh(f"fwsafe rollback --detach --json --timeout 60 {power['undo']}",
                     timeout=120)
    assert rolled.returncode == 3, rolled.stdout + rolled.stderr
    assert "lockout" in (rolled.stdout + rolled.stderr).lower(), rolled.stdout + rolled.stderr
    assert lab.exec(["test", "-e", bad], check=False).returncode != 0
