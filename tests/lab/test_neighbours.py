"""fwsafe next to the REAL fail2ban (1.0) and dockerd (20.10), running in the lab's server
namespace (tests/neighbours.py): the neighbours' rules survive a revert, a neighbour stopping
or the machine rebooting during the window does not keep you locked out, a rules file written
before a neighbour started is refused instead of silently wiping it, and `--partial` changes
only the chains the file names.

Each test prints the server's IPv4 ruleset before, during and after the change (`-s` shows
it; pytest shows it for a failing test) and checks what a user would see: whether a NEW TCP
connection or SSH login gets in, the iptables-save text, `fwsafe status --json`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests import neighbours
from tests.conftest import NeighbourLab

pytestmark = pytest.mark.lab

F2B_JUMP = "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd"
DROP_8080 = "-A INPUT -p tcp -m tcp --dport 8080 -j DROP"
DROP_NEW_SSH = "-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP"
ACCEPT_443 = "-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT"
FORWARD_9999 = "-A FORWARD -p tcp -m tcp --dport 9999 -j DROP"
DOCKER_CHAINS = ("DOCKER", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2")
FINAL = {"reverted", "revert-failed", "confirmed"}

PARTIAL_INPUT = """\
*filter
:INPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 8080 -j DROP
COMMIT
"""


def _fw(nb: NeighbourLab, *args: str) -> Any:
    """fwsafe in the server namespace; the command and its outcome are printed."""
    result = nb.fw(*args)
    print(f"\n$ fwsafe {' '.join(args)}\n-> exit {result.returncode}")
    if result.stderr.strip():
        print(result.stderr.rstrip())
    return result


def _apply(nb: NeighbourLab, *args: str) -> dict[str, Any]:
    result = _fw(nb, "apply", "--detach", "--json", *args)
    assert result.returncode == 0, f"apply: exit {result.returncode}: {result.stderr}"
    armed: dict[str, Any] = json.loads(result.stdout)
    return armed


def _wait_final(nb: NeighbourLab, limit_s: float) -> dict[str, Any]:
    info = nb.wait_state(FINAL, limit_s)
    print(f"\nstatus: {info['state']}; reason: {info.get('reason')}; error: {info.get('error')}")
    return info


def _blocked(nb: NeighbourLab, src: str) -> bool:
    probe = neighbours.tcp_probe(nb.lab, src=src)
    print(f"new TCP connection to port 22 from {src}: {'gets in' if probe.ok else probe.error}")
    return not probe.ok


def _outside_input(save_text: str) -> list[str]:
    """Every line of a normalised save except the filter table's INPUT chain."""
    own = set(neighbours.chain_lines(save_text, "INPUT"))
    return [ln for ln in save_text.splitlines() if ln not in own]


def _fwsafe_processes(nb: NeighbourLab) -> list[int]:
    """The fwsafe processes of THIS lab's transaction (guard, backstop watcher, ...): their
    command lines name fwsafe and this lab's state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "fwsafe" in cmdline and str(nb.state_dir) in cmdline:
                found.append(int(entry.name))
    return found


def _power_off_fwsafe(nb: NeighbourLab, guard: int) -> list[int]:
    """What a power cut does to fwsafe: the guard and everything watching it die at the same
    instant. All are stopped first (none can react to another's death), then killed."""
    pids = _fwsafe_processes(nb)
    assert guard in pids, f"guard {guard} not among this lab's fwsafe processes {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < end:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"fwsafe process {pid} survived SIGKILL")
    print(f"\npower cut: killed fwsafe processes {pids} (guard {guard})")
    return pids


# --------------------------------------------------------------------------- a


def test_a_fail2ban_ban_during_an_input_change_survives_the_revert(f2b_lab: NeighbourLab) -> None:
    nb = f2b_lab
    early, meanwhile, innocent = nb.clients[:3]
    nb.f2b.ban(early)  # f2b-sshd and its INPUT jump exist before the change
    before = nb.record(f"a: before (fail2ban banned {early})")
    assert F2B_JUMP in before
    # The file is the live ruleset (fail2ban's chain and jump included) plus one rule.
    rules = nb.write("input-8080.rules", neighbours.with_rule(before, DROP_8080))
    _apply(nb, "--timeout", "10", str(rules))
    nb.f2b.ban(meanwhile)
    during = nb.record(f"a: during the window (fail2ban banned {meanwhile})")
    assert DROP_8080 in during and f"-A f2b-sshd -s {meanwhile}/32 " in during

    info = _wait_final(nb, 10 + 20)
    after = nb.record("a: after the timeout revert")
    assert info["state"] == "reverted", info
    assert DROP_8080 not in after, "the change's rule is still live"
    assert F2B_JUMP in after
    assert sorted(nb.f2b.banned()) == sorted([early, meanwhile])
    assert f"-A f2b-sshd -s {meanwhile}/32 " in after, "the ban made during the window is gone"
    assert _blocked(nb, meanwhile), f"{meanwhile} (banned during the window) gets in"
    assert _blocked(nb, early), f"{early} (banned before the change) gets in"
    assert not _blocked(nb, innocent), f"{innocent} (never banned) is blocked"
    assert nb.lab.new_login_ok(), "a new SSH login fails after the revert"


# --------------------------------------------------------------------------- b


def test_b_fail2ban_stopped_during_a_lockout_ssh_answers_at_the_deadline(
        f2b_lab: NeighbourLab) -> None:
    nb = f2b_lab
    banned, innocent = nb.clients[:2]
    nb.f2b.ban(banned)
    before = nb.record(f"b: before (fail2ban banned {banned})")
    rules = nb.write("drop-new-ssh.rules", neighbours.with_rule(before, DROP_NEW_SSH, first=True))
    armed = _apply(nb, "--force", "--timeout", "6", str(rules))
    assert not neighbours.tcp_probe(nb.lab, timeout=0.5).ok, "the lockout is not live"
    nb.f2b.stop()  # `systemctl stop fail2ban` during the window: its jump and chain go
    during = nb.record("b: during the window, fail2ban stopped")
    assert DROP_NEW_SSH in during and "f2b-sshd" not in during
    deadline = float(nb.status()["deadline"] or armed["deadline"])
    assert deadline > time.time(), "fail2ban took longer to stop than the window"

    probe = neighbours.wait_banner(nb.lab, limit=deadline - time.time() + 15)
    info = _wait_final(nb, 15)
    after = nb.record("b: after the deadline")
    if probe.ok and probe.t is not None:
        delay = probe.t - deadline
        print(f"\nb: deadline -> first new TCP connection to port 22 with sshd's banner: "
              f"{delay:.2f} s ({probe.tries} attempts)")
    else:
        delay = float("inf")
        print(f"\nb: no new TCP connection got in within 15 s of the deadline ({probe.error})")
    assert probe.ok, (f"locked out: no new connection to port 22 within 15 s of the deadline; "
                      f"status {info['state']}: {info.get('error') or info.get('reason')}")
    assert delay < 3, f"SSH answered {delay:.2f} s after the deadline"
    assert info["state"] == "reverted", info
    assert DROP_NEW_SSH not in after
    assert nb.lab.new_login_ok()
    # fail2ban can start again, and its ban (kept in its database) protects again.
    nb.f2b.start()
    end = time.monotonic() + 20
    while not nb.f2b.chain_has(banned) and time.monotonic() < end:
        time.sleep(0.2)
    nb.record("b: fail2ban started again")
    assert _blocked(nb, banned) and not _blocked(nb, innocent)


# --------------------------------------------------------------------------- c


def test_c_docker_changes_during_a_forward_change_survive_the_revert(
        docker_lab: NeighbourLab) -> None:
    nb = docker_lab
    docker = nb.docker
    docker.network_create("old")
    old_bridge, old_subnet = docker.bridge("old"), docker.subnet("old")
    before = nb.record(f"c: before (network old = {old_bridge}, {old_subnet})")
    assert f"-A FORWARD -o {old_bridge} -j DOCKER" in before
    rules = nb.write("forward-9999.rules", neighbours.with_rule(before, FORWARD_9999))
    _apply(nb, "--timeout", "15", str(rules))
    docker.network_create("new")
    new_bridge = docker.bridge("new")
    docker.run_httpd("web", "new", 8081)
    docker.network_rm("old")
    answer = neighbours.wait_http(nb.lab, 8081)
    during = nb.record(f"c: during the window (network new = {new_bridge}, web on 8081, "
                       "network old removed)")
    assert answer.status == 200, f"Docker's port does not answer during the window: {answer}"
    assert FORWARD_9999 in during and old_bridge not in during and new_bridge in during

    info = _wait_final(nb, 15 + 20)
    after = nb.record("c: after the timeout revert")
    assert info["state"] == "reverted", info
    assert FORWARD_9999 not in after, "the change's rule is still live"
    answer = neighbours.http_get(nb.lab, 8081)
    assert answer.status == 200 and answer.body.strip() == "web", \
        f"the container published during the window no longer answers: {answer}"
    assert old_bridge not in after, "the removed network's rules came back"
    assert old_subnet not in after
    expected = [ln for ln in neighbours.chain_lines(during, "FORWARD") if ln != FORWARD_9999]
    assert neighbours.chain_lines(after, "FORWARD") == expected, \
        "FORWARD is not Docker's newest FORWARD minus the change's rule"


# --------------------------------------------------------------------------- d


def _as_if_applied_in_another_boot(nb: NeighbourLab) -> None:
    """A namespace cannot reboot its kernel: the boot id decides what a reboot is (an empty
    kernel on the same boot is not one), so the record is made to say that the change was
    applied in an earlier boot."""
    record = nb.state_dir / "tx" / str(nb.status()["id"]) / "record.json"
    data = json.loads(record.read_text())
    data["boot_id"] = "00000000-0000-4000-8000-000000000000"
    record.write_text(json.dumps(data))


def test_d_reboot_with_neighbour_chains_then_recover(neighbours_lab: NeighbourLab) -> None:
    nb = neighbours_lab
    nb.f2b.ban(nb.clients[0])
    nb.docker.network_create("net1")
    nb.docker.run_httpd("web", "net1", 8081)
    assert neighbours.wait_http(nb.lab, 8081).status == 200
    before = nb.record("d: before (fail2ban chain + Docker chains referenced)")
    assert F2B_JUMP in before and "-A FORWARD -j DOCKER-USER" in before
    rules = nb.write("input-8080.rules", neighbours.with_rule(before, DROP_8080))
    _apply(nb, "--timeout", "120", str(rules))
    nb.record("d: during the window")
    guard = nb.status()["guard_pid"]
    assert isinstance(guard, int)
    # The machine goes down hard: fwsafe's guard (and its backstop), fail2ban and Docker die at
    # once; the kernel comes back empty.
    _power_off_fwsafe(nb, guard)
    nb.f2b.kill()
    nb.docker.kill()
    neighbours.flush_everything(nb.lab)
    _as_if_applied_in_another_boot(nb)
    empty = nb.record("d: after the 'reboot' (empty kernel, neighbours not running)")
    assert "f2b-sshd" not in empty and "DOCKER" not in empty

    recover = _fw(nb, "recover", "--json")
    after = nb.record("d: after fwsafe recover")
    assert recover.returncode == 0, f"recover: exit {recover.returncode}: {recover.stderr}"
    info = nb.status()
    print(f"\nstatus: {info['state']}; reason: {info.get('reason')}; error: {info.get('error')}")
    assert info["state"] == "reverted", info
    assert re.search(r"reboot", info.get("reason") or "", re.I), info.get("reason")
    assert DROP_8080 not in after
    assert nb.lab.new_login_ok()

    good = nb.write("good.rules", neighbours.with_rule(nb.save(), ACCEPT_443))
    again = _fw(nb, "apply", "--detach", "--json", "--timeout", "30", str(good))
    assert again.returncode == 0, f"apply after recover: exit {again.returncode}: {again.stderr}"
    assert ACCEPT_443 in nb.record("d: the next change, pending")
    confirm = nb.lab.ssh("fwsafe confirm")
    assert confirm.returncode == 0, confirm.stderr
    assert nb.status()["state"] == "confirmed"


# --------------------------------------------------------------------------- e


def test_e_stale_file_without_fail2ban_chain_is_refused(f2b_lab: NeighbourLab) -> None:
    nb = f2b_lab
    banned, innocent = nb.clients[:2]
    stale_text = neighbours.with_rule(nb.before_neighbours, ACCEPT_443)
    stale = nb.write("written-before-fail2ban.rules", stale_text)
    nb.f2b.ban(banned)
    before = nb.record(f"e: live (fail2ban banned {banned}); the file has no f2b-sshd")
    whole_before = nb.lab.ruleset()

    refused = _fw(nb, "apply", "--detach", "--timeout", "30", str(stale))
    after = nb.record("e: after the refused apply")
    assert refused.returncode == 3, f"exit {refused.returncode}: {refused.stderr}"
    assert "f2b-sshd" in refused.stderr, refused.stderr
    assert re.search(r"fail2ban", refused.stderr, re.I), refused.stderr
    assert after == before, "the live ruleset changed although the apply was refused"
    assert nb.lab.ruleset() == whole_before
    assert nb.status()["state"] in ("none", "rejected")
    assert _blocked(nb, banned)

    forced = _fw(nb, "apply", "--force", "--detach", "--json", "--timeout", "30", str(stale))
    applied = nb.record("e: after apply --force (pending)")
    assert forced.returncode == 0, f"apply --force: exit {forced.returncode}: {forced.stderr}"
    assert neighbours.chain_lines(applied, "INPUT") == neighbours.chain_lines(stale_text, "INPUT")
    reverted = _fw(nb, "revert")
    back = nb.record("e: after fwsafe revert")
    assert reverted.returncode == 4
    assert back == before, "the revert did not bring fail2ban's chain and ban back"
    assert _blocked(nb, banned) and not _blocked(nb, innocent)


def test_e_stale_file_without_docker_chains_is_refused(docker_lab: NeighbourLab) -> None:
    nb = docker_lab
    stale_text = neighbours.with_rule(nb.before_neighbours, ACCEPT_443)
    stale = nb.write("written-before-docker.rules", stale_text)
    nb.docker.network_create("net1")
    nb.docker.run_httpd("web", "net1", 8081)
    assert neighbours.wait_http(nb.lab, 8081).status == 200
    before = nb.record("e: live (Docker, web on 8081); the file has no DOCKER chains")
    whole_before = nb.lab.ruleset()

    refused = _fw(nb, "apply", "--detach", "--timeout", "30", str(stale))
    after = nb.record("e: after the refused apply")
    assert refused.returncode == 3, f"exit {refused.returncode}: {refused.stderr}"
    assert re.search(r"\bDOCKER(-[A-Z0-9-]+)?\b", refused.stderr), refused.stderr
    # The program is named too, not only its chains.
    assert re.search(r"docker", re.sub(r"\bDOCKER[-A-Z0-9]*", "", refused.stderr), re.I), \
        refused.stderr
    assert after == before, "the live ruleset changed although the apply was refused"
    assert nb.lab.ruleset() == whole_before
    assert nb.status()["state"] in ("none", "rejected")
    assert neighbours.http_get(nb.lab, 8081).status == 200

    forced = _fw(nb, "apply", "--force", "--detach", "--json", "--timeout", "30", str(stale))
    applied = nb.record("e: after apply --force (pending)")
    assert forced.returncode == 0, f"apply --force: exit {forced.returncode}: {forced.stderr}"
    assert neighbours.chain_lines(applied, "INPUT") == neighbours.chain_lines(stale_text, "INPUT")
    reverted = _fw(nb, "revert")
    back = nb.record("e: after fwsafe revert")
    assert reverted.returncode == 4
    for chain in ("FORWARD", *DOCKER_CHAINS):
        assert neighbours.chain_lines(back, chain) == neighbours.chain_lines(before, chain), chain
    assert neighbours.wait_http(nb.lab, 8081).status == 200


# --------------------------------------------------------------------------- f


def test_f_partial_file_replaces_only_input(neighbours_lab: NeighbourLab) -> None:
    nb = neighbours_lab
    banned, innocent = nb.clients[:2]
    nb.f2b.ban(banned)
    nb.docker.network_create("net1")
    nb.docker.run_httpd("web", "net1", 8081)
    assert neighbours.wait_http(nb.lab, 8081).status == 200
    before = nb.record("f: before (fail2ban ban, Docker web on 8081)")
    v6_before = nb.save("ip6tables-save")
    partial = nb.write("input-only.rules", PARTIAL_INPUT)

    check = _fw(nb, "check", "--partial", "--client", nb.lab.cli_ip4, "--json", str(partial))
    assert check.returncode == 0, f"check --partial: exit {check.returncode}: {check.stderr}"
    diff = _fw(nb, "diff", "--partial", "--json", str(partial))
    assert diff.returncode == 0, f"diff --partial: exit {diff.returncode}: {diff.stderr}"
    units = {(u["layer"], u["unit"]) for u in json.loads(diff.stdout)["units"]}
    assert units == {("ipv4", "filter/INPUT")}, units
    assert nb.save() == before, "check/diff changed the live ruleset"

    _apply(nb, "--partial", "--timeout", "12", str(partial))
    during = nb.record("f: during the window (INPUT replaced)")
    assert neighbours.chain_lines(during, "INPUT") == \
        neighbours.chain_lines(PARTIAL_INPUT, "INPUT")
    assert _outside_input(during) == _outside_input(before), \
        "--partial changed more than INPUT"
    assert neighbours.http_get(nb.lab, 8081).status == 200

    info = _wait_final(nb, 12 + 20)
    after = nb.record("f: after the timeout revert")
    assert info["state"] == "reverted", info
    assert neighbours.chain_lines(after, "INPUT") == neighbours.chain_lines(before, "INPUT")
    assert F2B_JUMP in after
    assert after == before
    assert nb.save("ip6tables-save") == v6_before
    assert _blocked(nb, banned) and not _blocked(nb, innocent)
    assert neighbours.http_get(nb.lab, 8081).status == 200
    assert nb.lab.new_login_ok()
