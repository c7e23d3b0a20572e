"""Nothing holds the way back shut, under a real systemd (PID 1 in systemd-nspawn): a stopped
guard is `systemctl kill`ed by its watcher and ExecStopPost= reverts; with the guard and its
watcher both frozen the kernel's escape hatch lets SSH in, systemd's own limit (a transient
timer, moved with the deadline) kills the unit and ExecStopPost= reverts; and the crash matrix
on the systemd-specific paths (tests/crashmatrix.py). On both generations (bookworm: systemd
252, trixie: systemd 257; the matrix takes half its trials on trixie, see generation_trials).
Times are printed with -s."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fwsafe.check.netns import NETNS_DIR
from fwsafe.tool_stack import TOOL_STACK_BYTES
from tests.crashmatrix import (
    COLUMNS,
    Host,
    Matrix,
    NetnsProber,
    run_parallel,
    scan_processes,
    ssh_back,
    summary,
    trials,
)
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_NEW_SSH
from tests.systemdlab import TRIXIE, Image, SystemdLab

pytestmark = pytest.mark.lab

HATCH_GRACE = 3
STUCK_GRACE = 1
#: The failpoints whose trials take the systemd-specific paths: the guard's unit killed while
#: it applies, waits or reverts (ExecStopPost=), stuck (the watcher's `systemctl kill`), frozen
#: with its watcher (the hatch, then systemd's limit), and the take-over itself.
SYSTEMD_POINTS = ("guard.applied", "guard.waiting", "guard.reverting", "backstop.taking-over")


def _config(lab: SystemdLab) -> None:
    lab.write("/etc/fwsafe/fwsafe.toml", f"stuck_grace = {STUCK_GRACE}\n"
                                         f"hatch_grace = {HATCH_GRACE}\n")


def _baseline(lab: SystemdLab) -> str:
    lab.exec(["iptables-restore"], input=BASELINE_V4)
    lab.exec(["ip6tables-restore"], input=BASELINE_V6)
    return lab.ruleset()


def _pending(lab: SystemdLab, timeout: int) -> dict[str, Any]:
    lab.write("/root/drop.rules", DROP_NEW_SSH)
    result = lab.ssh(f"fwsafe apply --detach --json --force --no-check --timeout {timeout} "
                     "/root/drop.rules", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    info = lab.status()
    assert info["state"] == "pending" and info["guard_mode"] == "systemd-run", info
    assert not lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    # started by systemd (its own 8 MiB limit, not the CLI's): the guard and its backstop
    # raise the stack limit for the tools they run (fwsafe.tool_stack)
    for pid in (info["guard_pid"], info["backstop"]["pid"]):
        assert _stack_soft_limit(lab, int(pid)) == TOOL_STACK_BYTES, (pid, info["backstop"])
    return info


def _stack_soft_limit(lab: SystemdLab, pid: int) -> int | None:
    for line in lab.exec(["cat", f"/proc/{pid}/limits"]).stdout.splitlines():
        if line.startswith("Max stack size"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    return None


def _journal(lab: SystemdLab, tx_id: str) -> str:
    return lab.journal("-u", f"fwsafe-guard-{tx_id}.service", lines=60)


def test_a_stopped_guard_is_killed_by_systemctl_and_execstoppost_reverts(
        sdlab: SystemdLab) -> None:
    _config(sdlab)
    before = _baseline(sdlab)
    info = _pending(sdlab, timeout=3)
    sdlab.exec(["kill", "-STOP", str(info["guard_pid"])])
    back = ssh_back(sdlab, 20)
    assert back is not None, _journal(sdlab, info["id"])
    after = back - float(info["deadline"])
    print(f"\n[systemd lab] guard SIGSTOPped: SSH back {after:+.2f} s after the deadline "
          f"(stuck_grace {STUCK_GRACE} s)")
    assert after <= 10
    done = _wait_on_disk(sdlab, info["id"], {"reverted"}, 20)
    assert done["state"] == "reverted" and done["reverted_by"] == "backstop", done
    journal = _journal(sdlab, info["id"])
    assert "on client request" in journal and "SIGKILL" in journal, journal   # systemctl kill
    assert sdlab.ruleset() == before
    left = sdlab.exec(["systemctl", "list-units", "--all", "--no-legend", "fwsafe-limit-*"],
                      check=False).stdout
    assert "active" not in left.replace("inactive", ""), left   # its limit went with it


def test_guard_and_watcher_frozen_the_hatch_then_systemds_limit(sdlab: SystemdLab) -> None:
    _config(sdlab)
    before = _baseline(sdlab)
    info = _pending(sdlab, timeout=3)
    assert info["hatch"]["state"] == "armed", info["hatch"]
    sdlab.exec(["kill", "-STOP", str(info["guard_pid"]), str(info["backstop"]["pid"])])
    back = ssh_back(sdlab, 20)
    assert back is not None, _journal(sdlab, info["id"])
    after = back - float(info["deadline"])
    print(f"\n[systemd lab] guard and watcher SIGSTOPped: SSH back {after:+.2f} s after the "
          f"deadline (the hatch, hatch_grace {HATCH_GRACE} s)")
    assert after <= HATCH_GRACE + 5
    # No SIGCONT: systemd's own limit (deadline + hatch_grace + stuck_grace) kills the unit,
    # and ExecStopPost= reverts.
    done = _wait_on_disk(sdlab, info["id"], {"reverted"}, 30)
    assert done["state"] == "reverted" and done["reverted_by"] == "backstop", done
    print(f"[systemd lab] systemd's limit: reverted {time.time() - float(info['deadline']):.1f} "
          "s after the deadline")
    assert "fwsafe-hatch" not in sdlab.exec(["iptables-save"]).stdout
    assert sdlab.ruleset() == before
    sdlab.exec(["kill", "-CONT", str(info["guard_pid"]), str(info["backstop"]["pid"])],
               check=False)   # long gone: nothing to resume
    assert sdlab.status()["state"] == "reverted"


FAILPOINTS = "/var/tmp/fwsafe-failpoints"
#: The window of the "everything killed" change: the guard and its watcher are SIGKILLed before
#: its deadline, over two nsenter calls after the apply's SSH session returns (3 s was too
#: short on the 2-core machine under load: the guard had reverted and its watcher ended first).
KILLED_WINDOW = 6


def _record_on_disk(lab: SystemdLab, tx_id: str) -> dict[str, Any]:
    """The record as the disk has it (read without running fwsafe: any fwsafe command would
    converge the transaction itself)."""
    data: dict[str, Any] = json.loads(lab.read(f"/var/lib/fwsafe/tx/{tx_id}/record.json"))
    return data


def _wait_on_disk(lab: SystemdLab, tx_id: str, states: set[str], limit: float
                  ) -> dict[str, Any]:
    """Until the record on disk is in one of `states` (or `limit` seconds): read without
    fwsafe, whose every command converges an orphaned transaction itself, so that polling
    `fwsafe status` could take it over between systemd's kill and ExecStopPost= (a late
    take-over instead of the backstop: seen once in CI)."""
    end = time.monotonic() + limit
    while True:
        data = _record_on_disk(lab, tx_id)
        if data.get("state") in states or time.monotonic() > end:
            return data
        time.sleep(0.1)


def _everything_killed(lab: SystemdLab) -> dict[str, Any]:
    """A lockout pending; then its guard and watcher SIGKILLed together, and the take-over
    systemd starts (ExecStopPost=) SIGKILLed too where it begins: nothing of fwsafe is left
    but systemd's limit timer."""
    lab.exec(["mkdir", "-p", "-m", "0700", FAILPOINTS])
    lab.write("/root/drop.rules", DROP_NEW_SSH)
    applied = lab.ssh(f"FWSAFE_FAILPOINTS=backstop.taking-over=pause "
                      f"FWSAFE_FAILPOINT_DIR={FAILPOINTS} fwsafe apply --detach --json --force "
                      f"--no-check --timeout {KILLED_WINDOW} /root/drop.rules", timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    info = _record_on_disk(lab, lab.read("/var/lib/fwsafe/current").strip())
    killed = lab.exec(["kill", "-KILL", str(info["guard_pid"]), str(info["backstop"]["pid"])],
                      check=False)
    assert killed.returncode == 0, (
        f"{killed.stderr.strip()}: {time.time() - float(info['deadline']):+.1f} s from the "
        "deadline (the guard and its watcher must still run when they are killed)")
    markers = lab.root / FAILPOINTS.lstrip("/")
    end = time.monotonic() + 20
    while not list(markers.glob("backstop.taking-over.*")):
        assert time.monotonic() < end, "ExecStopPost= never began its take-over"
        time.sleep(0.05)
    marker = next(markers.glob("backstop.taking-over.*"))
    lab.exec(["kill", "-KILL", marker.name.rsplit(".", 1)[1]])
    marker.unlink()
    return info


def test_everything_killed_systemds_limit_timer_converges(sdlab: SystemdLab) -> None:
    """Guard, watcher and ExecStopPost='s take-over all SIGKILLed: the hatch lets SSH in, and
    systemd's limit timer (a unit of its own) takes the transaction over: reverted, no hatch
    left, with no fwsafe command run and no login."""
    _config(sdlab)
    before = _baseline(sdlab)
    info = _everything_killed(sdlab)
    end = time.time() + KILLED_WINDOW + HATCH_GRACE + STUCK_GRACE + 15
    while _record_on_disk(sdlab, info["id"])["state"] != "reverted" and time.time() < end:
        time.sleep(0.2)
    done = _record_on_disk(sdlab, info["id"])
    assert done["state"] == "reverted", (done["state"], _journal(sdlab, info["id"]))
    print(f"\n[systemd lab] guard, watcher and ExecStopPost= killed: systemd's limit timer "
          f"reverted {time.time() - float(info['deadline']):.1f} s after the deadline")
    assert "systemd's limit" in done["reason"], done["reason"]
    assert "fwsafe-hatch" not in sdlab.exec(["iptables-save"]).stdout
    assert sdlab.ruleset() == before


def test_a_login_through_the_hatch_converges(sdlab: SystemdLab) -> None:
    """Everything of fwsafe killed and systemd's limit timer stopped as well: the admin's SSH
    login through the kernel's hatch runs the login hook (the PAM session hook of
    fwsafe.persistence.loginhook, which the first apply installs with pam-auth-update), which
    reverts the transaction in the background; the login is not held up."""
    _config(sdlab)
    before = _baseline(sdlab)
    info = _everything_killed(sdlab)
    hook = sdlab.read("/etc/pam.d/common-session")
    assert "/usr/local/lib/fwsafe/login-mark" in hook, hook   # installed by the first apply
    sdlab.exec(["sh", "-c", f"systemctl stop 'fwsafe-limit-{info['id']}-*.timer'"])
    back = ssh_back(sdlab, KILLED_WINDOW + HATCH_GRACE + 15)
    assert back is not None, "the hatch did not let SSH in"
    assert _record_on_disk(sdlab, info["id"])["state"] == "pending"   # nobody converged yet
    started = time.monotonic()
    login = sdlab.ssh("true", timeout=30)
    took = time.monotonic() - started
    assert login.returncode == 0, login.stdout + login.stderr
    end = time.monotonic() + 15
    while _record_on_disk(sdlab, info["id"])["state"] != "reverted" and time.monotonic() < end:
        time.sleep(0.2)
    done = _record_on_disk(sdlab, info["id"])
    print(f"\n[systemd lab] login through the hatch: the login took {took:.2f} s; reverted "
          f"{time.monotonic() - started:.1f} s after it began")
    assert done["state"] == "reverted" and done["reverted_by"] == "late take-over", done
    assert "fwsafe-hatch" not in sdlab.exec(["iptables-save"]).stdout
    assert sdlab.ruleset() == before


class SystemdHost(Host):
    """A systemd-lab container, as the crash matrix reaches it: commands through nsenter, its
    processes and failpoint markers seen from here (host PIDs; markers in its disk)."""

    def __init__(self, lab: SystemdLab) -> None:
        self.lab = lab
        self.state_dir = "/var/lib/fwsafe"
        self.client_ip, self.server_ip = lab.cli_ip4, lab.ip4
        self.failpoint_dir = "/var/tmp/fwsafe-failpoints"
        self.rules_dir = "/root"
        lab.exec(["mkdir", "-p", "-m", "0700", self.failpoint_dir])
        self.markers_here = lab.root / self.failpoint_dir.lstrip("/")
        self.pidns = ""
        self.prober = NetnsProber(str(NETNS_DIR / lab.cli_ns))

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        result = self.lab.exec(self.env_argv(argv, env), check=False, input=input,
                               timeout=timeout)
        return result.returncode, result.stdout, result.stderr

    def start(self, argv: Sequence[str], env: dict[str, str]) -> Any:
        return subprocess.Popen(self.lab.exec_argv(self.env_argv(argv, env)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def _inside(self, entry: Path) -> bool:
        try:
            return os.readlink(entry / "ns" / "pid") == self.pidns
        except OSError:
            return False

    def processes(self) -> dict[str, list[int]]:
        self.pidns = os.readlink(f"/proc/{self.lab.leader}/ns/pid")
        return scan_processes(self.state_dir, only=self._inside)

    def marker_pid(self, marker: str) -> int:
        """The host PID of the container's process that wrote `marker`."""
        inner = marker.rsplit(".", 1)[1]
        self.pidns = os.readlink(f"/proc/{self.lab.leader}/ns/pid")
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._inside(entry):
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == inner:
                        return int(entry.name)
        return -1

    def write(self, path: str, text: str) -> None:
        self.lab.write(path, text)

    def close(self) -> None:
        self.prober.close()


def generation_trials(suite: str) -> list[tuple[str, str]]:
    """The crash matrix's trials on one generation: on bookworm every systemd-specific failpoint
    x every column (24 trials); on trixie (the same code paths under systemd 257) half of them,
    a checkerboard: each failpoint in three columns, each column with two failpoints (the whole
    matrix doubled the test's time). FWSAFE_SDLAB_TRIXIE_MATRIX=all runs all 24 there too."""
    every = trials(list(SYSTEMD_POINTS), COLUMNS)
    if suite != TRIXIE or os.environ.get("FWSAFE_SDLAB_TRIXIE_MATRIX", "") == "all":
        return every
    return [(fp, column) for fp, column in every
            if (SYSTEMD_POINTS.index(fp) + COLUMNS.index(column)) % 2 == 0]


def test_crash_matrix_systemd(sdlab_generation_image: Image) -> None:
    """Two containers side by side, the systemd-specific failpoints x every column (a subset
    on trixie: generation_trials)."""
    image = sdlab_generation_image
    labs: list[SystemdLab] = []
    hosts: list[SystemdHost] = []
    try:
        starters = [threading.Thread(target=lambda: labs.append(SystemdLab.start(image)))
                    for _ in range(2)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        assert len(labs) == 2, "a container did not start"
        for lab in labs:
            lab.exec(["iptables-restore"], input=BASELINE_V4)
            lab.exec(["ip6tables-restore"], input=BASELINE_V6)
            hosts.append(SystemdHost(lab))
        work = generation_trials(image.suite)
        results = run_parallel([Matrix(host, log=lambda line: print(f"[systemd] {line}"))
                                for host in hosts], work)
        print(f"\n[systemd lab, {image.suite}] " + summary(results))
        failed = [r.line() for r in results if not r.ok]
        assert not failed, "\n".join(failed)
    finally:
        for host in hosts:
            host.close()
        for lab in labs:
            lab.close()
