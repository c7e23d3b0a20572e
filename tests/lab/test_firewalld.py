"""firewalld under the guard, with the real firewalld (nftables backend) in the systemd lab
(issue 24, item 1), on both generations: Debian 12's firewalld 1.3.3, then Debian 13's 2.3.1
(its table owned by firewalld, `flags owner,persist`).

On each generation, six containers boot side by side (the root fs variant with firewalld
installed, started here with `systemctl enable --now firewalld`) and run one case each at the
same time, so the waits overlap:

* runtime: `fwsafe firewall-cmd --remove-service=ssh`, not confirmed: by the deadline + 5 s a
  NEW ssh login gets in, firewalld is running and lists ssh, its model (with runtime-only
  ports, rich rules, sources, masquerade and direct rules from before the change, which the
  revert's reload drops and puts back) and its tables in the kernel are as before;
* permanent: `--permanent --remove-service=ssh` then `--reload` in one apply, not confirmed:
  reverted by the deadline + 5 s, /etc/firewalld byte-identical (content, modes, owners), and a
  later `firewall-cmd --reload` keeps SSH open;
* confirmed: first `fwsafe check`/`fwsafe diff` of firewall-cmd commands (runtime, permanent,
  a script with a reload) over NEW logins: each exits 3, firewalld's model, its table and
  /etc/firewalld are as before (item 0); then `--permanent --add-port=8080/tcp` and
  `--reload`, confirmed from a NEW connection: it stays, also after `firewall-cmd --reload`;
* reboot: the permanent removal and reload, then a hard reboot (`reboot -ff`) mid-window: the
  boot unit puts /etc/firewalld back before firewalld.service starts; SSH answers;
* stopped: `systemctl stop firewalld` under the guard, not confirmed: firewalld is started
  again (active, not failed) with its model and tables as before;
* hatch_alone: `--remove-service=ssh` with the guard and its watcher frozen (SIGSTOP): a NEW
  SSH login gets in by the kernel alone at the deadline + hatch_grace (firewalld 2.x: through
  the lo bridge past its owned table); resumed, the guard reverts and the bridge is gone;
* nft_file: an nft file of the admin's own (a table that drops SSH) applied with --force
  beside firewalld, not confirmed: reverted, firewalld's table untouched; the kernel escape
  hatch is in the file's table, and in firewalld's only where firewalld does not own it (2.x:
  `flags owner`, status says the hatch cannot open SSH through it).

(The panic mode case, `case_panic`, runs with tests/lab/test_firewalld_docker.py's containers:
fewer at once here.)

The seconds between the deadline and the first NEW SSH connection are printed (-s);
FWSAFE_FIREWALLD_JOURNAL=1 prints the guard's journal of each revert, too.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.crashmatrix import ssh_back
from tests.systemdlab import GENERATIONS, Image, SystemdLab, case_outcome, side_by_side

pytestmark = pytest.mark.lab

TIMEOUT = 10          # the guard's timeout (s): short, the cases wait for it in parallel
LATE_LIMIT = 5.0      # the revert must be done by the deadline + this
TREE = ("cd /etc/firewalld && find . -printf '%p %y %m %U %G\\n' | sort "
        "&& find . -type f -print0 | sort -z | xargs -0 -r sha256sum")


def start_firewalld(lab: SystemdLab) -> None:
    lab.exec(["systemctl", "enable", "--now", "firewalld"], timeout=120)
    state = lab.exec(["firewall-cmd", "--state"], check=False)
    assert state.stdout.strip() == "running", state.stdout + state.stderr
    assert lab.new_connection_ok(timeout=2), "SSH is closed with firewalld's defaults"


def tree(lab: SystemdLab) -> str:
    return lab.exec(["sh", "-c", TREE]).stdout


def services(lab: SystemdLab, *extra: str) -> list[str]:
    return lab.exec(["firewall-cmd", *extra, "--list-services"]).stdout.split()


def kernel(lab: SystemdLab) -> list[str]:
    text = lab.exec(["nft", "list", "table", "inet", "firewalld"]).stdout
    return sorted(line.strip() for line in text.splitlines() if line.strip())


# The variant's packages: firewalld and what `apt install firewalld` brings with it that
# matters here (its Recommends: ipset; firewalld 2.x runs `ipset list -terse` for a direct rule
# and fails without it).
FIREWALLD = ("firewalld", "ipset")

LOCKED_OUT = "lockout check of the live change: YOUR SSH CLIENT IS LOCKED OUT"
GETS_IN = "lockout check of the live change: a NEW SSH connection gets in"


def fwsafe_over_ssh(lab: SystemdLab, argv: list[str], verdict: str) -> dict[str, Any]:
    """Run fwsafe over a NEW SSH login (the client is known there); the transaction's status.
    `verdict`: what the kernel's rules said of the live change (firewalld's tables read)."""
    result = lab.ssh(shlex.join(argv), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert verdict in result.stderr, result.stderr
    info = lab.status()
    assert info["state"] == "pending", info
    return info


def wait_reverted(lab: SystemdLab, info: dict[str, Any], label: str,
                  whole_limit: float = LATE_LIMIT) -> float:
    """Seconds after the deadline at which a NEW SSH connection got in (printed; at most
    LATE_LIMIT); the revert with its proofs must be done by the deadline + `whole_limit`."""
    back = ssh_back(lab, TIMEOUT + 60)
    assert back is not None, lab.journal("-u", f"fwsafe-guard-{info['id']}.service")
    late = back - float(info["deadline"])
    final = lab.wait_state({"reverted", "revert-failed"}, 60)
    done = [e["t"] for e in final.get("events", []) if e["event"] == "reverted"]
    whole = f"{done[-1] - float(info['deadline']):+.2f} s" if done else "?"
    print(f"\n[firewalld] {label}: a NEW SSH login gets in {late:+.2f} s after the deadline; "
          f"the revert with its proofs done {whole}; record {final['state']} "
          f"{final.get('reason', '')!r}")
    assert final["state"] == "reverted", final
    journal = lab.journal("-u", f"fwsafe-guard-{info['id']}.service", "-o", "short-precise",
                          lines=80)
    if os.environ.get("FWSAFE_FIREWALLD_JOURNAL"):
        print(journal)
    assert final.get("reverted_by") == "guard", journal   # in time: never killed by the backstop
    assert late <= LATE_LIMIT, (late, journal)
    assert done and done[-1] - float(info["deadline"]) <= whole_limit, (whole, journal)
    return late


# Runtime-only state from before the change (not in the permanent config): a reload loses it,
# the revert must put it back with firewall-cmd.
RUNTIME_ONLY = (
    ["--add-port=7000/tcp"],
    ["--add-rich-rule=rule family=ipv4 source address=198.51.100.0/24 port port=7001 "
     "protocol=tcp accept"],
    ["--zone=trusted", "--add-source=192.0.2.0/24"],
    ["--zone=public", "--add-masquerade"],
    ["--zone=public", "--add-forward-port=port=8081:proto=tcp:toport=22"],
    ["--direct", "--add-rule", "ipv4", "filter", "INPUT", "0", "-p", "tcp", "--dport", "7002",
     "-j", "ACCEPT"],
    ["--direct", "--add-chain", "ipv4", "filter", "fwsafe_test"],
    ["--direct", "--add-rule", "ipv4", "filter", "fwsafe_test", "0", "-p", "tcp", "--dport",
     "7003", "-j", "ACCEPT"],
)


def model(lab: SystemdLab) -> str:
    """firewalld's runtime model as firewall-cmd lists it (direct rules of different chains
    sorted: firewalld lists them in the order they were added)."""
    listed = [lab.exec(["firewall-cmd", *argv]).stdout for argv in (
        ["--list-all-zones"], ["--list-all-policies"], ["--direct", "--get-all-chains"])]
    rules = lab.exec(["firewall-cmd", "--direct", "--get-all-rules"]).stdout
    return "".join(listed) + "".join(sorted(rules.splitlines(keepends=True)))


# The layer's two ways to read firewalld's model: in one process (firewall-cmd's own Python
# and printing code) and one firewall-cmd per listing. They must agree, to the byte.
READERS = ("import json; from fwsafe.backends import firewalld_client as f; "
           "print(json.dumps([f.listings_in_one_process(), f.listings_from_firewall_cmd()]))")


# The layer runs firewall-cmd commands in one process: the same exit status and output as
# firewall-cmd run on its own.
RUNNER_CHECK = ("import json; from fwsafe.backends import firewalld_client as f; print(json.dumps("
                "f.commands_in_one_process([['--zone=work', '--add-port=7100/tcp'], "
                "['--zone=work', '--query-port=7100/tcp'], ['--zone=work', '--add-service=nope'],"
                " ['--zone=work', '--remove-port=7100/tcp']])))")


def new_ipset(lab: SystemdLab, entry: str) -> None:
    """An ipset in the permanent configuration (loaded with a reload) with one runtime-only
    entry (a reload loses it)."""
    lab.exec(["firewall-cmd", "--permanent", "--new-ipset=fwsafe_test", "--type=hash:ip"])
    lab.exec(["firewall-cmd", "--reload"])
    lab.exec(["firewall-cmd", "--ipset=fwsafe_test", f"--add-entry={entry}"])


def ipset_entries(lab: SystemdLab) -> list[str]:
    return lab.exec(["firewall-cmd", "--ipset=fwsafe_test", "--get-entries"]).stdout.split()


def case_runtime(lab: SystemdLab) -> dict[str, Any]:
    ran = json.loads(lab.exec(["/opt/fwsafe/bin/python", "-c", RUNNER_CHECK]).stdout)
    assert [(code, out.strip()) for code, out, _err in ran] == [
        (0, "success"), (0, "yes"), (ran[2][0], ""), (0, "success")], ran
    assert ran[2][0] != 0 and "INVALID_SERVICE" in ran[2][2], ran
    new_ipset(lab, "192.0.2.7")
    for argv in RUNTIME_ONLY:
        lab.exec(["firewall-cmd", *argv])
    one, each = json.loads(lab.exec(["/opt/fwsafe/bin/python", "-c", READERS]).stdout)
    assert one is not None and one == each, (one, each)
    assert one["ipsets"] == "fwsafe_test 192.0.2.7\n", one
    before_kernel, before_tree, before_model = kernel(lab), tree(lab), model(lab)
    info = fwsafe_over_ssh(lab, ["fwsafe", "firewall-cmd", "--detach", "--json", "--timeout",
                                 str(TIMEOUT), "--remove-service=ssh"], LOCKED_OUT)
    assert "ssh" not in services(lab), "the change did not run"
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    hatch = lab.status().get("hatch") or {}
    late = wait_reverted(lab, info, "runtime --remove-service=ssh")
    return {"late": late, "running": lab.exec(["firewall-cmd", "--state"], check=False).stdout,
            "services": services(lab), "kernel": kernel(lab) == before_kernel,
            "model": model(lab) == before_model, "model_diff": "".join(difflib.unified_diff(
                before_model.splitlines(keepends=True), model(lab).splitlines(keepends=True))),
            "tree": tree(lab) == before_tree, "status": lab.status(), "hatch": hatch,
            "owned": "flags owner" in lab.exec(["nft", "list", "table", "inet",
                                                "firewalld"]).stdout}


def case_permanent(lab: SystemdLab) -> dict[str, Any]:
    new_ipset(lab, "192.0.2.7")
    before_tree = tree(lab)
    script = "firewall-cmd --permanent --remove-service=ssh && firewall-cmd --reload"
    info = fwsafe_over_ssh(lab, ["fwsafe", "apply", "--detach", "--json", "--timeout",
                                 str(TIMEOUT), "--", "sh", "-c", script], LOCKED_OUT)
    assert "ssh" not in services(lab, "--permanent"), "the permanent change did not run"
    assert tree(lab) != before_tree
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    late = wait_reverted(lab, info, "--permanent --remove-service=ssh + --reload")
    result = {"late": late, "tree": tree(lab) == before_tree, "services": services(lab),
              "permanent": services(lab, "--permanent"), "ipset": ipset_entries(lab)}
    lab.exec(["firewall-cmd", "--reload"])
    result["after_reload"] = lab.new_connection_ok(timeout=2)
    result["running"] = lab.exec(["firewall-cmd", "--state"], check=False).stdout
    return result


# What check and diff are asked about (issue 24, item 0): firewall-cmd talks to the live
# firewalld over the system D-Bus, so neither may run it; each must exit 3 and leave firewalld's
# model, its table in the kernel and /etc/firewalld as they were.
NOT_ON_A_COPY = (
    ["check", "--", "firewall-cmd", "--remove-service=ssh"],
    ["diff", "--", "firewall-cmd", "--add-port=7777/tcp"],
    ["check", "--", "sh", "-c",
     "firewall-cmd --permanent --remove-service=ssh && firewall-cmd --reload"],
    ["diff", "--", "firewall-cmd", "--permanent", "--add-port=7777/tcp"],
)


def check_and_diff_untouched(lab: SystemdLab) -> dict[str, Any]:
    """`fwsafe check` and `fwsafe diff` of firewall-cmd commands, over NEW SSH logins: their
    exit codes and messages, and whether the live firewalld is exactly as before."""
    before = (model(lab), kernel(lab), tree(lab))
    ran = []
    for argv in NOT_ON_A_COPY:
        result = lab.ssh(shlex.join(["fwsafe", *argv]), timeout=120)
        ran.append({"argv": argv, "code": result.returncode,
                    "err": result.stdout + result.stderr})
    return {"ran": ran, "same": (model(lab), kernel(lab), tree(lab)) == before,
            "ports": lab.exec(["firewall-cmd", "--list-ports"]).stdout.split()
            + lab.exec(["firewall-cmd", "--permanent", "--list-ports"]).stdout.split(),
            "ssh": lab.new_connection_ok(timeout=2)}


def case_confirmed(lab: SystemdLab) -> dict[str, Any]:
    untouched = check_and_diff_untouched(lab)
    script = "firewall-cmd --permanent --add-port=8080/tcp && firewall-cmd --reload"
    info = fwsafe_over_ssh(lab, ["fwsafe", "apply", "--detach", "--json", "--timeout", "60",
                                 "--", "sh", "-c", script], GETS_IN)
    started = time.monotonic()
    confirm = lab.ssh(f"fwsafe confirm {info['id']}", timeout=120)   # a NEW connection
    took = time.monotonic() - started
    print(f"\n[firewalld] confirmed from a new SSH login in {took:.2f} s")
    result = {"untouched": untouched,
              "confirm": confirm.returncode, "confirm_out": confirm.stdout + confirm.stderr,
              "status": lab.status(), "ports": lab.exec(["firewall-cmd", "--list-ports"]).stdout}
    lab.exec(["firewall-cmd", "--reload"])
    result["ports_after_reload"] = lab.exec(["firewall-cmd", "--list-ports"]).stdout
    result["ssh_after_reload"] = lab.new_connection_ok(timeout=2)
    result["nftables_conf"] = lab.exec(["cat", "/etc/nftables.conf"], check=False).stdout
    return result


def case_reboot(lab: SystemdLab) -> dict[str, Any]:
    before_tree = tree(lab)
    script = "firewall-cmd --permanent --remove-service=ssh && firewall-cmd --reload"
    fwsafe_over_ssh(lab, ["fwsafe", "apply", "--detach", "--json", "--timeout", "300",
                          "--", "sh", "-c", script], LOCKED_OUT)
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    lab.reboot(hard=True)
    back = lab.wait_ssh(90)
    print(f"\n[firewalld] hard reboot mid-window: SSH answers {back:.2f} s after the new boot")
    lab.wait_booted(90)
    return {"tree": tree(lab) == before_tree, "status": lab.status(),
            "running": lab.exec(["firewall-cmd", "--state"], check=False).stdout,
            "services": services(lab)}


def case_stopped(lab: SystemdLab) -> dict[str, Any]:
    before_model, before_kernel = model(lab), kernel(lab)
    # --no-check: systemctl finds no systemd in the check's sandbox (its /run is empty), fails
    # there, and the check refuses it (exit 3)
    info = fwsafe_over_ssh(lab, ["fwsafe", "apply", "--detach", "--json", "--no-check",
                                 "--timeout", str(TIMEOUT), "--", "systemctl", "stop",
                                 "firewalld"], "")
    assert lab.exec(["firewall-cmd", "--state"], check=False).returncode != 0
    wait_reverted(lab, info, "systemctl stop firewalld")
    return {"state": lab.exec(["systemctl", "is-active", "firewalld"], check=False).stdout,
            "model": model(lab) == before_model, "kernel": kernel(lab) == before_kernel}


def case_panic(lab: SystemdLab) -> dict[str, Any]:
    before_model, before_kernel = model(lab), kernel(lab)
    # panic mode drops every packet, the SSH session running fwsafe's too: it is started and
    # left (closed with the lab); the transaction is followed from inside the container
    lab.ssh_popen(shlex.join(["fwsafe", "firewall-cmd", "--detach", "--timeout", str(TIMEOUT),
                              "--panic-on"]), tty=False)
    end = time.monotonic() + 120
    info = lab.status()
    while info.get("state") != "pending":
        assert time.monotonic() < end, info
        time.sleep(0.3)
        info = lab.status()
    assert lab.exec(["firewall-cmd", "--query-panic"], check=False).stdout.strip() == "yes"
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    late = wait_reverted(lab, info, "--panic-on")
    return {"late": late,
            "panic": lab.exec(["firewall-cmd", "--query-panic"], check=False).stdout.strip(),
            "model": model(lab) == before_model, "kernel": kernel(lab) == before_kernel}


MINE = ("table inet mine {\n\tchain input {\n\t\ttype filter hook input priority 0; "
        "policy accept;\n\t\ttcp dport 22 drop\n\t}\n}\n")


def case_nft_file(lab: SystemdLab) -> dict[str, Any]:
    """An nft file of the admin's own beside firewalld (a table of its own that shuts SSH),
    applied with --force, not confirmed: the hatch is loaded with it in its table and never in
    firewalld's where firewalld owns it (nft would refuse the whole transaction); the revert
    leaves firewalld's table alone."""
    before_kernel = kernel(lab)
    lab.write("/root/mine.nft", MINE)
    info = fwsafe_over_ssh(lab, ["fwsafe", "apply", "--detach", "--json", "--force",
                                 "--timeout", str(TIMEOUT), "/root/mine.nft"], "")
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    hatch = lab.status().get("hatch") or {}
    mine = lab.exec(["nft", "list", "table", "inet", "mine"]).stdout
    theirs = lab.exec(["nft", "list", "table", "inet", "firewalld"]).stdout
    late = wait_reverted(lab, info, "an nft file beside firewalld (--force)")
    return {"late": late, "hatch": hatch, "hatch_in_mine": "fwsafe-hatch" in mine,
            "hatch_in_firewalld": "fwsafe-hatch" in theirs, "owned": "flags owner" in theirs,
            "kernel": kernel(lab) == before_kernel,
            "tables": lab.exec(["nft", "list", "tables"]).stdout.split("\n"),
            "running": lab.exec(["firewall-cmd", "--state"], check=False).stdout}


HATCH_GRACE = 3


def case_hatch_alone(lab: SystemdLab) -> dict[str, Any]:
    """`--remove-service=ssh`, not confirmed, the guard and its watcher frozen (SIGSTOP): SSH
    comes back by the kernel alone at the deadline + hatch_grace, in firewalld 1.x's table,
    and past firewalld 2.x's owned table through the lo bridge; resumed, the guard reverts
    and the bridge is gone."""
    lab.write("/etc/fwsafe/fwsafe.toml", f"stuck_grace = 60\nhatch_grace = {HATCH_GRACE}\n")
    info = fwsafe_over_ssh(lab, ["fwsafe", "firewall-cmd", "--detach", "--json", "--timeout",
                                 str(TIMEOUT), "--remove-service=ssh"], LOCKED_OUT)
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    pids = [str(info["guard_pid"]), str(info["backstop"]["pid"])]
    hatch = lab.status().get("hatch") or {}
    lab.exec(["kill", "-STOP", *pids])
    try:
        back = ssh_back(lab, TIMEOUT + 30)
        tables = lab.exec(["nft", "list", "tables"]).stdout
        text = lab.exec(["fwsafe", "status", "-v"], check=False).stdout
    finally:
        lab.exec(["kill", "-CONT", *pids], check=False)
    after = None if back is None else back - float(info["deadline"])
    print(f"\n[firewalld] guard and watcher SIGSTOPped: a NEW SSH login gets in "
          f"{after if after is None else f'{after:+.2f}'} s after the deadline (the kernel's "
          f"hatch alone, hatch_grace {HATCH_GRACE} s)")
    final = lab.wait_state({"reverted", "revert-failed"}, 90)
    return {"after": after, "hatch": hatch, "tables_frozen": tables, "status_text": text,
            "final": final, "tables": lab.exec(["nft", "list", "tables"]).stdout,
            "services": services(lab), "ssh": lab.new_connection_ok(timeout=2),
            "owned": "flags owner" in lab.exec(["nft", "list", "table", "inet",
                                                "firewalld"]).stdout}


CASES: dict[str, Callable[[SystemdLab], dict[str, Any]]] = {
    "hatch_alone": case_hatch_alone,
    "stopped": case_stopped,
    "runtime": case_runtime, "permanent": case_permanent, "confirmed": case_confirmed,
    "reboot": case_reboot, "nft_file": case_nft_file}


def firewalld_outcomes(request: pytest.FixtureRequest,
                       cases: dict[str, Callable[[SystemdLab], dict[str, Any]]]
                       ) -> Iterator[dict[str, Any]]:
    """Every case run at the same time, each in a container of its own booted from the firewalld
    variant of the generation `request.param` (a module fixture parametrized over GENERATIONS:
    the cases run on bookworm, then on trixie)."""
    yield from side_by_side(Image.build(suite=request.param, extra=FIREWALLD), cases,
                            start_firewalld)


@pytest.fixture(scope="module", params=GENERATIONS)
def outcomes(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    yield from firewalld_outcomes(request, CASES)


outcome = case_outcome


def test_runtime_removal_of_ssh_is_reverted_through_firewalld(outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "runtime")
    assert got["late"] <= LATE_LIMIT, got
    assert got["running"].strip() == "running"
    assert "ssh" in got["services"]
    assert got["model"], ("firewalld's runtime model is not as before (runtime-only state):\n"
                          + got["model_diff"])
    proofs = got["status"].get("revert_proofs") or {}
    assert "a NEW SSH connection gets in" in proofs.get("access", ""), got["status"]
    assert got["status"].get("revert_verified"), got["status"]
    assert got["kernel"], "firewalld's table in the kernel is not as before"
    assert got["tree"], "/etc/firewalld changed"
    # the kernel escape hatch: never an error; not in firewalld's table where firewalld owns it
    # (2.x: `flags owner`, nft refuses anyone else): past it through lo (the bridge), said so
    nft = str((got["hatch"].get("layers") or {}).get("nft"))
    assert got["hatch"].get("state") == "armed" and not nft.startswith("error"), got["hatch"]
    assert ("through lo past inet firewalld" in nft) == got["owned"], (nft, got["owned"])


def test_permanent_removal_and_reload_is_reverted_byte_identically(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "permanent")
    assert got["late"] <= LATE_LIMIT, got
    assert got["tree"], "/etc/firewalld is not byte-identical (content, modes, owners)"
    assert "ssh" in got["services"] and "ssh" in got["permanent"]
    # the runtime-only entry of an ipset, lost with the reloads, is put back
    assert got["ipset"] == ["192.0.2.7"], got["ipset"]
    assert got["after_reload"], "a later firewall-cmd --reload shut SSH"
    assert got["running"].strip() == "running"


def test_good_permanent_change_confirmed_stays(outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "confirmed")
    assert got["confirm"] == 0, got["confirm_out"]
    assert got["status"]["state"] == "confirmed", got["status"]
    assert "8080/tcp" in got["ports"].split()
    assert "8080/tcp" in got["ports_after_reload"].split()
    assert got["ssh_after_reload"]
    # the confirmed state's boot file (Debian's /etc/nftables.conf) leaves firewalld's tables
    # to firewalld
    assert "fwsafe" in got["nftables_conf"], got["nftables_conf"][:300]
    assert "table inet firewalld" not in got["nftables_conf"]


def test_check_and_diff_of_firewall_cmd_leave_the_live_firewalld_untouched(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "confirmed")["untouched"]
    for ran in got["ran"]:
        assert ran["code"] == 3, ran
        assert "cannot be tried on a copy" in ran["err"], ran
        assert "it was not run on the live host" in ran["err"], ran
    assert got["same"], "check/diff changed firewalld's model, its table or /etc/firewalld"
    assert "7777/tcp" not in got["ports"], got["ports"]
    assert got["ssh"], "a NEW SSH connection no longer gets in after check/diff"


def test_hard_reboot_mid_window_comes_back_with_the_old_permanent_config(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "reboot")
    assert got["tree"], "/etc/firewalld is not as before the change after the reboot"
    assert got["status"]["state"] == "reverted", got["status"]
    assert got["status"].get("reverted_by") == "boot", got["status"]
    assert got["running"].strip() == "running"
    assert "ssh" in got["services"]


def test_firewalld_stopped_in_the_window_is_started_again_with_its_model(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "stopped")
    assert got["state"].strip() == "active"
    assert got["model"] and got["kernel"], got



def test_an_nft_file_beside_firewalld_is_reverted_and_firewalds_table_left_alone(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "nft_file")
    assert got["late"] <= LATE_LIMIT, got
    assert got["running"].strip() == "running"
    assert got["kernel"], "firewalld's table in the kernel is not as before"
    assert "table inet mine" not in got["tables"], got["tables"]
    nft = str((got["hatch"].get("layers") or {}).get("nft"))
    assert got["hatch_in_mine"] and nft.startswith("loaded"), got["hatch"]
    # firewalld 2.x owns its table: the hatch is not there but passes it through lo (the
    # bridge); 1.x's table takes it like any other
    assert got["hatch_in_firewalld"] != got["owned"], got
    assert ("through lo past inet firewalld" in nft) == got["owned"], (nft, got["owned"])


def test_the_kernel_alone_lets_ssh_in_with_the_guard_frozen(outcomes: dict[str, Any]) -> None:
    """The last line of defence on a firewalld host: no fwsafe process runs, and a NEW SSH
    login gets in at the deadline + hatch_grace; on firewalld 2.x past its owned table
    (through lo, the bridge), on 1.x through the hatch in firewalld's table."""
    got = outcome(outcomes, "hatch_alone")
    assert got["after"] is not None, ("SSH did not come back by the kernel alone", got)
    assert got["after"] <= HATCH_GRACE + 5, got
    nft = str((got["hatch"].get("layers") or {}).get("nft"))
    assert nft.startswith("loaded"), got["hatch"]
    assert ("through lo past inet firewalld" in nft) == got["owned"], nft
    assert ("fwsafe_hatch" in got["tables_frozen"]) == got["owned"], got["tables_frozen"]
    if got["owned"]:
        assert "loops SSH through lo" in got["status_text"], got["status_text"]
    # resumed: the guard reverts; the hatch and its bridge are gone, firewalld lists ssh
    assert got["final"]["state"] == "reverted", got["final"]
    assert (got["final"].get("hatch") or {}).get("state") == "removed", got["final"]
    assert "fwsafe_hatch" not in got["tables"], got["tables"]
    assert "ssh" in got["services"] and got["ssh"]
