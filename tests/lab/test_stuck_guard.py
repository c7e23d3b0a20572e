"""Nothing on the host holds the way back shut (issue 23) in the namespace lab: a guard alive but
stuck is killed by its backstop at the deadline + stuck_grace; an extension reaches the
backstop's copy of the deadline; the backstop's take-over lets `status` and `confirm` answer
meanwhile; confirm, revert and extend in a race answer from the settled record (4, never 3);
a lock held by someone else is named in `status`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import crashmatrix
from tests.bins import FWSAFE
from tests.conftest import FwLab
from tests.rulesets import DROP_NEW_SSH

pytestmark = pytest.mark.lab

STUCK_GRACE = 1


def config(fw: FwLab, text: str = "") -> Path:
    path = fw.write("fwsafe.toml", f"stuck_grace = {STUCK_GRACE}\nhatch = false\n{text}")
    return path


def run(fw: FwLab, cfg: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return fw.lab.srv_exec(["env", f"FWSAFE_STATE_DIR={fw.state_dir}", f"FWSAFE_CONFIG={cfg}",
                            *extra, FWSAFE, *args], check=False, timeout=timeout)


def pending(fw: FwLab, cfg: Path, timeout: int, env: dict[str, str] | None = None
            ) -> dict[str, Any]:
    rules = fw.write("drop-new.rules", DROP_NEW_SSH)
    result = run(fw, cfg, "apply", "--detach", "--json", "--force", "--no-check",
                 "--timeout", str(timeout), str(rules), env=env)
    assert result.returncode == 0, result.stderr
    info = fw.status()
    assert info["state"] == "pending" and not fw.lab.new_connection_ok(timeout=0.5)
    return info


def ssh_back(fw: FwLab, limit_s: float) -> float | None:
    """Wall-clock time at which a NEW TCP connection first gets the SSH banner, or None."""
    return crashmatrix.ssh_back(fw.lab, limit_s)


@contextlib.contextmanager
def stopped(*pids: int) -> Iterator[None]:
    """SIGSTOP the guard's processes (ours: started by this test's apply); SIGCONT after."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_a_stopped_guard_is_killed_by_its_backstop_past_the_deadline(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    cfg = config(fwlab)
    info = pending(fwlab, cfg, timeout=3)
    guard = int(info["guard_pid"])
    with stopped(guard):
        shown = run(fwlab, cfg, "status")
        assert "STOPPED" in shown.stdout, shown.stdout
        back = ssh_back(fwlab, 15)
    assert back is not None, "SSH did not come back with the guard stopped"
    after = back - float(info["deadline"])
    print(f"\nguard SIGSTOPped: SSH back {after:+.2f} s after the deadline (stuck_grace "
          f"{STUCK_GRACE} s; namespace lab)")
    assert after <= 10
    done = fwlab.wait_state({"reverted"}, 10)
    assert done["reverted_by"] == "backstop" and "stuck" in done["reason"], done
    assert not Path(f"/proc/{guard}").exists() or \
        Path(f"/proc/{guard}/stat").read_text().split(")")[1].split()[0] == "Z"
    assert fwlab.lab.ruleset() == before


def test_an_extension_reaches_the_backstops_copy_of_the_deadline(fwlab: FwLab) -> None:
    cfg = config(fwlab)
    info = pending(fwlab, cfg, timeout=2)
    extended = run(fwlab, cfg, "extend", "6", "--json")
    assert extended.returncode == 0, extended.stderr
    guard = int(info["guard_pid"])
    with stopped(guard):
        time.sleep(2 + STUCK_GRACE + 2)   # past the first deadline and its grace
        assert Path(f"/proc/{guard}").exists(), "the backstop killed a guard it had extended"
        assert fwlab.status()["state"] == "pending"
        back = ssh_back(fwlab, 15)
    assert back is not None
    new_deadline = float(json.loads(extended.stdout)["deadline"])
    assert new_deadline - 0.5 <= back <= new_deadline + 10
    assert fwlab.wait_state({"reverted"}, 10)["reverted_by"] == "backstop"


def test_the_take_over_lets_status_and_confirm_answer_with_the_truth(fwlab: FwLab) -> None:
    """The backstop reverts slowly (a failpoint makes each round of its revert take 3 s): it
    holds no lock meanwhile, so `status` answers at once and says so, and `confirm` waits for
    the outcome and exits 4 (reverted), never 3."""
    cfg = config(fwlab)
    info = pending(fwlab, cfg, timeout=30, env={"FWSAFE_FAILPOINTS": "revert.round=sleep:3"})
    os.kill(int(info["guard_pid"]), signal.SIGKILL)   # the guard we started
    time.sleep(0.5)
    started = time.monotonic()
    status = run(fwlab, cfg, "status", "--json")
    took = time.monotonic() - started
    assert status.returncode == 0 and took < 2.5, (took, status.stderr)
    shown = json.loads(status.stdout)
    assert shown["state"] == "reverting" and shown["taken_over"], shown
    confirm = run(fwlab, cfg, "confirm")
    assert confirm.returncode == 4, confirm.stdout + confirm.stderr
    assert "reverted" in confirm.stderr
    assert fwlab.status()["reverted_by"] == "backstop"


def test_confirm_against_a_guard_busy_reverting_exits_4(fwlab: FwLab) -> None:
    cfg = config(fwlab)
    pending(fwlab, cfg, timeout=2, env={"FWSAFE_FAILPOINTS": "guard.reverting=sleep:2"})
    time.sleep(2.5)   # the guard is reverting (slowly) now
    confirm = run(fwlab, cfg, "confirm")
    assert confirm.returncode == 4, confirm.stdout + confirm.stderr
    extend = run(fwlab, cfg, "extend", "10")
    assert extend.returncode == 4, extend.stdout + extend.stderr
    revert = run(fwlab, cfg, "revert")
    assert revert.returncode == 4, revert.stdout + revert.stderr


def test_revert_stops_a_stuck_guard_at_once(fwlab: FwLab) -> None:
    cfg = config(fwlab)
    info = pending(fwlab, cfg, timeout=60)
    guard = int(info["guard_pid"])
    with stopped(guard):
        started = time.monotonic()
        result = run(fwlab, cfg, "revert", timeout=180)
    assert result.returncode == 4, result.stdout + result.stderr
    print(f"\n`fwsafe revert` of a stopped guard: {time.monotonic() - started:.1f} s")
    assert fwlab.lab.new_connection_ok(timeout=1)
    assert fwlab.status()["state"] == "reverted"


def test_an_xtables_lock_held_by_another_program_is_named_in_status(fwlab: FwLab) -> None:
    """A change of iptables-legacy's tables (a command under the guard) cannot be reverted
    while another program holds the xtables lock: the revert goes on trying, and `status`
    names who holds the lock; once it is let go, the revert is done."""
    cfg = config(fwlab)
    result = run(fwlab, cfg, "apply", "--detach", "--json", "--force", "--no-check",
                 "--timeout", "2", "--", "iptables-legacy", "-A", "INPUT", "-p", "tcp",
                 "--dport", "2222", "-j", "DROP")
    assert result.returncode == 0, result.stderr
    assert "ipv4-legacy" in fwlab.status()["touched"]
    holder = subprocess.Popen(["flock", "/run/xtables.lock", "sleep", "6"],
                              start_new_session=True)   # held 6 s at most
    try:
        end = time.monotonic() + 10
        shown = run(fwlab, cfg, "status")
        while time.monotonic() < end and "xtables lock is held by" not in shown.stdout:
            time.sleep(0.2)
            shown = run(fwlab, cfg, "status")
        assert "reverting" in shown.stdout and "sleep 6" in shown.stdout, shown.stdout
        assert "xtables lock is held by PID" in shown.stdout, shown.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)   # flock and its sleep, which we started
        holder.wait()
    done = fwlab.wait_state({"reverted"}, 30)
    assert done["state"] == "reverted", done
    assert "2222" not in fwlab.lab.srv_exec(["iptables-legacy-save"]).stdout


def test_guard_and_backstop_killed_together_the_next_command_converges(fwlab: FwLab) -> None:
    """Guard and backstop SIGKILLed together (no systemd here): the kernel hatch lets SSH in
    past the deadline + hatch_grace; the first fwsafe command of any kind then finds the
    transaction open past its deadline with nobody on it, takes it over and answers with the
    truth: reverted, the rules as before, no hatch left."""
    before = fwlab.lab.ruleset()
    cfg = config(fwlab).with_name("fwsafe.toml")
    cfg.write_text(f"stuck_grace = {STUCK_GRACE}\nhatch_grace = 2\n"
                   f'admin_sources = ["{fwlab.lab.cli_ip4}"]\n')
    info = pending(fwlab, cfg, timeout=2)
    procs = crashmatrix.scan_processes(str(fwlab.state_dir))
    assert procs["guard"] and procs["backstop"], procs
    for pid in procs["guard"] + procs["backstop"]:   # ours: started by this test's apply
        os.kill(pid, signal.SIGKILL)
    back = ssh_back(fwlab, 2 + 2 + 10)
    assert back is not None, "the hatch did not let SSH in"
    print(f"\nguard and backstop SIGKILLed: SSH back (hatch) "
          f"{back - float(info['deadline']):+.2f} s after the deadline")
    assert "fwsafe-hatch" in fwlab.lab.srv_exec(["iptables-save"]).stdout   # nobody converged
    started = time.monotonic()
    shown = run(fwlab, cfg, "status", "--json")
    took = time.monotonic() - started
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    print(f"the next `fwsafe status` converged in {took:.2f} s: {info['state']}")
    assert info["state"] == "reverted" and info["reverted_by"] == "late take-over", info
    assert took < 8
    assert fwlab.lab.ruleset() == before
    assert "fwsafe-hatch" not in fwlab.lab.srv_exec(["iptables-save"]).stdout
    assert not any(crashmatrix.scan_processes(str(fwlab.state_dir)).values())
