"""fwsafe under a real systemd (PID 1): a system container booted with systemd-nspawn.

What only a real systemd shows: the guard as a transient unit (`systemd-run`), logind's
KillUserProcesses, `systemctl kill` of the guard, and reboots (graceful and `reboot -ff`) while a
change is pending, with the boot recovery unit the first apply installs. The container, its
network namespaces and its disk are made per test by tests/systemdlab.py; the firewall of this
machine's own network namespace is never touched. Every test runs on both generations (the
`sdlab` fixture: bookworm with systemd 252 and OpenSSH 9.2, trixie with systemd 257 and OpenSSH
10.0, each with its distribution's plain ssh.service). Times are printed (run with -s).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.rulesets import (
    BASELINE_V4,
    BASELINE_V6,
    DROP_NEW_SSH,
    GOOD,
    NFT_BASELINE,
    NFT_DROP_NEW_SSH,
)
from tests.systemdlab import Image, SystemdLab, mounts_below

pytestmark = pytest.mark.lab

# A probe of "SSH answers" is a fresh interpreter in the client namespace: its start-up adds
# this much to any time measured up to SSH answering.
PROBE_SLACK_S = 0.3
BACKSTOP_LIMIT_S = 2.0

# A minimal stand-in for netfilter-persistent (not in the image): loads the boot files
# /etc/iptables/rules.v4 and rules.v6 early at boot, under the real unit's name, so that
# fwsafe's recovery unit is ordered against it as on a real Debian server.
NETFILTER_PERSISTENT_UNIT = """\
[Unit]
Description=fwsafe lab stand-in for netfilter-persistent: load /etc/iptables/rules.v4, rules.v6
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
After=systemd-modules-load.service local-fs.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/iptables-restore /etc/iptables/rules.v4
ExecStart=/usr/sbin/ip6tables-restore /etc/iptables/rules.v6

[Install]
WantedBy=multi-user.target
"""


# --------------------------------------------------------------------------- helpers


def _apply(lab: SystemdLab, args: str, *, config: str = "") -> dict[str, Any]:
    """`fwsafe apply --detach --json ARGS` over a new SSH login; its JSON answer."""
    options = f"--config {config} " if config else ""
    result = lab.ssh(f"fwsafe apply {options}--detach --json {args}", timeout=120)
    assert result.returncode == 0, (
        f"apply failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data: dict[str, Any] = json.loads(result.stdout)
    assert data["state"] == "pending", data
    return data


def _ssh_status(lab: SystemdLab) -> dict[str, Any]:
    result = lab.ssh("fwsafe status --json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _unit(tx_id: str) -> str:
    return f"fwsafe-guard-{tx_id}.service"


def _guard_log(lab: SystemdLab, info: dict[str, Any]) -> str:
    if not info.get("log"):
        return ""
    return lab.exec(["cat", str(info["log"])], check=False).stdout


def _iptables_baseline(lab: SystemdLab) -> None:
    lab.exec(["iptables-restore"], input=BASELINE_V4)
    lab.exec(["ip6tables-restore"], input=BASELINE_V6)


def _diff(before: str, after: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        "before the change", "after the reboot"))


def _diagnostics(lab: SystemdLab) -> str:
    """What the boot did, for assertion messages."""
    parts = [
        lab.exec(["systemctl", "--no-pager", "status", "fwsafe-recover.service"], check=False).stdout,
        lab.exec(["ls", "-l", "/etc/systemd/system/sysinit.target.wants/"], check=False).stdout,
        lab.journal("-b", "-u", "fwsafe-recover.service", "-u", "ufw.service",
                    "-u", "nftables.service", "-u", "netfilter-persistent.service", lines=40),
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the lab itself


def test_systemd_lab_boots_and_reboots(sdlab: SystemdLab) -> None:
    print(f"\n[systemd lab] {sdlab.image.suite} instance: prepared in {sdlab.prepare_s:.2f} s, "
          f"booted to SSH answering in {sdlab.boot_s:.2f} s")
    result = sdlab.ssh("id -u; systemctl is-system-running --wait; fwsafe --version; "
                       "cat /proc/sys/kernel/random/boot_id")
    assert result.returncode == 0, result.stderr
    uid, running, version, boot_id = result.stdout.split("\n")[:4]
    assert uid == "0"
    assert running in ("running", "degraded"), sdlab.exec(
        ["systemctl", "--failed", "--no-pager"], check=False).stdout
    assert version.startswith("fwsafe")
    assert os.readlink("/proc/self/ns/pid") != os.readlink(f"/proc/{sdlab.leader}/ns/pid")
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert boot_id != host_boot_id
    python = sdlab.exec(["/opt/fwsafe/bin/python", "-c",
                         "import click, paramiko, fwsafe; print(click.__version__, "
                         "paramiko.__version__, fwsafe.__file__)"]).stdout.split()
    assert python[2].startswith("/opt/fwsafe/"), python  # the wheel, Debian's click/paramiko
    print(f"[systemd lab] click {python[0]}, paramiko {python[1]}")
    versions = sdlab.exec(["sh", "-c", "python3 -c 'import sys; print(sys.version_info[1])'; "
                           "systemctl --version | head -n 1; ssh -V 2>&1"]).stdout.split("\n")
    minor, systemd = int(versions[0]), versions[1].split()[1]
    openssh = re.match(r"OpenSSH_(\d+\.\d+)", versions[2])
    want = {"bookworm": (11, "252", "9.2"), "trixie": (13, "257", "10.0")}.get(sdlab.image.suite)
    if want is not None:  # the generation is the one asked for
        assert (minor, systemd, openssh and openssh[1]) == want, (sdlab.image.suite, versions)
    # The distribution's default arrangement: a plain ssh.service, no socket activation.
    units = sdlab.exec(["systemctl", "is-active", "ssh.service", "ssh.socket"],
                       check=False).stdout.split()
    assert units == ["active", "inactive"], units

    seen = {boot_id}
    for hard in (False, True):
        _iptables_baseline(sdlab)
        sdlab.exec(["nft", "add", "table", "inet", "selftest"])
        sdlab.write("/root/disk-marker", f"written before reboot {len(seen)}\n")
        assert "selftest" in sdlab.ruleset()
        to_pid1 = sdlab.reboot(hard=hard)
        waited = sdlab.wait_ssh(30)
        print(f"[systemd lab] {'hard' if hard else 'graceful'} reboot: PID 1 after "
              f"{to_pid1:.2f} s, SSH after {to_pid1 + waited:.2f} s")
        new_id = sdlab.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        assert new_id and new_id not in seen
        seen.add(new_id)
        empty = sdlab.ruleset()
        assert [ln for ln in empty.splitlines() if ln.strip() and not ln.startswith("==")] == []
        assert sdlab.read("/root/disk-marker") == f"written before reboot {len(seen) - 1}\n"
    assert sdlab.exit_codes == [133, 133]


def test_systemd_lab_leaves_nothing_behind(sdlab_generation_image: Image) -> None:
    lab = SystemdLab.start(sdlab_generation_image)
    try:
        session = lab.ssh_popen("sleep 600")
        pids = {lab.leader, lab.nspawn_pid, session.pid}
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert lab.ns in netns and lab.cli_ns in netns
    finally:
        lab.close()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.ns not in netns.split() and lab.cli_ns not in netns.split()
    assert not mounts_below(lab.workdir)
    assert not lab.workdir.exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    for hierarchy in ("systemd", "unified"):
        assert not Path(f"/sys/fs/cgroup/{hierarchy}/fwsafe-sdlab/{lab.name}").exists()


# --------------------------------------------------------------------------- the guard


def test_guard_is_a_transient_unit_and_reverts_at_the_deadline(sdlab: SystemdLab) -> None:
    # (on trixie: tests/lab/test_socket_sshd.py and test_deb.py revert at the deadline there)
    _iptables_baseline(sdlab)
    before = sdlab.ruleset()
    sdlab.write("/root/drop-new.rules", DROP_NEW_SSH)
    applied = _apply(sdlab, "--force --timeout 6 /root/drop-new.rules")
    tx_id = applied["id"]
    status = sdlab.exec(["systemctl", "status", "--no-pager", _unit(tx_id)], check=False)
    assert status.returncode == 0, status.stdout + status.stderr  # active
    assert "-m fwsafe.guard" in status.stdout
    info = sdlab.status()
    assert info["guard_mode"] == "systemd-run"
    assert not sdlab.new_connection_ok(timeout=0.5), "the lockout is not live"
    deadline = float(info["deadline"])
    sdlab.wait_ssh(30)
    answered = time.time()
    print(f"\n[systemd lab] guard reverted at the deadline: SSH answered "
          f"{answered - deadline:+.2f} s from the deadline")
    assert answered - deadline < 3.0 + PROBE_SLACK_S
    final = _ssh_status(sdlab)
    assert final["state"] == "reverted", final
    assert "timeout" in final["reason"]
    assert sdlab.ruleset() == before
    # the record says "reverted" before the guard's process has exited: its unit may still
    # be "deactivating" for a moment; it must be gone soon after, not linger
    ends = time.time() + 15
    while True:
        gone = sdlab.exec(["systemctl", "is-active", _unit(tx_id)], check=False).stdout.strip()
        if gone in ("inactive", "unknown", "failed") or time.time() > ends:
            break
        time.sleep(0.2)
    assert gone in ("inactive", "unknown", "failed"), gone


def test_kill_user_processes_and_a_dead_session_leave_the_guard_alone(sdlab: SystemdLab) -> None:
    # logind spares root's sessions (the admin here) unless KillExcludeUsers= names others.
    sdlab.write("/etc/systemd/logind.conf.d/fwsafe-lab.conf",
                "[Login]\nKillUserProcesses=yes\nKillExcludeUsers=nobody\n")
    sdlab.exec(["systemctl", "restart", "systemd-logind"])
    _iptables_baseline(sdlab)
    sdlab.write("/root/good.rules", GOOD)
    # The admin's session: applies, leaves a background process of its own, then idles.
    session = sdlab.ssh_popen(
        "fwsafe apply --detach --json --timeout 120 /root/good.rules > /root/apply.json; "
        "setsid -f sleep 4242; echo applied > /root/session.state; sleep 600",
        stdout=subprocess.PIPE)
    end = time.monotonic() + 60
    while sdlab.exec(["cat", "/root/session.state"], check=False).stdout.strip() != "applied":
        assert session.poll() is None, "the session ended early"
        assert time.monotonic() < end, "apply did not finish in the session"
        time.sleep(0.2)
    tx_id = json.loads(sdlab.read("/root/apply.json"))["id"]
    cgroup = sdlab.exec(["systemctl", "show", "-P", "ControlGroup", _unit(tx_id)]).stdout.strip()
    assert cgroup.startswith("/system.slice/"), cgroup  # not in the session's scope
    sessions = sdlab.exec(["loginctl", "list-sessions", "--no-legend"]).stdout
    assert sessions.strip(), "no logind session for the SSH login"

    session.kill()  # the admin's connection dies
    session.wait()
    end = time.monotonic() + 20
    while sdlab.exec(["pgrep", "-f", "sleep 4242"], check=False).returncode == 0:
        assert time.monotonic() < end, "logind did not end the session's processes"
        time.sleep(0.2)
    time.sleep(1)  # let logind finish stopping the session's scope
    info = sdlab.status()
    assert info["state"] == "pending", info
    assert info["guard_alive"], info
    active = sdlab.exec(["systemctl", "is-active", _unit(tx_id)], check=False).stdout.strip()
    assert active == "active", active
    confirmed = sdlab.ssh(f"fwsafe confirm {tx_id}")  # from a NEW session
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    assert sdlab.status()["state"] == "confirmed"


def test_the_config_file_reaches_the_guard(sdlab: SystemdLab) -> None:
    """persist = "none" from --config: the guard writes no boot files on confirm. A second
    change without the config shows that it would have written them."""
    original = "# the admin's own boot rules, fwsafe lab\n" + BASELINE_V4
    sdlab.write("/etc/iptables/rules.v4", original, mode="0640")
    sdlab.write("/etc/iptables/rules.v6", BASELINE_V6, mode="0640")
    nft_conf = sdlab.read("/etc/nftables.conf")
    sdlab.write("/etc/fwsafe/custom.toml", 'persist = "none"\n')
    _iptables_baseline(sdlab)
    sdlab.write("/root/good.rules", GOOD)

    first = _apply(sdlab, "--timeout 120 /root/good.rules", config="/etc/fwsafe/custom.toml")
    confirmed = sdlab.ssh(f"fwsafe confirm {first['id']}")
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    info = sdlab.status()
    assert info["state"] == "confirmed", info
    assert sdlab.read("/etc/iptables/rules.v4") == original, (
        "persist = none in --config, yet the boot file was written; guard log:\n"
        + _guard_log(sdlab, info))
    assert sdlab.read("/etc/nftables.conf") == nft_conf

    sdlab.write("/root/good2.rules", GOOD.replace("--dport 443", "--dport 8443"))
    second = _apply(sdlab, "--timeout 120 /root/good2.rules")
    assert sdlab.ssh(f"fwsafe confirm {second['id']}").returncode == 0
    assert "8443" in sdlab.read("/etc/iptables/rules.v4"), (
        "control: without the config, confirm should write the boot file")


# --------------------------------------------------------------------------- the backstop


def test_systemctl_kill_of_the_guard_is_backstopped(sdlab: SystemdLab) -> None:
    _iptables_baseline(sdlab)
    before = sdlab.ruleset()
    sdlab.write("/root/drop-new.rules", DROP_NEW_SSH)
    tx_id = _apply(sdlab, "--force --timeout 60 /root/drop-new.rules")["id"]
    assert not sdlab.new_connection_ok(timeout=0.5), "the lockout is not live"
    killed = time.monotonic()
    sdlab.exec(["systemctl", "kill", "-s", "KILL", _unit(tx_id)])
    try:
        waited = sdlab.wait_ssh(20)
    finally:
        print(f"\n[systemd lab] guard SIGKILLed: SSH answered after "
              f"{time.monotonic() - killed:.2f} s")
    info = sdlab.status()
    assert waited <= BACKSTOP_LIMIT_S + PROBE_SLACK_S, (
        f"SSH came back {waited:.2f} s after the kill (state {info['state']}: {info['reason']})")
    assert info["state"] == "reverted", info
    assert "backstop" in str(info.get("reverted_by", "")).lower(), info
    assert sdlab.ruleset() == before


# --------------------------------------------------------------------------- reboots


def _setup_iptables(lab: SystemdLab) -> str:
    """Boot files loaded at boot by the netfilter-persistent stand-in; returns the change's
    arguments to `fwsafe apply`."""
    lab.write("/etc/iptables/rules.v4", BASELINE_V4, mode="0640")
    lab.write("/etc/iptables/rules.v6", BASELINE_V6, mode="0640")
    lab.write("/etc/systemd/system/netfilter-persistent.service", NETFILTER_PERSISTENT_UNIT)
    lab.exec(["systemctl", "daemon-reload"])
    lab.exec(["systemctl", "enable", "--now", "netfilter-persistent.service"])
    lab.write("/root/change.rules", DROP_NEW_SSH)
    return "/root/change.rules"


def _setup_nft(lab: SystemdLab) -> str:
    lab.write("/etc/nftables.conf", NFT_BASELINE, mode="0755")
    lab.exec(["systemctl", "enable", "--now", "nftables.service"])
    lab.write("/root/change.nft", NFT_DROP_NEW_SSH)
    return "/root/change.nft"


def _setup_ufw(lab: SystemdLab) -> str:
    lab.exec(["ufw", "allow", "22/tcp"])
    lab.exec(["ufw", "--force", "enable"])
    assert "Status: active" in lab.exec(["ufw", "status"]).stdout
    return "-- ufw delete allow 22/tcp"


SETUPS = {"iptables": _setup_iptables, "nft": _setup_nft, "ufw": _setup_ufw}


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "hard"])
@pytest.mark.parametrize("kind", list(SETUPS))
def test_reboot_during_a_pending_change_comes_back_with_the_old_rules(
        sdlab: SystemdLab, kind: str, hard: bool) -> None:
    change = SETUPS[kind](sdlab)
    before = sdlab.ruleset()
    ufw_before = sdlab.exec(["ufw", "status", "verbose"]).stdout
    tx_id = _apply(sdlab, f"--force --timeout 300 {change}")["id"]
    assert not sdlab.new_connection_ok(timeout=0.5), "the lockout is not live"
    assert sdlab.ruleset() != before
    # No `fwsafe install-boot-hook` by hand: the first apply installs the unit by itself.
    boot_id = sdlab.boot_id()
    issued = time.monotonic()
    sdlab.reboot(hard=hard)
    try:
        sdlab.wait_ssh(60)
        answered = time.monotonic() - issued
    except Exception as exc:
        raise AssertionError(
            f"{kind}: SSH does not answer after a {'hard' if hard else 'graceful'} reboot "
            f"during a pending change: {exc}\n{_diagnostics(sdlab)}") from exc
    print(f"\n[systemd lab] {kind}: {'hard' if hard else 'graceful'} reboot issued -> SSH "
          f"answering: {answered:.2f} s")
    assert sdlab.boot_id() != boot_id
    state = sdlab.wait_booted()
    assert state in ("running", "degraded"), state
    assert sdlab.new_connection_ok(), "SSH answered early in the boot, but not once it finished"
    after = sdlab.ruleset()
    assert after == before, (f"{kind}: other rules after the reboot:\n{_diff(before, after)}\n"
                             f"{_diagnostics(sdlab)}")
    if kind == "ufw":
        ufw_after = sdlab.exec(["ufw", "status", "verbose"]).stdout
        assert ufw_after == ufw_before, f"{_diff(ufw_before, ufw_after)}\n{_diagnostics(sdlab)}"
    info = _ssh_status(sdlab)
    assert info["id"] == tx_id
    assert info["state"] == "reverted", f"{info}\n{_diagnostics(sdlab)}"
    assert re.search(r"reboot", info["reason"] or "", re.I), (
        f"reverted, but the reason does not mention the reboot: {info['reason']!r} "
        f"(reverted_by {info.get('reverted_by')!r})")
