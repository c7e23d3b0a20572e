"""`fwsafe apply --host` end to end: the workstation (client namespace) changes the server's
firewall over SSH and confirms only through a NEW SSH login. Real sshd, real netfilter."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest

from fwsafe.lab import LabTimeout
from tests.bins import FWSAFE
from tests.conftest import FwLab
from tests.rulesets import DROP_NEW_SSH, GOOD

pytestmark = pytest.mark.lab

# The console script next to the running interpreter (no pyenv shim in between).

GOOD_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 4443 -j ACCEPT
COMMIT
"""
# Cuts every SSH packet over IPv6 both ways, established ones included: the very connection
# that runs the apply goes silent before the apply's answer gets out.
DROP_SSH_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j DROP
-A OUTPUT -p tcp -m tcp --sport 22 -j DROP
COMMIT
"""
# Keeps SSH but cuts the web service on 8080.
CUT_8080 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 8080 -j DROP
COMMIT
"""
KEEP_8080 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
"""

_UPLOAD_RE = re.compile(r"to \S+:(/\S*fwsafe-upload\.\w+) via")

# A client in the client namespace that waits until a TCP port accepts connections.
_WAIT_PORT = """\
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + limit
while time.monotonic() < end:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
"""


def apply_host(fw: FwLab, *args: str, host: str | None = None, known_hosts: Path | None = None,
               timeout: float = 6, limit: float = 200) -> subprocess.CompletedProcess[str]:
    """`fwsafe apply --host ... --json` run on the workstation (the client namespace)."""
    lab = fw.lab
    argv = [FWSAFE, "apply", "--host", host or f"root@{lab.srv_ip4}", "-i", str(lab.key),
            "--known-hosts", str(known_hosts or lab.known_hosts), "--timeout", f"{timeout:g}",
            "--json", *args]
    return lab.cli_exec(argv, check=False, timeout=limit)


def upload_dir(stderr: str) -> Path:
    match = _UPLOAD_RE.search(stderr)
    assert match, f"no upload directory in the progress output:\n{stderr}"
    return Path(match.group(1))


def accepted_logins(fw: FwLab) -> int:
    assert fw.lab.sshd_log is not None
    return fw.lab.sshd_log.read_text(errors="replace").count("Accepted publickey")


def nothing_changed(fw: FwLab, before: str, states: tuple[str, ...] = ("none",)) -> None:
    assert fw.lab.ruleset() == before
    assert fw.status()["state"] in states


def start_web(fw: FwLab) -> None:
    fw.lab.srv_popen([sys.executable, "-m", "http.server", "--bind", fw.lab.srv_ip4, "8080"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = fw.lab.cli_exec([sys.executable, "-c", _WAIT_PORT, fw.lab.srv_ip4, "8080", "15"],
                            check=False, timeout=30)
    assert ready.returncode == 0, "the web server in the server namespace did not come up"


# --------------------------------------------------------------------------------------------
# (a) the sneaky lockout: established connections live on, new ones are dropped
# --------------------------------------------------------------------------------------------


def test_drop_new_ssh_is_reverted_although_the_old_session_works(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    lab = fwlab.lab
    argv = [FWSAFE, "apply", "--host", f"root@{lab.srv_ip4}", "-i", str(lab.key),
            "--known-hosts", str(lab.known_hosts), "--timeout", "6", "--json", "--force", str(rules)]
    # An admin's session opened before the change: it stays alive under the new rules.
    old = lab.ssh_popen("echo ready; exec sleep 60", tty=False, stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert old.stdout is not None and old.stdout.readline() == b"ready\n"
    started = time.monotonic()
    proc = lab.cli_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    info = fwlab.wait_state({"pending"}, 20)
    assert info["state"] == "pending"
    assert not lab.new_connection_ok(timeout=0.5), "the rules that drop new SSH are not live"
    assert old.poll() is None, "the established session should survive these rules"
    raw_out, raw_err = proc.communicate(timeout=200)   # text=True: str, whatever the stub says
    out, err = cast(str, raw_out), cast(str, raw_err)
    elapsed = time.monotonic() - started
    assert proc.returncode == 4, err
    result = json.loads(out)
    assert result["ok"] is False and result["kind"] == "RevertedError"
    assert "reverted" in result["error"] and "timeout" in result["error"]
    assert "new login #1 failed" in err
    assert "no new SSH login confirmed before the deadline" in err
    assert lab.ruleset() == before
    assert lab.new_login_ok()
    status = fwlab.status()
    assert status["state"] == "reverted" and status["reason"].startswith("timeout")
    assert status["id"] in result["error"]
    assert elapsed < 6 + 15
    assert not upload_dir(err).exists()


# --------------------------------------------------------------------------------------------
# (b) good rules: confirmed through a new login, and in force after the deadline
# --------------------------------------------------------------------------------------------


def test_good_rules_confirmed_through_a_new_login(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    result = apply_host(fwlab, str(rules), timeout=6)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["state"] == "confirmed"
    assert data["host"] == f"root@{fwlab.lab.srv_ip4}:22"
    assert 0 < data["armed_s"] < data["first_new_login_s"] <= data["confirmed_s"]
    assert data["remote"]["state"] == "confirmed"
    for step in ("connected to", "uploaded", "armed:", "applied:", "probing:", "confirmed"):
        assert step in result.stderr, step
    assert not upload_dir(result.stderr).exists()
    time.sleep(6.5)  # past the deadline: still in force
    assert "--dport 443" in fwlab.lab.srv_exec(["iptables-save"]).stdout
    status = fwlab.status()
    assert status["state"] == "confirmed" and status["id"] == data["id"]
    assert "new SSH connection" in status["reason"]
    assert status["confirmed_by"]["SSH_CONNECTION"] != status["who"]["SSH_CONNECTION"]


def test_hashed_known_hosts_entries_are_understood(fwlab: FwLab) -> None:
    known = fwlab.lab.workdir / "hashed_known_hosts"
    known.write_text(fwlab.lab.known_hosts.read_text())
    fwlab.lab.srv_exec(["ssh-keygen", "-q", "-H", "-f", str(known)])
    assert fwlab.lab.srv_ip4 not in known.read_text()
    rules = fwlab.write("good.rules", GOOD)
    result = apply_host(fwlab, str(rules), known_hosts=known)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------
# (c) probes run by the guard on the host
# --------------------------------------------------------------------------------------------


def test_failing_guard_probe_reverts_early(fwlab: FwLab) -> None:
    start_web(fwlab)
    before = fwlab.lab.ruleset()
    rules = fwlab.write("cut-8080.rules", CUT_8080)
    url = f"tcp://{fwlab.lab.srv_ip4}:8080"
    started = time.monotonic()
    result = apply_host(fwlab, "--probe", url, "--probe-failures", "2", str(rules), timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    assert url in json.loads(result.stdout)["error"]
    assert elapsed < 15, f"took {elapsed:.1f} s, the deadline was 30 s"
    assert fwlab.lab.ruleset() == before
    status = fwlab.status()
    assert status["state"] == "reverted" and url in status["reason"]
    applied = next(e["t"] for e in status["events"] if e["event"] == "pending")
    reverted = next(e["t"] for e in status["events"] if e["event"] == "reverted")
    assert reverted - applied < 10
    assert fwlab.lab.new_login_ok()


def test_passing_guard_probe_then_new_login_confirms(fwlab: FwLab) -> None:
    start_web(fwlab)
    rules = fwlab.write("keep-8080.rules", KEEP_8080)
    url = f"tcp://{fwlab.lab.srv_ip4}:8080"
    result = apply_host(fwlab, "--probe", url, "--probe-interval", "1", "--probe-failures", "1",
                        str(rules), timeout=30)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["state"] == "confirmed" and data["confirmed_via"] == "through a new SSH login"
    # The probes had their time to fail first.
    assert data["confirmed_s"] - data["armed_s"] >= data["probe_settle_s"] - 0.5
    assert "new SSH connection" in fwlab.status()["reason"]


def test_confirm_on_probe_on_the_server_confirms_by_itself(fwlab: FwLab) -> None:
    start_web(fwlab)
    rules = fwlab.write("keep-8080.rules", KEEP_8080)
    url = f"tcp://{fwlab.lab.srv_ip4}:8080"
    started = time.monotonic()
    result = fwlab.fw("apply", "--probe", url, "--confirm-on-probe", "2", "--probe-interval", "1",
                      "--yes", "--timeout", "30", "--json", str(rules))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "confirmed"
    assert time.monotonic() - started < 15
    status = fwlab.status()
    assert status["state"] == "confirmed" and "probe" in status["reason"]
    assert "--dport 443" in fwlab.lab.srv_exec(["iptables-save"]).stdout


# --------------------------------------------------------------------------------------------
# (d) host keys: unknown refused, accept-new records, changed always refused
# --------------------------------------------------------------------------------------------


def test_unknown_host_key_is_refused_before_anything_is_sent(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    logins = accepted_logins(fwlab)
    empty = fwlab.write("empty_known_hosts", "")
    rules = fwlab.write("good.rules", GOOD)
    result = apply_host(fwlab, str(rules), known_hosts=empty)
    assert result.returncode == 3, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "UnknownHostKeyError"
    assert "not in" in data["error"] and "SHA256:" in data["error"]
    assert "--accept-new-host-key" in data["hint"]
    assert empty.read_text() == ""
    assert accepted_logins(fwlab) == logins  # refused before even logging in
    nothing_changed(fwlab, before)


def test_accept_new_host_key_records_it_and_goes_on(fwlab: FwLab) -> None:
    known = fwlab.write("new_known_hosts", "# my hosts\n")
    rules = fwlab.write("good.rules", GOOD)
    result = apply_host(fwlab, "--accept-new-host-key", str(rules), known_hosts=known)
    assert result.returncode == 0, result.stderr
    assert "accepted the new host key" in result.stderr
    key_type, key_b64 = Path(f"{fwlab.lab.host_key}.pub").read_text().split()[:2]
    lines = known.read_text().splitlines()
    assert lines[0] == "# my hosts"
    assert lines[1:] == [f"{fwlab.lab.srv_ip4} {key_type} {key_b64}"]
    # Known now: the next run needs no flag.
    rules2 = fwlab.write("good2.rules", GOOD.replace("443", "8443"))
    again = apply_host(fwlab, str(rules2), known_hosts=known)
    assert again.returncode == 0, again.stderr
    assert known.read_text().count(key_b64) == 1


def test_changed_host_key_is_always_refused(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    logins = accepted_logins(fwlab)
    other = fwlab.lab.workdir / "other_host_key"
    fwlab.lab.srv_exec(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    key_type, key_b64 = Path(f"{other}.pub").read_text().split()[:2]
    known = fwlab.write("changed_known_hosts", f"{fwlab.lab.srv_ip4} {key_type} {key_b64}\n")
    rules = fwlab.write("good.rules", GOOD)
    for extra in ((), ("--accept-new-host-key",)):
        result = apply_host(fwlab, *extra, str(rules), known_hosts=known)
        assert result.returncode == 3, result.stderr
        data = json.loads(result.stdout)
        assert data["kind"] == "ChangedHostKeyError"
        assert "HOST KEY CHANGED" in data["error"]
    assert known.read_text() == f"{fwlab.lab.srv_ip4} {key_type} {key_b64}\n"
    assert accepted_logins(fwlab) == logins
    nothing_changed(fwlab, before)


# --------------------------------------------------------------------------------------------
# (e) configuration and remote errors
# --------------------------------------------------------------------------------------------


def test_config_typo_is_a_usage_error_naming_the_key(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    config = fwlab.write("fwsafe.toml", "timout = 5\n")
    rules = fwlab.write("good.rules", GOOD)
    result = apply_host(fwlab, "--config", str(config), str(rules))
    assert result.returncode == 2, result.stderr
    assert "'timout'" in result.stderr and "timeout" in result.stderr
    nothing_changed(fwlab, before)


def test_named_host_from_the_config(fwlab: FwLab) -> None:
    lab = fwlab.lab
    config = fwlab.write("hosts.toml", f'[hosts.lab]\nhost = "{lab.srv_ip4}"\nuser = "root"\n'
                                       f'key = "{lab.key}"\nknown_hosts = "{lab.known_hosts}"\n')
    rules = fwlab.write("good.rules", GOOD)
    result = lab.cli_exec([FWSAFE, "apply", "--config", str(config), "--host", "lab", "--timeout",
                           "6", "--json", str(rules)], check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "confirmed"


def test_invalid_rules_on_the_host_exit_3_with_the_local_file_name(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("broken.rules", "*filter\n-A INPUT -p tcp --dport 22 -j NOPE\nCOMMIT\n")
    result = apply_host(fwlab, str(rules))
    assert result.returncode == 3, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "InvalidRulesError"
    assert str(rules) in data["error"]
    assert "fwsafe-upload" not in data["error"]
    assert not upload_dir(result.stderr).exists()
    nothing_changed(fwlab, before, ("none", "rejected"))


def test_pending_transaction_on_the_host_exits_6(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    armed = fwlab.fw("apply", "--detach", "--timeout", "30", str(rules))
    assert armed.returncode == 0, armed.stderr
    result = apply_host(fwlab, str(rules))
    assert result.returncode == 6, result.stderr
    assert json.loads(result.stdout)["kind"] == "PendingError"
    assert fwlab.fw("revert").returncode == 4


# --------------------------------------------------------------------------------------------
# (f) IPv6
# --------------------------------------------------------------------------------------------


def test_ipv6_literal_host(fwlab: FwLab) -> None:
    lab = fwlab.lab
    rules = fwlab.write("good.rules", GOOD)
    rules6 = fwlab.write("good.rules6", GOOD_V6)
    result = apply_host(fwlab, str(rules), "--rules6", str(rules6), host=f"root@[{lab.srv_ip6}]")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["host"] == f"root@[{lab.srv_ip6}]:22"
    assert "--dport 4443" in lab.srv_exec(["ip6tables-save"]).stdout
    assert fwlab.status()["state"] == "confirmed"


def test_ipv6_rules_that_cut_the_applying_connection_are_reverted(fwlab: FwLab) -> None:
    lab = fwlab.lab
    before = lab.ruleset()
    rules6 = fwlab.write("drop-ssh.rules6", DROP_SSH_V6)
    result = apply_host(fwlab, "--force", "--rules6", str(rules6), host=f"root@[{lab.srv_ip6}]")
    assert result.returncode == 4, result.stderr
    assert "went silent" in result.stderr
    assert lab.ruleset() == before
    assert lab.new_login_ok(ipv6=True)
    assert fwlab.status()["state"] == "reverted"


def test_host_that_does_not_answer_is_exit_3_nothing_changed(fwlab: FwLab) -> None:
    lab = fwlab.lab
    before = lab.ruleset()
    rules = fwlab.write("good.rules", GOOD)
    try:
        result = apply_host(fwlab, str(rules), host=f"root@{lab.srv_ip4}:2222", limit=60)
    except LabTimeout:  # pragma: no cover - reported as a failure below
        pytest.fail("apply --host to a closed port did not return")
    assert result.returncode == 3, result.stderr
    assert "connection refused" in json.loads(result.stdout)["error"]
    nothing_changed(fwlab, before)


# --------------------------------------------------------------------------------------------
# examples/deploy.sh drives `fwsafe apply --host` and branches on its exit codes
# --------------------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[2] / "examples" / "deploy.sh"


def test_deploy_script_branches_on_exit_codes(fwlab: FwLab) -> None:
    lab = fwlab.lab
    logs = lab.workdir / "deploy-logs"

    def deploy(rules: Path) -> subprocess.CompletedProcess[str]:
        return lab.cli_exec(["env", f"FWSAFE={FWSAFE}", f"DEPLOY_LOGS={logs}", "bash",
                             str(DEPLOY), "-t", "6", "-i", str(lab.key), "-k",
                             str(lab.known_hosts), str(rules), f"root@{lab.srv_ip4}"],
                            check=False, timeout=200)

    good = deploy(fwlab.write("good.rules", GOOD))
    assert good.returncode == 0, good.stderr
    assert "confirmed through a new SSH login" in good.stderr
    assert f"hosts that KEEP the new rules: root@{lab.srv_ip4}" in good.stderr
    log = logs / f"root_{lab.srv_ip4}.json"
    assert json.loads(log.read_text())["state"] == "confirmed"
    broken = deploy(fwlab.write("broken.rules", "*filter\n-A INPUT -j NOPE\nCOMMIT\n"))
    assert broken.returncode == 3, broken.stderr
    assert "REJECTED before any change" in broken.stderr
    assert "no host was changed" in broken.stderr


def test_predicted_lockout_refused_on_the_host_nothing_changed(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    result = apply_host(fwlab, str(fwlab.write("drop-new.rules", DROP_NEW_SSH)))
    assert result.returncode == 3, result.stderr
    assert "lockout predicted" in result.stderr
    assert fwlab.lab.ruleset() == before
