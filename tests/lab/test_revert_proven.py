"""Issue 22: a revert that is proven, not assumed. Each case as a user meets it, with the real
kernel and tools: while a change is pending, other programs act (re-append a rule, delete
rules, fail2ban re-creates or removes its chain, ...); at the deadline the guard reverts.
Judged by what a user sees: a NEW ssh login from the client gets in, the change's rules are
gone, the other programs' rules, bans and chains are as they left them.

Each test prints the server's IPv4 ruleset before, during and after (`-s`; pytest shows it
for a failing test).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from fwsafe.lab import normalize_save
from tests import neighbours
from tests.bins import FWSAFE
from tests.conftest import FwLab, NeighbourLab

pytestmark = pytest.mark.lab

FINAL = {"reverted", "revert-failed", "confirmed"}
DROP_NEW = "-p tcp -m conntrack --ctstate NEW -j DROP"
F2B_JUMP = "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd"


def record(fw: FwLab, title: str) -> str:
    text = normalize_save(fw.lab.srv_exec(["iptables-save"]).stdout)
    print(f"\n===== {title} =====\n{text}", end="", flush=True)
    return text


def ipt(fw: FwLab, *args: str) -> None:
    """Another program's iptables command in the server namespace."""
    fw.lab.srv_exec(["iptables", "-w", *args])


def run_apply(fw: FwLab, text: str, *extra: str, timeout: int = 6, ssh: bool = True) -> Any:
    """`fwsafe apply --force` as the admin logged in from the lab's client (SSH_CONNECTION:
    the lockout check knows the client, and the revert proves it gets in again; without
    `ssh`, no client is known and no access proof is made)."""
    rules = fw.write("change.rules", text)
    lab = fw.lab
    client = f"SSH_CONNECTION={lab.cli_ip4} 50022 {lab.srv_ip4} 22" if ssh else "SSH_CONNECTION="
    result = lab.srv_exec(["env", f"FWSAFE_STATE_DIR={fw.state_dir}", client, FWSAFE,
                           "apply", "--detach", "--json", "--force", "--timeout", str(timeout),
                           *extra, str(rules)], check=False, timeout=120)
    print(f"\n$ fwsafe apply --force --timeout {timeout} {rules} -> exit {result.returncode}"
          f"\n{result.stderr}")
    return result


def apply_detached(fw: FwLab, text: str, *extra: str, timeout: int = 6) -> dict[str, Any]:
    """run_apply, which must arm the guard."""
    result = run_apply(fw, text, *extra, timeout=timeout)
    assert result.returncode == 0, result.stderr
    armed: dict[str, Any] = json.loads(result.stdout)
    captured_after(fw, armed)       # what others do from now on is not the change's
    return armed


def wait_reverted(fw: FwLab, limit_s: float = 40, *, verified: bool = True) -> dict[str, Any]:
    """Wait for the revert; the record must say which proofs held ("verified": both)."""
    info = fw.wait_state(FINAL, limit_s)
    print(f"\nstatus: {info['state']}; reason: {info.get('reason')}\nproofs: "
          f"{json.dumps(info.get('revert_proofs'), indent=1)}\nfallbacks: "
          f"{info.get('revert_notes')}")
    assert info["state"] == "reverted", info
    if verified:
        assert info["revert_verified"] is True, info
        assert info["revert_proofs"]["access"].startswith("access: a NEW SSH connection gets in")
    return info


def captured_after(fw: FwLab, armed: dict[str, Any], limit_s: float = 10) -> None:
    """Wait until the guard has captured the state right after the change."""
    log = fw.state_dir / "tx" / str(armed["id"]) / "guard.log"
    end = time.monotonic() + limit_s
    while "touched:" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end, "the guard did not capture after the change"
        time.sleep(0.05)


def chain(text: str, name: str) -> list[str]:
    """The rules of one chain of the filter table (without its declaration)."""
    return [ln for ln in neighbours.chain_lines(text, name) if ln.startswith("-A ")]


def test_case1_a_rule_re_appended_by_another_program_does_not_shield_the_change(
        fwlab: FwLab) -> None:
    """before OTHER [B]; the change appends X (drop NEW SSH) -> [B, X]; the other program
    deletes and re-appends B -> [X, B]. The revert must remove X wherever it stands."""
    b = "-s 10.9.9.9/32 -j RETURN"
    ipt(fwlab, "-N", "OTHER")
    ipt(fwlab, "-A", "OTHER", *b.split())
    ipt(fwlab, "-I", "INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "OTHER")
    before = record(fwlab, "case 1: before")
    assert fwlab.lab.new_login_ok()
    apply_detached(fwlab, neighbours.with_rule(before, f"-A OTHER {DROP_NEW}"))
    assert not fwlab.lab.new_connection_ok(timeout=0.5), "the change's drop is not live"
    ipt(fwlab, "-D", "OTHER", *b.split())
    ipt(fwlab, "-A", "OTHER", *b.split())
    during = record(fwlab, "case 1: during (B deleted and re-appended by another program)")
    assert chain(during, "OTHER") == [f"-A OTHER {DROP_NEW}", f"-A OTHER {b}"]

    wait_reverted(fwlab)
    after = record(fwlab, "case 1: after the revert")
    assert chain(after, "OTHER") == [f"-A OTHER {b}"], "the change's DROP survived"
    assert fwlab.lab.new_login_ok(), "a NEW ssh login fails after the revert"


def test_case8_rules_the_change_reordered_and_others_deleted_stay_deleted(fwlab: FwLab) -> None:
    """before OTHER [b, a] where a bans the SSH client; the change swaps them; the other
    program then unbans both (deletes them). The revert must not bring either back."""
    client = fwlab.lab.cli_ip4
    a, b = f"-s {client}/32 -j DROP", "-s 10.9.9.9/32 -j DROP"
    ipt(fwlab, "-N", "OTHER")
    ipt(fwlab, "-A", "OTHER", *b.split())
    ipt(fwlab, "-A", "OTHER", *a.split())
    ipt(fwlab, "-I", "INPUT", "1", "-j", "OTHER")
    before = record(fwlab, "case 8: before (the client is banned)")
    assert not fwlab.lab.new_connection_ok(timeout=0.5)
    swapped = before.replace(f"-A OTHER {b}\n-A OTHER {a}\n", f"-A OTHER {a}\n-A OTHER {b}\n")
    assert swapped != before
    apply_detached(fwlab, swapped)
    ipt(fwlab, "-D", "OTHER", *a.split())       # the other program unbans both
    ipt(fwlab, "-D", "OTHER", *b.split())
    during = record(fwlab, "case 8: during (both unbanned by the other program)")
    assert chain(during, "OTHER") == []
    assert fwlab.lab.new_login_ok()

    wait_reverted(fwlab)
    after = record(fwlab, "case 8: after the revert")
    assert chain(after, "OTHER") == [], "a rule others deleted came back"
    assert fwlab.lab.new_login_ok(), "the client's old ban was resurrected"


def test_case8_a_chain_its_owner_deleted_is_not_recreated_as_an_orphan(
        f2b_lab: NeighbourLab) -> None:
    """The change edits fail2ban's chain (drops an old ban and NEW SSH); fail2ban is stopped
    during the window (its jump and chain go). The revert must not re-create f2b-sshd holding
    the stale ban without RETURN: fail2ban must be able to start again and ban."""
    nb = f2b_lab
    early, innocent = nb.clients[:2]
    nb.f2b.ban(early)
    before = record(nb, f"case 8b: before (fail2ban banned {early})")
    ban = next(line for line in chain(before, "f2b-sshd") if early in line)
    change = neighbours.with_rule(before.replace(ban + "\n", ""), f"-A INPUT {DROP_NEW}",
                                  first=True)
    apply_detached(nb, change)
    nb.f2b.stop()
    during = record(nb, "case 8b: during (fail2ban stopped)")
    assert "f2b-sshd" not in during

    wait_reverted(nb)
    after = record(nb, "case 8b: after the revert")
    assert "f2b-sshd" not in after, "an orphan f2b-sshd chain was re-created"
    assert DROP_NEW not in after
    assert nb.lab.new_login_ok()
    nb.f2b.start()          # fails if a stale f2b-sshd is in the way; bans again from its db
    nb.f2b.ban(innocent)
    started = record(nb, "case 8b: fail2ban started again")
    assert started.count("-j f2b-sshd") == 1
    assert nb.f2b.chain_has(innocent)


def test_case7_fail2ban_recreates_its_chain_in_the_window(f2b_lab: NeighbourLab) -> None:
    """A forced change deletes fail2ban's chain and jump; a ban during the window makes
    fail2ban re-create them (jump on top of INPUT, a fresh chain ending in RETURN). After the
    revert: one jump, every ban (old and new) before RETURN and blocking, SSH in for others."""
    nb = f2b_lab
    early, meanwhile, innocent = nb.clients[:3]
    nb.f2b.ban(early)
    before = record(nb, f"case 7: before (fail2ban banned {early})")
    assert F2B_JUMP in before
    without = "\n".join(line for line in before.splitlines() if "f2b-sshd" not in line) + "\n"
    apply_detached(nb, without, timeout=8)
    assert "f2b-sshd" not in record(nb, "case 7: right after the change")
    nb.f2b.ban(meanwhile)
    during = record(nb, f"case 7: during (fail2ban banned {meanwhile}, re-creating its chain)")
    assert F2B_JUMP in during

    wait_reverted(nb)
    after = record(nb, "case 7: after the revert")
    assert after.count("-j f2b-sshd") == 1, "INPUT jumps to f2b-sshd more than once"
    rules = chain(after, "f2b-sshd")
    assert rules[-1] == "-A f2b-sshd -j RETURN", "a ban is placed after RETURN"
    assert any(early in r for r in rules) and any(meanwhile in r for r in rules)
    for src in (early, meanwhile):
        assert not neighbours.tcp_probe(nb.lab, src=src).ok, f"{src} (banned) gets in"
    assert neighbours.tcp_probe(nb.lab, src=innocent).ok
    assert nb.lab.new_login_ok()


EMPTY = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""


def test_case6_an_emptied_firewall_whose_guard_dies_is_not_a_reboot(fwlab: FwLab) -> None:
    """The change empties the firewall; its guard is killed (the backstop takes over). Same
    boot: the old rules come back (a full revert), not "reboot: files only", host left open."""
    before = record(fwlab, "case 6: before")
    before6 = fwlab.lab.srv_exec(["ip6tables-save"]).stdout
    armed = apply_detached(fwlab, EMPTY, "--rules6", str(fwlab.write("empty.rules6", EMPTY)),
                           timeout=120)
    during = record(fwlab, "case 6: during (the firewall emptied, IPv4 and IPv6)")
    assert "-A " not in during + fwlab.lab.srv_exec(["ip6tables-save"]).stdout
    fwlab.lab.srv_exec(["kill", "-KILL", str(armed["guard_pid"])])   # the guard we started
    info = wait_reverted(fwlab, 30)
    after = record(fwlab, "case 6: after the backstop's revert")
    assert after == before, "the old rules did not come back"
    assert normalize_save(fwlab.lab.srv_exec(["ip6tables-save"]).stdout) \
        == normalize_save(before6)
    assert info["reverted_by"] == "backstop", info
    assert "reboot" not in (info.get("reason") or "")
    assert fwlab.lab.new_login_ok()


def test_case4_a_timeout_in_the_capture_after_the_change_still_reverts_it(
        fwlab: FwLab) -> None:
    """The guard's first tool call after the change (`iptables-save --version`) hangs past
    its timeout, as under load: touched must be everything the change could touch, never
    nothing, so the deadline's revert really undoes the change."""
    mark = fwlab.lab.workdir / "slow-once"
    bindir = fwlab.lab.workdir / "slowbin"
    bindir.mkdir()
    wrapper = bindir / "iptables-save"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# iptables-save, hanging once for the guard's `--version` (a real timeout)\n"
        f"if [ \"$1\" = --version ] && [ -e {mark} ] && tr '\\0' ' ' </proc/$PPID/cmdline "
        "| grep -q -- '-m fwsafe.guard --'; then\n"
        f"    rm -f {mark}; exec sleep 13\n"
        "fi\n"
        "exec /usr/sbin/iptables-save \"$@\"\n")
    wrapper.chmod(0o755)
    mark.write_text("")
    before = record(fwlab, "case 4: before")
    rules = fwlab.write("change.rules", neighbours.with_rule(before, f"-A INPUT {DROP_NEW}",
                                                             first=True))
    result = fwlab.lab.srv_exec(
        ["env", f"PATH={bindir}:/usr/sbin:/usr/bin:/sbin:/bin",
         f"FWSAFE_STATE_DIR={fwlab.state_dir}",
         f"SSH_CONNECTION={fwlab.lab.cli_ip4} 50022 {fwlab.lab.srv_ip4} 22", FWSAFE, "apply",
         "--detach", "--json", "--force", "--timeout", "20", str(rules)], check=False, timeout=90)
    assert result.returncode == 0, result.stderr
    assert not fwlab.lab.new_connection_ok(timeout=0.5), "the change's drop is not live"
    record(fwlab, "case 4: during")
    info = wait_reverted(fwlab, 60)
    after = record(fwlab, "case 4: after the revert")
    assert not mark.exists(), "the guard never called the hanging iptables-save --version"
    log = (fwlab.state_dir / "tx" / str(info["id"]) / "guard.log").read_text()
    print(f"\n----- guard.log -----\n{log}")
    assert DROP_NEW not in after, "the change is still live after a 'verified' revert"
    assert fwlab.lab.new_login_ok()
    assert "cannot capture after the change" in log


def nft_table(fw: FwLab, title: str) -> str:
    text = fw.lab.srv_exec(["nft", "-s", "list", "table", "inet", "blocker"]).stdout
    print(f"\n===== {title} =====\n{text}", end="", flush=True)
    return text


def test_case3_nft_set_elements_are_merged_one_by_one(fwlab: FwLab) -> None:
    """A set of twenty banned addresses (nft wraps its listing) used by a drop rule; the change
    adds the SSH client's address (a lockout); another program bans one more address during
    the window. After the revert the client gets in, the other program's ban blocks, and
    every old element is there."""
    lab = fwlab.lab
    extra = neighbours.add_client_addresses(lab, count=3)
    old = [f"10.99.0.{i}" for i in range(1, 21)]
    fwlab.lab.srv_exec(["nft", "-f", "-"], input=(
        "table inet blocker {\n\tset blk {\n\t\ttype ipv4_addr\n\t\tflags interval\n"
        f"\t\telements = {{ {', '.join(old + [extra[0]])} }}\n\t}}\n"
        "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
        "\t\tip saddr @blk tcp dport 22 drop\n\t}\n}\n"))
    before = nft_table(fwlab, "case 3: before")
    assert "\t\t\t     " in before, "the element list is not wrapped"
    apply_detached(fwlab, (
        "table inet blocker {\n\tset blk {\n\t\ttype ipv4_addr\n\t\tflags interval\n"
        f"\t\telements = {{ {lab.cli_ip4} }}\n\t}}\n}}\n"))
    assert not lab.new_connection_ok(timeout=0.5), "the change's element is not live"
    lab.srv_exec(["nft", "add", "element", "inet", "blocker", "blk", f"{{ {extra[1]} }}"])
    nft_table(fwlab, "case 3: during (another program banned one more)")

    wait_reverted(fwlab)
    after = nft_table(fwlab, "case 3: after the revert")
    assert lab.cli_ip4 not in after, "the change's element survived"
    for address in [*old, extra[0], extra[1]]:
        assert address in after, f"{address} lost"
    assert after.count("elements = ") == 1
    assert lab.new_login_ok(), "the client is still locked out"
    for address in extra[:2]:
        assert not neighbours.tcp_probe(lab, src=address).ok, f"{address} (banned) gets in"
    assert neighbours.tcp_probe(lab, src=extra[2]).ok


def test_case2_an_nft_file_writing_an_iptables_nft_table_is_refused(fwlab: FwLab) -> None:
    """`table ip filter { chain input { type filter hook input ...; tcp dport 22 drop } }`:
    iptables-save would print that table as empty ("incompatible"), so its revert could not
    be proved; refused with exit 3 before anything changes, naming the table."""
    before = record(fwlab, "case 2: before")
    rules = fwlab.write("ip-filter.nft", (
        "table ip filter {\n\tchain input {\n"
        "\t\ttype filter hook input priority 0; policy accept;\n"
        "\t\ttcp dport 22 drop\n\t}\n}\n"))
    result = fwlab.fw("apply", "--detach", "--force", "--timeout", "6", str(rules))
    print(f"\n$ fwsafe apply --force {rules} -> exit {result.returncode}\n{result.stderr}")
    assert result.returncode == 3, result.stderr
    assert "table ip filter belongs to iptables-nft" in result.stderr
    assert record(fwlab, "case 2: after the refusal") == before
    listed = fwlab.lab.srv_exec(["nft", "list", "table", "ip", "filter"]).stdout
    assert "tcp dport 22 drop" not in listed
    assert fwlab.lab.new_login_ok()


def test_proof_access_failing_after_the_merge_falls_back_to_the_snapshot(fwlab: FwLab) -> None:
    """Item 4(c): the merge keeps what others did, so a ban of the admin's own client by
    another program during the window survives it: the access proof fails, the touched
    table is loaded whole from the snapshot (access before fidelity, said in the record),
    the proof is asked again, and the client gets in."""
    lab = fwlab.lab
    before = record(fwlab, "access proof: before")
    apply_detached(fwlab, neighbours.with_rule(before, "-A INPUT -p tcp --dport 8080 -j DROP"))
    ipt(fwlab, "-I", "INPUT", "1", "-s", lab.cli_ip4, "-p", "tcp", "--dport", "22", "-j", "DROP")
    record(fwlab, "access proof: during (another program bans the admin's client)")
    info = wait_reverted(fwlab)
    after = record(fwlab, "access proof: after the revert")
    assert after == before
    assert lab.new_login_ok()
    assert info["revert_proofs"]["ipv4"].endswith("(snapshot tables)"), info["revert_proofs"]
    assert any("access before fidelity" in note for note in info["revert_notes"])
    log = (fwlab.state_dir / "tx" / str(info["id"]) / "guard.log").read_text()
    assert "access FAILED" in log, log


def test_case5_a_table_iptables_save_shows_wrongly_is_refused(fwlab: FwLab) -> None:
    """A native nft rule `ip saddr @blk drop` first in ip filter INPUT: iptables-nft-save
    1.8.9 prints it as `-A INPUT -j DROP`, so the revert of an unrelated iptables change (a
    DROP of port 8080) would load a table that drops everything. The change is refused with
    exit 3 before anything happens, naming the table; the native rule is there and works, a
    NEW ssh login gets in."""
    lab = fwlab.lab
    extra = neighbours.add_client_addresses(lab, count=2)
    lab.srv_exec(["nft", "add", "set", "ip", "filter", "blk", "{ type ipv4_addr; }"])
    lab.srv_exec(["nft", "add", "element", "ip", "filter", "blk", f"{{ {extra[0]} }}"])
    lab.srv_exec(["nft", "insert", "rule", "ip", "filter", "INPUT", "ip", "saddr", "@blk",
                  "drop"])
    before = record(fwlab, "case 5: before")
    native = fwlab.lab.srv_exec(["nft", "-s", "list", "table", "ip", "filter"]).stdout
    print(f"\n===== case 5: before (nft -s list table ip filter) =====\n{native}")
    assert chain(before, "INPUT")[0] == "-A INPUT -j DROP", "iptables-save is not lossy here"
    assert not neighbours.tcp_probe(lab, src=extra[0]).ok
    assert neighbours.tcp_probe(lab, src=extra[1]).ok
    change = "\n".join(ln for ln in before.splitlines() if ln != "-A INPUT -j DROP") + "\n"
    result = run_apply(fwlab, neighbours.with_rule(change, "-A INPUT -p tcp --dport 8080 -j DROP"))
    assert result.returncode == 3, result.stderr
    assert "table ip filter holds what iptables-nft cannot show" in result.stderr
    assert record(fwlab, "case 5: after the refusal") == before
    assert fwlab.lab.srv_exec(["nft", "-s", "list", "table", "ip", "filter"]).stdout == native
    assert lab.new_login_ok(), "a NEW ssh login fails"
    assert not neighbours.tcp_probe(lab, src=extra[0]).ok, "the native ban no longer blocks"
    assert neighbours.tcp_probe(lab, src=extra[1]).ok
    assert fwlab.status()["state"] == "none"


def test_a_guard_killed_while_proving_leaves_no_sandbox(fwlab: FwLab) -> None:
    """Item 4 and the proof's own cleanup: the guard reverts, builds the access proof's sandbox
    (``fwpr<pid>s/c``, apart from `fwsafe check`'s ``fwck``) and is killed in the middle of
    it. The backstop takes over: it removes the dead guard's sandbox, finds the change undone,
    proves access again, and the record says reverted and verified."""
    before = record(fwlab, "killed while proving: before")
    armed = apply_detached(fwlab, neighbours.with_rule(before, "-A INPUT -p tcp --dport 8080 -j DROP"))
    guard = int(armed["guard_pid"])
    mine = {f"fwpr{guard}s", f"fwpr{guard}c"}
    end = time.monotonic() + 30
    while not mine & set(os.listdir("/run/netns") if os.path.isdir("/run/netns") else []):
        assert time.monotonic() < end, "the guard's proof sandbox never appeared"
        time.sleep(0.01)
    fwlab.lab.srv_exec(["kill", "-KILL", str(guard)])   # the guard we started, mid-proof
    print(f"\nkilled the guard (PID {guard}) while its proof sandbox existed")
    info = wait_reverted(fwlab)
    assert info["reverted_by"] == "backstop", info
    assert record(fwlab, "killed while proving: after the backstop") == before
    assert not mine & set(os.listdir("/run/netns")), "the dead guard's sandbox was left behind"
    assert fwlab.lab.new_login_ok()


@pytest.mark.parametrize("proof", [True, False], ids=["with-access-proof", "without"])
def test_the_access_proof_does_not_delay_the_way_back(fwlab: FwLab, proof: bool) -> None:
    """A lockout (NEW SSH dropped) reverted at its deadline: SSH answers a NEW connection as
    soon as without the proof (the proof runs once the revert is loaded), within 3 s of the
    deadline; printed both ways, with the time until the record says reverted."""
    before = record(fwlab, "lockout: before")
    result = run_apply(fwlab, neighbours.with_rule(before, f"-A INPUT {DROP_NEW}", first=True),
                       timeout=4, ssh=proof)
    assert result.returncode == 0, result.stderr
    deadline = float(json.loads(result.stdout)["deadline"])
    assert not fwlab.lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    while time.time() < deadline - 0.5:
        time.sleep(0.05)
    while not fwlab.lab.new_connection_ok(timeout=0.3):
        assert time.time() - deadline < 20, "SSH never came back"
        time.sleep(0.02)
    answered = time.time() - deadline
    info = wait_reverted(fwlab, verified=proof)
    recorded = info["events"][-1]["t"] - deadline
    print(f"\naccess proof {'on' if proof else 'off'}: deadline -> SSH answers {answered:.2f} s;"
          f" deadline -> record reverted {recorded:.2f} s")
    assert "access" in info["revert_proofs"]
    assert proof == info["revert_proofs"]["access"].startswith("access: a NEW SSH")
    assert answered < 3.0
    assert record(fwlab, "lockout: after") == before


def test_case2_an_incompatible_base_chain_another_program_made_is_found(fwlab: FwLab) -> None:
    """Case 2 the other way round: another program made a base chain `input` in ip filter with
    nft (iptables-save prints "contains incompatible base-chains" and leaves it out). An
    iptables change to filter is refused with exit 3, naming the table; nft's chain stays."""
    lab = fwlab.lab
    lab.srv_exec(["nft", "add", "chain", "ip", "filter", "input",
                  "{ type filter hook input priority 10; policy accept; }"])
    lab.srv_exec(["nft", "add", "rule", "ip", "filter", "input", "tcp", "dport", "2323", "drop"])
    before = record(fwlab, "case 2b: before")
    native = lab.srv_exec(["nft", "-s", "list", "table", "ip", "filter"]).stdout
    print(f"\n===== case 2b: before (nft -s list table ip filter) =====\n{native}")
    assert "tcp dport 2323" not in before
    result = run_apply(fwlab, neighbours.with_rule(before, "-A INPUT -p tcp --dport 8080 -j DROP"))
    assert result.returncode == 3, result.stderr
    assert "table ip filter holds what iptables-nft cannot show" in result.stderr
    assert record(fwlab, "case 2b: after the refusal") == before
    assert lab.srv_exec(["nft", "-s", "list", "table", "ip", "filter"]).stdout == native
    assert lab.new_login_ok()
    assert fwlab.status()["state"] == "none"
