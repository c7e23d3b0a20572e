"""`fwsafe sshd set|harden` and `fwsafe apply --sshd-set` against the lab's real sshd: its private
sshd_config (in the lab's workdir, given with --sshd-config: this machine's /etc/ssh is never
touched), reloaded through its PidFile, confirmed from NEW ssh sessions, reverted on time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fwsafe.lab import known_hosts_line, ssh_client_argv
from tests.conftest import FwLab

pytestmark = pytest.mark.lab

# Only the new SSH port gets in (established connections survive the switch).
PORT_2222 = """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT
-A INPUT -p icmp -j ACCEPT
COMMIT
"""


def _config(fw: FwLab) -> Path:
    return fw.lab.workdir / "sshd_config"


def _effective(fw: FwLab, keyword: str) -> list[str]:
    """What the lab's sshd_config says, as sshd reads it."""
    out = fw.lab.srv_exec(["/usr/sbin/sshd", "-T", "-f", str(_config(fw))]).stdout
    return [line.split(" ", 1)[1] for line in out.splitlines()
            if line.startswith(keyword + " ")]


def _sshd(fw: FwLab, args: str) -> subprocess.CompletedProcess[str]:
    """`fwsafe sshd ...` over ssh, in a session as a person would run it."""
    return fw.lab.ssh(f"fwsafe sshd {args.replace('CFG', str(_config(fw)))}", timeout=90)


def _reloads(fw: FwLab) -> int:
    assert fw.lab.sshd_log is not None
    return fw.lab.sshd_log.read_text(errors="replace").count("Received SIGHUP")


def _confirm_on(fw: FwLab, port: int, tx_id: str) -> subprocess.CompletedProcess[str]:
    """`fwsafe confirm` through a brand-new ssh login on `port`."""
    known = fw.lab.workdir / f"known_hosts_{port}"
    known.write_text(known_hosts_line([fw.lab.srv_ip4], fw.lab.host_key, port))
    argv = ssh_client_argv(fw.lab.key, known, fw.lab.srv_ip4, f"fwsafe confirm {tx_id}",
                           port=port)
    return fw.lab.cli_exec(argv, check=False, timeout=60)


def test_harmless_setting_confirmed_from_a_new_session(fwlab: FwLab) -> None:
    cfg = _config(fwlab)
    mode = os.stat(cfg).st_mode
    pid, reloads = fwlab.lab.sshd_pid, _reloads(fwlab)
    result = _sshd(fwlab, "set --sshd-config CFG --detach --json --timeout 30 MaxAuthTries=5")
    assert result.returncode == 0, result.stderr
    armed = json.loads(result.stdout)
    assert armed["state"] == "pending" and armed["layers"][0].startswith("sshd:")
    assert f"sshd: {cfg} (changed)" in result.stderr  # which file changed
    assert b"MaxAuthTries 5\n" in cfg.read_bytes() and os.stat(cfg).st_mode == mode
    assert _reloads(fwlab) == reloads + 1 and fwlab.lab.sshd_pid == pid  # reloaded, not restarted
    confirm = fwlab.lab.ssh(f"fwsafe confirm {armed['id']}")
    assert confirm.returncode == 0, confirm.stderr
    assert fwlab.status()["state"] == "confirmed"
    assert _effective(fwlab, "maxauthtries") == ["5"]
    assert fwlab.lab.new_login_ok()


def test_allowusers_nobody_is_refused_and_forced_it_reverts_on_time(fwlab: FwLab) -> None:
    cfg = _config(fwlab)
    before = cfg.read_bytes()
    refused = _sshd(fwlab, "set --sshd-config CFG --timeout 5 AllowUsers=nobody")
    assert refused.returncode == 3, refused.stderr
    assert "AllowUsers nobody" in refused.stderr and "root" in refused.stderr
    assert cfg.read_bytes() == before
    assert fwlab.status()["state"] == "none"

    forced = _sshd(fwlab, "set --sshd-config CFG --force --detach --timeout 6 AllowUsers=nobody")
    assert forced.returncode == 0, forced.stderr
    applied = time.monotonic()
    assert b"AllowUsers nobody" in cfg.read_bytes()
    assert not fwlab.lab.new_login_ok(), "AllowUsers nobody is not in force"
    assert fwlab.wait_state({"reverted", "revert-failed"}, 25)["state"] == "reverted"
    assert time.monotonic() - applied < 6 + 10
    assert cfg.read_bytes() == before  # byte for byte
    assert fwlab.lab.wait_new_login(deadline_s=10) is not None
    assert "timeout" in fwlab.status()["reason"]


def test_an_invalid_keyword_is_refused_and_nothing_changes(fwlab: FwLab) -> None:
    cfg = _config(fwlab)
    before, reloads = cfg.read_bytes(), _reloads(fwlab)
    result = _sshd(fwlab, "set --sshd-config CFG --timeout 5 Bogus=yes")
    assert result.returncode == 3, result.stderr
    assert "Bad configuration option" in result.stderr and str(cfg) in result.stderr
    assert cfg.read_bytes() == before and _reloads(fwlab) == reloads
    assert fwlab.status()["state"] == "none"
    assert fwlab.lab.new_login_ok()


def _move_port(fw: FwLab, timeout: int) -> dict[str, object]:
    rules = fw.write("port2222.rules", PORT_2222)
    result = fw.lab.ssh(f"fwsafe apply --detach --json --timeout {timeout} {rules} "
                        f"--sshd-set Port=2222 --sshd-config {_config(fw)}", timeout=120)
    assert result.returncode == 0, result.stderr
    armed: dict[str, object] = json.loads(result.stdout)
    assert armed["state"] == "pending" and "ipv4" in armed["layers"]  # type: ignore[operator]
    assert fw.lab.new_connection_ok(port=2222), "sshd does not answer on the new port"
    assert not fw.lab.new_connection_ok(port=22), "the old port is still open"
    return armed


def test_port_move_with_the_firewall_in_one_window_confirmed(fwlab: FwLab) -> None:
    armed = _move_port(fwlab, 60)
    confirm = _confirm_on(fwlab, 2222, str(armed["id"]))
    assert confirm.returncode == 0, confirm.stderr
    assert fwlab.status()["state"] == "confirmed"
    assert _effective(fwlab, "port") == ["2222"]
    assert fwlab.lab.new_connection_ok(port=2222)
    assert not fwlab.lab.new_connection_ok(port=22)


def test_port_move_reverts_firewall_and_sshd_together(fwlab: FwLab) -> None:
    cfg = _config(fwlab)
    before, rules_before = cfg.read_bytes(), fwlab.lab.ruleset()
    _move_port(fwlab, 6)
    info = fwlab.wait_state({"reverted", "revert-failed"}, 30)
    assert info["state"] == "reverted", info
    assert cfg.read_bytes() == before
    assert fwlab.lab.ruleset() == rules_before
    assert fwlab.lab.wait_new_login(deadline_s=10) is not None
    assert not fwlab.lab.new_connection_ok(port=2222)


def _permissive(fw: FwLab) -> None:
    """The lab's sshd with passwords and root passwords allowed, as many servers start out."""
    cfg = _config(fw)
    text = cfg.read_text()
    for old, new in (("PasswordAuthentication no", "PasswordAuthentication yes"),
                     ("KbdInteractiveAuthentication no", "KbdInteractiveAuthentication yes"),
                     ("PermitRootLogin prohibit-password", "PermitRootLogin yes")):
        text = text.replace(old, new)
    cfg.write_text(text)
    assert fw.lab.sshd_pid is not None
    os.kill(fw.lab.sshd_pid, signal.SIGHUP)
    time.sleep(0.5)
    assert fw.lab.wait_new_login(deadline_s=10) is not None


def test_harden_with_a_key_is_confirmed(fwlab: FwLab) -> None:
    _permissive(fwlab)
    assert _effective(fwlab, "passwordauthentication") == ["yes"]
    result = _sshd(fwlab, "harden --sshd-config CFG --detach --json --timeout 30")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr  # an Ed25519 key
    confirm = fwlab.lab.ssh(f"fwsafe confirm {json.loads(result.stdout)['id']}")
    assert confirm.returncode == 0, confirm.stderr
    assert fwlab.status()["state"] == "confirmed"
    assert _effective(fwlab, "passwordauthentication") == ["no"]
    assert _effective(fwlab, "kbdinteractiveauthentication") == ["no"]
    assert _effective(fwlab, "permitrootlogin") == ["without-password"]
    again = _sshd(fwlab, "harden --sshd-config CFG --json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False


def test_harden_without_a_key_is_refused(fwlab: FwLab) -> None:
    _permissive(fwlab)
    cfg = _config(fwlab)
    before = cfg.read_bytes()
    keys = fwlab.lab.workdir / "authorized_keys"
    # In one session (logged in with the key): the key goes, harden is tried, the key returns.
    result = fwlab.lab.ssh(
        f"cp {keys} {keys}.bak && echo '# no key' > {keys}; "
        f"fwsafe sshd harden --sshd-config {cfg} --timeout 30; rc=$?; "
        f"cp {keys}.bak {keys}; exit $rc", timeout=90)
    assert result.returncode == 3, result.stderr
    assert "no authorized key" in result.stderr and "PasswordAuthentication no" in result.stderr
    assert cfg.read_bytes() == before
    assert fwlab.status()["state"] == "none"
    assert fwlab.lab.new_login_ok()


def test_guard_killed_the_backstop_puts_sshd_config_back(fwlab: FwLab) -> None:
    cfg = _config(fwlab)
    before = cfg.read_bytes()
    forced = _sshd(fwlab, "set --sshd-config CFG --force --detach --json --timeout 60 "
                          "AllowUsers=nobody")
    assert forced.returncode == 0, forced.stderr
    info = fwlab.status()
    assert info["state"] == "pending" and not fwlab.lab.new_login_ok()
    os.kill(int(info["guard_pid"]), signal.SIGKILL)   # the guard we started, by PID
    done = fwlab.wait_state({"reverted", "revert-failed"}, 20)
    assert done["state"] == "reverted" and done["reverted_by"] == "backstop"
    assert cfg.read_bytes() == before
    assert fwlab.lab.wait_new_login(deadline_s=10) is not None


def test_a_drop_in_directory_gets_fwsafes_drop_in_and_a_revert_removes_it(fwlab: FwLab) -> None:
    cfg = _config(fwlab)
    dropins = fwlab.lab.workdir / "sshd_config.d"
    dropins.mkdir()
    (dropins / "50-cloud-init.conf").write_text("MaxSessions 3\n")
    cfg.write_text(f"Include {dropins}/*.conf\n" + cfg.read_text())  # Debian's layout
    assert fwlab.lab.sshd_pid is not None
    os.kill(fwlab.lab.sshd_pid, signal.SIGHUP)
    assert fwlab.lab.wait_new_login(deadline_s=10) is not None
    before = {p.name: p.read_bytes() for p in (cfg, dropins / "50-cloud-init.conf")}
    result = _sshd(fwlab, "set --sshd-config CFG --detach --timeout 5 MaxSessions=7")
    assert result.returncode == 0, result.stderr
    ours = dropins / "00-fwsafe.conf"
    assert f"sshd: {ours} (new file, read before the other drop-ins" in result.stderr
    assert _effective(fwlab, "maxsessions") == ["7"]
    assert {p.name: p.read_bytes() for p in (cfg, dropins / "50-cloud-init.conf")} == before
    assert fwlab.wait_state({"reverted", "revert-failed"}, 20)["state"] == "reverted"
    assert not ours.exists()
    assert {p.name: p.read_bytes() for p in (cfg, dropins / "50-cloud-init.conf")} == before
    assert _effective(fwlab, "maxsessions") == ["3"]
    assert fwlab.lab.wait_new_login(deadline_s=10) is not None
