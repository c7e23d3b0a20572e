"""The core, end to end: real sshd, real netfilter, fwsafe driven over SSH as a person would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fwsafe.lab import MemoryCgroup, PidsCgroup
from tests.bins import FWSAFE
from tests.conftest import FwLab
from tests.rulesets import DROP_ALL, DROP_NEW_SSH, GOOD

pytestmark = pytest.mark.lab

DROP_SSH_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j DROP
COMMIT
"""


def _read_until(proc: subprocess.Popen[bytes], pattern: str, limit_s: float) -> str:
    """Read the session's output until `pattern` appears (returns all read so far)."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            chunk = proc.stdout.read(4096)
        except BlockingIOError:
            chunk = None
        if chunk:
            seen += chunk
            if re.search(pattern, seen.decode(errors="replace")):
                return seen.decode(errors="replace")
        elif proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not seen in session output: {seen.decode(errors='replace')!r}")


def _session(fw: FwLab, command: str) -> subprocess.Popen[bytes]:
    return fw.lab.ssh_popen(command, tty=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_drop_everything_session_dies_guard_reverts(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-all.rules", DROP_ALL)
    session = _session(fwlab, f"fwsafe apply --force --timeout 5 {rules}")
    _read_until(session, r"left", 20)
    applied = time.monotonic()
    assert not fwlab.lab.new_connection_ok(timeout=0.5), "the lockout rules are not live"
    session.kill()  # the admin's session is gone
    session.wait()
    waited = fwlab.lab.wait_new_login(deadline_s=15)
    assert waited is not None, "SSH never came back"
    assert time.monotonic() - applied < 5 + 4
    assert fwlab.lab.ruleset() == before
    info = fwlab.status()
    assert info["state"] == "reverted"
    # Either the hang-up reached the CLI (revert at once) or the deadline did.
    assert re.search(r"timeout|hung up", info["reason"])


def test_drop_new_only_session_stays_alive_and_is_told(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    session = _session(fwlab, f"fwsafe apply --force --timeout 4 {rules}")
    out = _read_until(session, r"left", 20)
    assert not fwlab.lab.new_connection_ok(timeout=0.5)
    # Nobody answers: the still-alive session sees the revert and exits 4 (never 0).
    out += _read_until(session, r"reverted", 15)
    assert session.wait(timeout=10) == 4
    assert "NEW SSH session" in out
    assert fwlab.lab.new_login_ok()
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["reason"].startswith("timeout")


def test_interactive_yes_keeps_the_change(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    session = _session(fwlab, f"fwsafe apply --timeout 4 {rules}")
    _read_until(session, r"left", 20)
    assert session.stdin is not None
    session.stdin.write(b"y\r")  # 'y' alone is not enough
    session.stdin.flush()
    _read_until(session, r"whole word", 5)
    session.stdin.write(b"yes\r")
    session.stdin.flush()
    _read_until(session, r"confirmed", 10)
    assert session.wait(timeout=10) == 0
    time.sleep(4.5)  # past the deadline: still in force
    assert "--dport 443" in fwlab.lab.srv_exec(["iptables-save"]).stdout
    info = fwlab.status()
    assert info["state"] == "confirmed"
    assert "SAME SSH connection" in info["reason"]


def test_interactive_no_reverts_at_once(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("good.rules", GOOD)
    session = _session(fwlab, f"fwsafe apply --timeout 30 {rules}")
    _read_until(session, r"left", 20)
    assert session.stdin is not None
    session.stdin.write(b"no\r")
    session.stdin.flush()
    assert session.wait(timeout=10) == 4
    assert fwlab.lab.ruleset() == before
    assert "declined" in fwlab.status()["reason"]


def test_detach_then_confirm_from_a_new_session(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    result = fwlab.lab.ssh(f"fwsafe apply --detach --json --timeout 5 {rules}")
    assert result.returncode == 0, result.stderr
    armed = json.loads(result.stdout)
    assert armed["state"] == "pending" and armed["confirm_command"].startswith("fwsafe confirm")
    assert 0 < armed["deadline"] - time.time() <= 5
    confirm = fwlab.lab.ssh(f"fwsafe confirm {armed['id']}")
    assert confirm.returncode == 0, confirm.stderr
    assert "new SSH connection" in confirm.stdout
    time.sleep(5.5)
    assert "--dport 443" in fwlab.lab.srv_exec(["iptables-save"]).stdout
    assert fwlab.status()["state"] == "confirmed"


def test_detach_without_confirm_reverts_and_confirm_is_too_late(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    result = fwlab.lab.ssh(f"fwsafe apply --force --timeout 3 {rules}")  # no tty: detaches by itself
    assert result.returncode == 0, result.stderr
    assert "fwsafe confirm" in result.stdout
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before
    late = fwlab.lab.ssh("fwsafe confirm")
    assert late.returncode == 4
    assert "too late" in late.stderr


def test_sigkill_of_apply_process_still_reverts(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    session = _session(fwlab, f"echo CLI-PID=$$; exec fwsafe apply --force --timeout 4 {rules}")
    out = _read_until(session, r"left", 20)
    match = re.search(r"CLI-PID=(\d+)", out)
    assert match
    fwlab.lab.srv_exec(["kill", "-9", match.group(1)])
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before
    assert fwlab.lab.new_login_ok()


def test_extend_pushes_the_deadline(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    armed = json.loads(fwlab.fw("apply", "--json", "--timeout", "3", str(rules)).stdout)
    extended = fwlab.lab.ssh("fwsafe extend 5 --json")
    assert extended.returncode == 0, extended.stderr
    assert json.loads(extended.stdout)["deadline"] == pytest.approx(armed["deadline"] + 5)
    time.sleep(4)  # past the original deadline
    assert fwlab.status()["state"] == "pending"
    assert fwlab.wait_state({"reverted"}, 6)["state"] == "reverted"
    assert "extended" in fwlab.status()["reason"]


@pytest.mark.parametrize("content,expect", [
    ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j NOPE\nCOMMIT\n",
     r"bad\.rules:3: `-A INPUT -p tcp --dport 22 -j NOPE`: Chain 'NOPE' does not exist"),
    ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --bogus 22 -j ACCEPT\nCOMMIT\n",
     r"bad\.rules:3: .*unknown option"),
    ("table inet filter {\n  chain input { type filter hook input priority 0; }\n}\n",
     r"bad\.rules:1: this is nftables syntax"),
    ("", r"bad\.rules: the file is empty"),
    ("just some text\n", r"no table found"),
])
def test_malformed_rules_change_nothing(fwlab: FwLab, content: str, expect: str) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("bad.rules", content)
    backend = "--backend iptables " if content.startswith("table") else ""
    result = fwlab.lab.ssh(f"fwsafe apply {backend}--timeout 5 {rules}")
    assert result.returncode == 3, result.stderr
    first = result.stderr.splitlines()[0]
    assert re.search(expect, first), first
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["state"] in ("none", "rejected")
    assert fwlab.fw("apply", "--timeout", "5", str(fwlab.write("ok.rules", GOOD))).returncode == 0


def test_missing_file_and_not_root(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    missing = fwlab.lab.ssh("fwsafe apply /nonexistent.rules")
    assert missing.returncode == 3 and "/nonexistent.rules: no such file" in missing.stderr
    rules = fwlab.write("good.rules", GOOD)
    # A user namespace makes fwsafe run with euid 1000 (file access stays that of root).
    nobody = fwlab.lab.srv_exec(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", "env",
         f"FWSAFE_STATE_DIR={fwlab.lab.workdir}/nobody-state", FWSAFE, "apply", str(rules)],
        check=False)
    assert nobody.returncode == 3 and "must run as root" in nobody.stderr
    assert fwlab.lab.ruleset() == before


def test_second_apply_while_pending_exits_6(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    assert fwlab.fw("apply", "--timeout", "30", str(rules)).returncode == 0
    after_first = fwlab.lab.ruleset()
    other = fwlab.write("other.rules", DROP_NEW_SSH)
    second = fwlab.lab.ssh(f"fwsafe apply --timeout 30 {other}")
    assert second.returncode == 6
    assert "pending" in second.stderr
    assert fwlab.lab.ruleset() == after_first
    revert = fwlab.lab.ssh("fwsafe revert")
    assert revert.returncode == 4  # reverted: exit 4, never 0


def test_ipv6_only_rules(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules6 = fwlab.write("drop22.rules6", DROP_SSH_V6)
    result = fwlab.fw("apply", "--json", "--timeout", "4", "--rules6", str(rules6))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == ["ipv6"]
    assert not fwlab.lab.new_connection_ok(ipv6=True, timeout=0.5)
    assert fwlab.lab.new_connection_ok(timeout=1)  # IPv4 untouched
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.new_login_ok(ipv6=True)
    assert fwlab.lab.ruleset() == before


def test_ipv4_and_ipv6_revert_together(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    rules6 = fwlab.write("drop22.rules6", DROP_SSH_V6)
    assert fwlab.fw("apply", "--timeout", "3", str(rules), "--rules6", str(rules6)).returncode == 0
    assert not fwlab.lab.new_connection_ok(timeout=0.5)
    assert not fwlab.lab.new_connection_ok(ipv6=True, timeout=0.5)
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before


def test_second_family_refused_puts_first_back(fwlab: FwLab) -> None:
    """IPv6 passes --test but fails on the real restore: IPv4 must be put back, exit 3."""
    before = fwlab.lab.ruleset()
    rules = fwlab.write("good.rules", GOOD)
    bad6 = fwlab.write("bad.rules6", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j MISSING\nCOMMIT\n")
    result = fwlab.fw("apply", "--timeout", "30", str(rules), "--rules6", str(bad6))
    assert result.returncode == 3, result.stderr
    assert "bad.rules6:3" in result.stderr and "MISSING" in result.stderr
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["state"] == "rejected"


def _guard_pid(fw: FwLab) -> int:
    pid = fw.status()["guard_pid"]
    assert isinstance(pid, int)
    return pid


def test_guard_oom_shield_is_reported_truthfully(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    assert fwlab.fw("apply", "--timeout", "30", str(rules)).returncode == 0
    info = fwlab.status()
    adj = int(Path(f"/proc/{_guard_pid(fwlab)}/oom_score_adj").read_text())
    assert info["shielded"] is (adj == -1000)
    text = fwlab.fw("status").stdout
    if info["shielded"]:
        assert "shielded from the OOM killer" in text
    else:  # this development machine: no CAP_SYS_RESOURCE
        assert "NOT shielded" in text and "CAP_SYS_RESOURCE" in info["shield_error"]
        log = (fwlab.state_dir / "tx" / info["id"] / "guard.log").read_text()
        assert "NOT shielded" in log
    # The guard is detached: its own session, no terminal, parent is not the CLI.
    fields = Path(f"/proc/{_guard_pid(fwlab)}/stat").read_text().rsplit(")", 1)[1].split()
    sshd_sid = Path(f"/proc/{fwlab.lab.sshd_pid}/stat").read_text().rsplit(")", 1)[1].split()[3]
    assert int(fields[4]) == 0  # no controlling terminal
    assert fields[3] != sshd_sid and int(fields[3]) != _guard_pid(fwlab)  # own session, not leader
    assert fwlab.lab.ssh("fwsafe revert").returncode == 4


def test_guard_reverts_on_time_while_its_cgroup_runs_out_of_memory(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    with MemoryCgroup(f"fwsafe-test-{os.getpid()}", 96 * 1024 * 1024) as cgroup:
        armed = json.loads(fwlab.fw_in_cgroup(cgroup, "apply", "--json", "--timeout", "5",
                                              str(rules)).stdout)
        guard = armed["guard_pid"]
        assert guard in cgroup.pids()
        # A hog in the same cgroup allocates until the OOM killer strikes, again and again.
        hog = subprocess.Popen(cgroup.wrap_argv(
            ["sh", "-c", "while true; do python3 -c 'b=[]\nwhile True: b.append(bytearray(1<<20))'"
                         "; done"]), start_new_session=True)
        try:
            info = fwlab.wait_state({"reverted", "revert-failed"}, 12)
            reverted_at = time.time()
        finally:
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
        assert info["state"] == "reverted", info
        assert cgroup.oom_kills() > 0
        assert reverted_at - armed["deadline"] < 3.0
    assert fwlab.lab.ruleset() == before


def test_revert_retries_while_no_process_can_be_started(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    with PidsCgroup(f"fwsafe-test-{os.getpid()}", None) as cgroup:
        armed = json.loads(fwlab.fw_in_cgroup(cgroup, "apply", "--json", "--timeout", "2",
                                              str(rules)).stdout)
        # Once the guard has captured what the change touched (the CLI returns before that),
        # only the guard and its watcher are left: from then on the guard can no longer fork.
        record = fwlab.state_dir / "tx" / armed["id"] / "record.json"
        end = time.monotonic() + 5
        while not json.loads(record.read_text()).get("touched") and time.monotonic() < end:
            time.sleep(0.02)
        cgroup.set_max(cgroup.current())
        time.sleep(4)  # past the deadline: it keeps trying
        assert fwlab.status()["state"] == "reverting"
        assert not fwlab.lab.new_connection_ok(timeout=0.5)
        cgroup.set_max(None)
        info = fwlab.wait_state({"reverted", "revert-failed"}, 10)
        assert info["state"] == "reverted", info
        log = (fwlab.state_dir / "tx" / armed["id"] / "guard.log").read_text()
        assert "cannot start" in log
    assert fwlab.lab.ruleset() == before


def test_guard_reverts_even_when_the_state_files_are_deleted(fwlab: FwLab) -> None:
    """The guard holds the snapshot in memory: a session that deletes the saved rules (as
    iptables-apply's own HUP trap does) cannot stop the revert."""
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    armed = json.loads(fwlab.fw("apply", "--json", "--timeout", "3", str(rules)).stdout)
    tx_dir = fwlab.state_dir / "tx" / armed["id"]
    for snap in tx_dir.glob("before.*"):
        snap.unlink()
    (tx_dir / "change.ipv4").unlink()
    assert fwlab.wait_state({"reverted", "revert-failed"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before
    assert fwlab.lab.new_login_ok()


def test_predicted_lockout_is_refused_unless_forced(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    refused = fwlab.lab.ssh(f"fwsafe apply --timeout 30 {rules}")
    assert refused.returncode == 3, refused.stderr
    assert "lockout predicted" in refused.stderr and "drop-new.rules:6" in refused.stderr
    assert "--force" in refused.stderr
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["state"] == "none"
    # Forced: applied, the countdown says what the check predicted, the guard still reverts.
    session = _session(fwlab, f"fwsafe apply --force --timeout 3 {rules}")
    out = _read_until(session, r"left", 20)
    assert "LOCKOUT PREDICTED (applied with --force)" in out
    assert session.wait(timeout=15) == 4
    assert fwlab.lab.ruleset() == before


def test_good_rules_pass_the_check_and_say_so(fwlab: FwLab) -> None:
    rules = fwlab.write("good.rules", GOOD)
    session = _session(fwlab, f"fwsafe apply --timeout 3 {rules}")
    out = _read_until(session, r"left", 20)
    assert f"the SSH path stays open for {fwlab.lab.cli_ip4}" in out
    assert session.wait(timeout=15) == 4


# -- the guard starts standing by, while the change is read and checked ---------------------------
def _guards_of(fw: FwLab) -> list[tuple[int, list[bytes]]]:
    """This lab's guard processes (standing by or not): (PID, argv)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fwsafe.guard" in argv and str(fw.state_dir).encode() in argv:
            found.append((int(entry), argv))
    return found


def _tx_dirs(fw: FwLab) -> set[str]:
    tx = fw.state_dir / "tx"
    return {p.name for p in tx.iterdir()} if tx.exists() else set()


def _wait_no_guard(fw: FwLab, limit_s: float = 5) -> None:
    end = time.monotonic() + limit_s
    while _guards_of(fw) and time.monotonic() < end:
        time.sleep(0.05)
    assert _guards_of(fw) == []


@pytest.mark.parametrize("content", [
    "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j NOPE\nCOMMIT\n",   # refused by the validation
    DROP_ALL,                                                      # by the lockout check
])
def test_a_refused_change_leaves_no_guard_and_no_transaction(fwlab: FwLab, content: str) -> None:
    before, dirs = fwlab.lab.ruleset(), _tx_dirs(fwlab)
    rules = fwlab.write("refused.rules", content)
    result = fwlab.lab.ssh(f"fwsafe apply --timeout 30 {rules}")
    assert result.returncode == 3, result.stderr
    _wait_no_guard(fwlab)   # the guard that stood by was called off and exited
    assert _tx_dirs(fwlab) == dirs
    assert fwlab.lab.ruleset() == before


def _slow_to_check(fw: FwLab) -> Path:
    """GOOD with 20,000 more rules: reading, validating and checking it take a while."""
    extra = "".join(f"-A INPUT -s 10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}/32 -p tcp "
                    f"-m tcp --dport 8080 -j DROP\n" for i in range(20000))
    return fw.write("large.rules", GOOD.replace("COMMIT\n", extra + "COMMIT\n"))


def _apply_until_standing_by(fw: FwLab, rules: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start `fwsafe apply` (with the lockout check, for the lab's client); return it and its
    guard's PID once that guard stands by, before any record of the change exists."""
    lab = fw.lab
    proc = lab.srv_popen(["env", f"FWSAFE_STATE_DIR={fw.state_dir}",
                          f"SSH_CONNECTION={lab.cli_ip4} 50022 {lab.srv_ip4} 22", FWSAFE,
                          "apply", "--timeout", "30", str(rules)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        standing = [(pid, argv) for pid, argv in _guards_of(fw) if b"--standby" in argv]
        if standing:
            pid, argv = standing[0]
            tx_id = argv[argv.index(str(fw.state_dir).encode()) + 1].decode()
            assert not (fw.state_dir / "tx" / tx_id / "record.json").exists(), \
                "the change was prepared before the test saw its guard standing by"
            return proc, pid
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    raise AssertionError("no guard stood by")


def test_apply_killed_while_checking_applies_nothing(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    dirs = _tx_dirs(fwlab)
    proc, _ = _apply_until_standing_by(fwlab, _slow_to_check(fwlab))
    proc.kill()
    proc.communicate(timeout=30)
    _wait_no_guard(fwlab)   # every writer of its pipe is gone: it exits, having done nothing
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["state"] == "none"
    assert fwlab.lab.new_login_ok()
    abandoned = _tx_dirs(fwlab) - dirs
    assert len(abandoned) == 1
    # The next apply clears the abandoned preparation away (and works).
    applied = fwlab.fw("apply", "--detach", "--json", "--timeout", "30",
                       str(fwlab.write("good.rules", GOOD)))
    assert applied.returncode == 0, applied.stderr
    assert not abandoned & _tx_dirs(fwlab)
    assert fwlab.fw("revert").returncode == 4


def test_a_guard_that_dies_standing_by_is_reported_and_nothing_changes(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    proc, guard_pid = _apply_until_standing_by(fwlab, _slow_to_check(fwlab))
    os.kill(guard_pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert b"the guard died while standing by" in err and b"nothing was changed" in err
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["state"] == "aborted"
