"""firewalld changed WITHOUT fwsafe (issue 25), with the real firewalld (the firewalld root fs
variant of the systemd lab, on both generations: Debian 12's 1.3.3, then Debian 13's 2.3.1):
the recovery by power cycle, and the shim that makes a plain `firewall-cmd` typed over SSH
guard itself.

On each generation, three containers boot side by side and run one case each at the same time
(the waits overlap):

* locked: a confirmed good state, then an unguarded `firewall-cmd --permanent
  --remove-service=ssh && firewall-cmd --reload`: one hard reboot changes nothing (still
  locked out), a second one within the window with no login in between puts /etc/firewalld
  back before firewalld.service starts: a NEW SSH login gets in, firewalld runs and lists ssh,
  /etc/firewalld is the known-good one byte for byte (modes, owners); status and history say so;
* login: the same with an unguarded change that does not lock out and an SSH login between
  the two reboots: nothing is changed;
* shim: `fwsafe shim install`, then `firewall-cmd --remove-service=ssh` typed on a terminal
  in an SSH session runs under the guard and is reverted at the deadline; a change confirmed
  from a NEW session stays; --list-all, --state and --get-* pass straight through; a script
  without a terminal runs the plain command; `fwsafe shim remove` leaves every file it touched
  byte-identical (the dpkg-divert state included).

The seconds from the second boot to SSH answering are printed (-s).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.crashmatrix import ssh_back
from tests.lab.test_firewalld import firewalld_outcomes, services, tree
from tests.lab.test_power_cycle import _diagnostics, _hard_reboot, _history
from tests.lab.test_shim_typed import _typed, _wait_state
from tests.systemdlab import GENERATIONS, SystemdLab, case_outcome

pytestmark = pytest.mark.lab

FIREWALL_CMD = "/usr/bin/firewall-cmd"
TIMEOUT = 10   # the guard's timeout in the shim case (s)


def confirm_good_state(lab: SystemdLab) -> str:
    """A change through fwsafe (the first apply installs the boot unit and the login hook),
    confirmed from a NEW session: the last known-good state has 8080 and ssh. /etc/firewalld
    as it is then."""
    script = "firewall-cmd --permanent --add-port=8080/tcp && firewall-cmd --reload"
    applied = lab.ssh(f"fwsafe apply --detach --json --timeout 120 -- sh -c '{script}'",
                      timeout=180)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    confirmed = lab.ssh(f"fwsafe confirm {json.loads(applied.stdout)['id']}", timeout=120)
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    assert "fwsafe" in lab.read("/etc/pam.d/common-session")   # the login hook is enabled
    assert "firewalld" in json.loads(
        lab.exec(["fwsafe", "show", "last", "--json"]).stdout)["layers"]
    return tree(lab)


def unguarded(lab: SystemdLab, *argv: str) -> None:
    """`firewall-cmd --permanent ARGV && firewall-cmd --reload` over SSH, without fwsafe."""
    script = f"firewall-cmd --permanent {' '.join(argv)} && firewall-cmd --reload"
    done = lab.ssh(script, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def diagnostics(lab: SystemdLab) -> str:
    return _diagnostics(lab) + lab.journal("-b", "-u", "firewalld.service", lines=20)


def started_at(lab: SystemdLab, unit: str) -> int:
    """When `unit` was started in this boot (µs, monotonic)."""
    out = lab.exec(["systemctl", "show", "-P", "ExecMainStartTimestampMonotonic", unit]).stdout
    return int(out.strip() or 0)


def case_locked(lab: SystemdLab) -> dict[str, Any]:
    good = confirm_good_state(lab)
    unguarded(lab, "--remove-service=ssh")
    assert not lab.new_connection_ok(timeout=1.0), "the lockout is not live"
    locked = tree(lab)
    entries = _history(lab)

    # One hard reboot: fwsafe did not guard it, so nothing changes: still locked out.
    _hard_reboot(lab)
    time.sleep(1.0)
    single = {"ssh": lab.new_connection_ok(timeout=1.0), "tree": tree(lab) == locked,
              "history": _history(lab) == entries,
              "services": lab.exec(["firewall-cmd", "--list-services"], check=False).stdout}

    # A second one within the window, no login in between: SSH gets in.
    lab.reboot(hard=True)
    pid1 = lab.boot_leader[-1]
    back = ssh_back(lab, 90)
    assert back is not None, diagnostics(lab)
    answered = time.monotonic()
    print(f"\n[power cycle, firewalld] PID 1 of the second boot -> SSH answering: "
          f"{answered - pid1:.2f} s")
    lab.wait_booted(90)
    active = lab.exec(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                       "firewalld.service"]).stdout.strip()
    with_rules = time.monotonic()
    assert lab.new_connection_ok(timeout=2.0), diagnostics(lab)   # through firewalld's rules
    print(f"[power cycle, firewalld] PID 1 -> firewalld active (its rules loaded): "
          f"{int(active or 0) / 1e6 - pid1:.2f} s; the boot finished, a NEW connection gets "
          f"in through them: {with_rules - pid1:.2f} s")
    info = lab.status()
    power = info["power_cycle"] or {}
    found = {"status_text": lab.ssh("fwsafe status").stdout, "history": _history(lab),
             "listing": lab.exec(["fwsafe", "history"]).stdout}
    # Undone by a rollback of the before-recovery entry (its files only): the files found at
    # boot back and firewalld reloaded, under the guard; reverted here.
    rolled = lab.ssh(f"fwsafe rollback --detach --json --timeout 120 {power.get('undo')}",
                     timeout=180)
    found["rollback"] = (rolled.returncode, rolled.stdout + rolled.stderr, tree(lab) == locked,
                         lab.new_connection_ok(timeout=1.0))
    if rolled.returncode == 0:
        reverted = lab.exec(["fwsafe", "revert", json.loads(rolled.stdout)["id"]], check=False)
        found["revert"] = (reverted.returncode, reverted.stdout + reverted.stderr,
                           tree(lab) == good, lab.new_connection_ok(timeout=2.0))
    return {**found, "single": single, "login": lab.ssh("true").returncode,
            "state": lab.exec(["firewall-cmd", "--state"], check=False).stdout,
            "services": services(lab), "tree": tree(lab) == good, "power": power,
            "order": (started_at(lab, "fwsafe-recover.service"),
                      started_at(lab, "firewalld.service")),
            "seconds": answered - pid1,
            "diagnostics": diagnostics(lab)}


def case_login(lab: SystemdLab) -> dict[str, Any]:
    confirm_good_state(lab)
    unguarded(lab, "--remove-port=8080/tcp")    # does not lock out
    changed = tree(lab)
    _hard_reboot(lab)
    lab.wait_ssh(60)
    login = lab.ssh("true").returncode           # someone got in
    _hard_reboot(lab)
    lab.wait_ssh(60)
    return {"login": login, "tree": tree(lab) == changed, "power": lab.status()["power_cycle"],
            "ports": lab.exec(["firewall-cmd", "--list-ports"]).stdout,
            "diagnostics": diagnostics(lab)}


def fingerprint(lab: SystemdLab) -> str:
    """What the shim touches: firewall-cmd, ufw (also here) and dpkg's record of diversions."""
    return lab.exec(["sh", "-c", "sha256sum /usr/bin/firewall-cmd* /usr/sbin/ufw* "
                     "/var/lib/dpkg/diversions; stat -c '%n %a %U %G %s %i' "
                     "/usr/bin/firewall-cmd* /usr/sbin/ufw*; dpkg-divert --list"]).stdout


def on_terminal(lab: SystemdLab, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.ssh_argv(command, tty=True), capture_output=True, text=True,
                          timeout=120, check=False)


def wait_new_pending(lab: SystemdLab, after: object) -> dict[str, Any]:
    end = time.monotonic() + 90
    while (info := lab.status())["state"] != "pending" or info["id"] in (None, after):
        assert time.monotonic() < end, info
        time.sleep(0.2)
    return info


def case_shim(lab: SystemdLab) -> dict[str, Any]:
    lab.write("/etc/fwsafe/fwsafe.toml", f"timeout = {TIMEOUT}\n")
    before = fingerprint(lab)
    installed = lab.exec(["fwsafe", "shim", "install", "--json"])
    found: dict[str, Any] = {"installed": json.loads(installed.stdout),
                             "diverted": lab.exec(["dpkg-divert", "--list",
                                                   FIREWALL_CMD]).stdout}

    # Read-only calls on a terminal: straight through, the real command's output, no
    # transaction.
    found["passthrough"] = {}
    for args in ("--list-all", "--state", "--get-default-zone", "--get-services",
                 "--zone=public --list-services", "--check-config"):
        typed = on_terminal(lab, f"firewall-cmd {args}")
        real = lab.exec([f"{FIREWALL_CMD}.fwsafe-real", *args.split()])
        found["passthrough"][args] = (typed.stdout.replace("\r\n", "\n") == real.stdout,
                                      typed.returncode, typed.stdout)
    found["after_read_only"] = lab.status()["state"]

    # The lockout typed on a terminal: under the guard, reverted at the deadline.
    session = _typed(lab, "firewall-cmd --remove-service=ssh")
    info = wait_new_pending(lab, None)
    found["live_removed"] = "ssh" not in services(lab)
    found["locked"] = not lab.new_connection_ok(timeout=1.0)
    back = ssh_back(lab, TIMEOUT + 60)
    found["late"] = None if back is None else back - float(info["deadline"])
    print(f"\n[shim, firewalld] typed `firewall-cmd --remove-service=ssh`, not confirmed: a NEW "
          f"SSH connection gets in {found['late']} s after the deadline")
    found["reverted"] = _wait_state(lab, info["id"], {"reverted"}, 60)["state"]
    found["session_exit"] = session.wait(timeout=60)
    found["new_login"] = lab.ssh("true").returncode
    found["services"] = services(lab)

    # A change confirmed from a NEW session stays.
    session = _typed(lab, "firewall-cmd --add-port=8081/tcp")
    info = wait_new_pending(lab, info["id"])
    found["confirm"] = lab.ssh(f"fwsafe confirm {info['id']}", timeout=120).returncode
    found["confirmed_exit"] = session.wait(timeout=60)
    found["ports"] = lab.exec(["firewall-cmd", "--list-ports"]).stdout.split()
    latest = info["id"]

    # A script (no terminal): the plain command, no transaction of its own.
    plain = lab.ssh("firewall-cmd --add-port=8082/tcp")
    found["script"] = (plain.returncode, plain.stdout.strip(), lab.status()["id"] == latest)
    found["script_ports"] = lab.exec(["firewall-cmd", "--list-ports"]).stdout.split()

    # Removed: every file the shim touched as before; plain firewall-cmd on a terminal again.
    found["removed"] = lab.exec(["fwsafe", "shim", "remove"], check=False).returncode
    found["fingerprint"] = (before, fingerprint(lab))
    typed = on_terminal(lab, "firewall-cmd --add-port=8084/tcp")
    found["plain_after"] = (typed.returncode, typed.stdout.strip(), lab.status()["id"] == latest,
                            "8084/tcp" in lab.exec(["firewall-cmd", "--list-ports"]).stdout)
    return found


CASES: dict[str, Callable[[SystemdLab], dict[str, Any]]] = {
    "locked": case_locked, "login": case_login, "shim": case_shim}


@pytest.fixture(scope="module", params=GENERATIONS)
def outcomes(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Every case run at the same time, each in a container of its own, on each generation."""
    yield from firewalld_outcomes(request, CASES)


outcome = case_outcome


def test_two_hard_reboots_without_a_login_put_etc_firewalld_back(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "locked")
    single = got["single"]
    assert not single["ssh"], "a single reboot changed a state fwsafe did not guard"
    assert single["tree"] and single["history"], single
    assert "ssh" not in single["services"].split(), single
    assert got["login"] == 0, got["diagnostics"]
    assert got["state"].strip() == "running"
    assert "ssh" in got["services"], got["diagnostics"]
    assert got["tree"], "/etc/firewalld is not the known-good one\n" + got["diagnostics"]
    recovered, firewalld = got["order"]
    assert 0 < recovered < firewalld, got["order"]   # put back before firewalld started
    power = got["power"]
    assert power.get("this_boot") and "no SSH login" in power["why"], power
    assert "/etc/firewalld/zones/public.xml" in power["written"], power
    assert "power-cycle recovery" in got["status_text"], got["status_text"]
    assert f"fwsafe rollback {power['undo']}" in got["status_text"]
    undo = [e for e in got["history"] if e["id"] == power["undo"]]
    assert undo and undo[0]["kind"] == "before-recovery", got["history"]
    assert "before-recovery" in got["listing"] and power["entry"] in got["listing"]
    code, out, files_back, ssh_open = got["rollback"]
    assert code == 0 and files_back and not ssh_open, got["rollback"]
    code, out, good_again, ssh_open = got["revert"]
    assert code == 4 and good_again and ssh_open, got["revert"]


def test_with_a_login_between_the_reboots_firewalld_is_left_alone(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "login")
    assert got["login"] == 0
    assert got["tree"], "/etc/firewalld was changed\n" + got["diagnostics"]
    assert got["power"] is None, got["power"]
    assert "8080/tcp" not in got["ports"].split()


def test_the_shim_guards_plain_firewall_cmd_typed_over_ssh(outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "shim")
    assert got["installed"]["ok"] and "fwsafe-real" in got["diverted"], got["installed"]
    for args, (same, code, out) in got["passthrough"].items():
        assert same and code == 0, (args, code, out)
    assert got["after_read_only"] == "none"
    assert got["live_removed"] and got["locked"], got
    assert got["reverted"] == "reverted" and got["session_exit"] == 4, got
    assert got["late"] is not None and got["late"] <= 10, got["late"]
    assert got["new_login"] == 0 and "ssh" in got["services"], got
    assert got["confirm"] == 0 and got["confirmed_exit"] == 0, got
    assert "8081/tcp" in got["ports"]
    code, out, no_tx = got["script"]
    assert code == 0 and out == "success" and no_tx, got["script"]
    assert "8082/tcp" in got["script_ports"]
    assert got["removed"] == 0
    before, after = got["fingerprint"]
    assert before == after, (before, after)
    code, out, no_tx, added = got["plain_after"]
    assert code == 0 and "success" in out and no_tx and added, got["plain_after"]
