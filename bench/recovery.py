"""Time to recover: from the moment a lockout ruleset is live to the moment a NEW SSH connection
succeeds again, for fwsafe and for Debian's iptables-apply, run the way an admin runs them: in
an interactive `ssh -tt` session into the lab's server.

"Live" is when the tool's prompt reaches the admin's terminal (both print it right after the
rules are loaded). "Recovered" is when a brand-new TCP connection from the client namespace gets
sshd's "SSH-" banner (a poller starts a new connection every 50 ms); a full new ssh login is
checked right after.

Sessions either stay (nobody answers) or are hung up (the client's ssh process is killed once
the poller has seen the lockout). iptables-apply's HUP trap deletes its saved rules, so after a
hang-up it never restores them: the run is reported as "never (within N s)" and the lab is
deleted and rebuilt for the next run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.labkit import (
    INDEX_RECOVERY,
    LOCKOUT_V4,
    PROBE_PORT,
    BenchLab,
    Poller,
    SessionReader,
    apply_flags,
    open_lab,
)

IPTABLES_APPLY = "/usr/sbin/iptables-apply"
PROBE_INTERVAL = 0.5
PROBE_FAILURES = 2
FAST_PROBE_TIMEOUT = 0.5
FWSAFE_PROMPT = r"left"
IPTABLES_APPLY_PROMPT = r"Can you establish NEW connections"


@dataclass(frozen=True)
class Scenario:
    name: str
    tool: str           # "fwsafe" or "iptables-apply"
    session: str        # "stays" or "hangup"
    kind: str           # "deadline", "probe", "probe-fast"
    description: str


SCENARIOS = (
    Scenario("fwsafe deadline, session stays", "fwsafe", "stays", "deadline",
             "fwsafe apply --timeout T in the session; nobody answers"),
    Scenario("iptables-apply, session stays", "iptables-apply", "stays", "deadline",
             "iptables-apply -t T in the session; nobody answers"),
    Scenario("fwsafe probe, session stays", "fwsafe", "stays", "probe",
             f"fwsafe apply --probe tcp://SRV:{PROBE_PORT} --probe-interval {PROBE_INTERVAL} "
             f"--probe-failures {PROBE_FAILURES} --timeout LONG (default probe timeout, 3 s)"),
    Scenario("fwsafe probe, probe_timeout 0.5", "fwsafe", "stays", "probe-fast",
             f"the same with probe_timeout = {FAST_PROBE_TIMEOUT} in a config file "
             "(what would meet the target)"),
    Scenario("fwsafe deadline, session hung up", "fwsafe", "hangup", "deadline",
             "fwsafe apply --timeout T; the client's ssh is killed once the lockout is seen"),
    Scenario("iptables-apply, session hung up", "iptables-apply", "hangup", "deadline",
             "iptables-apply -t T; the client's ssh is killed once the lockout is seen"),
)


class LabHolder:
    """The recovery lab, rebuilt when a run leaves it locked out."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.bl: BenchLab | None = None
        self.rebuilds = 0
        self.baseline = ""

    def get(self) -> BenchLab:
        if self.bl is None:
            self.bl = open_lab("r", INDEX_RECOVERY, listener=True)
            self.bl.write("lockout.rules", LOCKOUT_V4)
            self.bl.write("probe-fast.toml", f"probe_timeout = {FAST_PROBE_TIMEOUT}\n")
            self.baseline = self.bl.lab.ruleset()
        return self.bl

    def rebuild(self) -> None:
        self.close()
        self.rebuilds += 1
        self.get()

    def close(self) -> None:
        bl, self.bl = self.bl, None
        if bl is not None:
            bl.close()


def iptables_apply_available() -> str | None:
    """None if iptables-apply can run here; else why not."""
    if not os.access(IPTABLES_APPLY, os.X_OK):
        return f"{IPTABLES_APPLY} not installed (Debian package iptables)"
    # It stops and starts fail2ban through /etc/init.d: that would reach the host's service.
    if os.path.exists("/etc/init.d/fail2ban"):
        return "/etc/init.d/fail2ban exists: iptables-apply would stop the host's fail2ban"
    return None


def _command(sc: Scenario, bl: BenchLab, timeout_s: int, long_s: int) -> tuple[str, str]:
    rules = bl.files["lockout.rules"]
    if sc.tool == "iptables-apply":
        return f"{IPTABLES_APPLY} -t {timeout_s} {rules}", IPTABLES_APPLY_PROMPT
    # fwsafe's lockout check refuses this ruleset up front; --force lets it go live, so that
    # what is measured is the recovery from a lockout that got through.
    force = "--force " if "--force" in apply_flags() else ""
    if sc.kind == "deadline":
        return f"fwsafe apply {force}--timeout {timeout_s} {rules}", FWSAFE_PROMPT
    probe = (f"--probe tcp://{bl.lab.srv_ip4}:{PROBE_PORT} --probe-interval {PROBE_INTERVAL} "
             f"--probe-failures {PROBE_FAILURES}")
    config = f"--config {bl.files['probe-fast.toml']} " if sc.kind == "probe-fast" else ""
    return f"fwsafe apply {force}{config}--timeout {long_s} {probe} {rules}", FWSAFE_PROMPT


def run_refused(holder: LabHolder, timeout_s: int) -> dict[str, Any]:
    """Without --force: fwsafe's lockout check refuses the lockout before anything changes.
    Measures how long the refusal takes (over SSH, as an admin runs it) and that new SSH
    connections never stopped working."""
    bl = holder.get()
    rules = bl.files["lockout.rules"]
    started = time.monotonic()
    result = bl.lab.ssh(f"fwsafe apply --timeout {timeout_s} {rules}", timeout=120)
    elapsed = time.monotonic() - started
    ok = bl.lab.new_connection_ok(timeout=1.0)
    same = bl.lab.ruleset() == holder.baseline
    return {"exit": result.returncode, "seconds": elapsed, "new_connection_ok": ok,
            "rules_unchanged": same, "message": result.stderr.strip().splitlines()[:1]}


def run_once(holder: LabHolder, sc: Scenario, timeout_s: int, long_s: int,
             limit_s: float) -> dict[str, Any]:
    bl = holder.get()
    command, prompt = _command(sc, bl, timeout_s, long_s)
    result: dict[str, Any] = {"recovered": False, "seconds": None, "after_deadline": None,
                              "from_hangup": None, "login_ok": None, "lockout_verified": False,
                              "note": ""}
    session = bl.lab.ssh_popen(command, tty=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = SessionReader(session)
    t0 = reader.wait_for(prompt, 30)
    if t0 is None:
        session.kill()
        session.wait()
        result["note"] = "no prompt: " + reader.text[-300:].replace("\r", "")
        _cleanup(holder, sc, result)
        return result
    poller = Poller(bl, limit_s)
    t_hup = 0.0
    if sc.session == "hangup":
        seen = poller.wait_first_fail(5)
        result["lockout_verified"] = seen is not None
        result["hangup_at"] = time.time() - t0
        t_hup = time.time()
        session.kill()  # the admin's ssh client dies: a hang-up, as a dropped link would
        session.wait()
    ok_at = poller.wait()
    result["poller_failures"] = poller.fails
    if ok_at is not None:
        result["recovered"] = True
        result["seconds"] = ok_at - t0
        result["lockout_verified"] = result["lockout_verified"] or poller.fails > 0
        if sc.session == "hangup":
            result["from_hangup"] = ok_at - t_hup
        result["login_ok"] = bl.lab.new_login_ok(timeout=10)
        if sc.tool == "iptables-apply":
            result["after_deadline"] = ok_at - (t0 + timeout_s)
    else:
        result["lockout_verified"] = True
        result["note"] = f"never (within {limit_s:g} s)"
    if sc.session == "stays":
        try:
            result["session_exit"] = session.wait(timeout=20)
        except subprocess.TimeoutExpired:
            session.kill()
            session.wait()
            result["session_exit"] = None
    if sc.tool == "fwsafe":
        info = bl.wait_final(30)
        result["fwsafe_state"] = info.get("state")
        result["fwsafe_reason"] = info.get("reason")
        events = {e["event"]: e["t"] for e in info.get("events", [])}
        deadline = info.get("deadline")
        if ok_at is not None and deadline and sc.kind == "deadline":
            result["after_deadline"] = ok_at - deadline
            result["deadline_from_prompt"] = deadline - t0
        if "reverting" in events and "reverted" in events:
            result["guard_revert_s"] = events["reverted"] - events["reverting"]
            if ok_at is not None:
                result["reverted_to_connection_s"] = ok_at - events["reverted"]
    _cleanup(holder, sc, result)
    return result


def _cleanup(holder: LabHolder, sc: Scenario, result: dict[str, Any]) -> None:
    """Leave the lab at its baseline, or rebuild it (iptables-apply after a hang-up)."""
    bl = holder.get()
    try:
        if sc.tool == "fwsafe":
            bl.settle()
        same = bl.lab.ruleset() == holder.baseline
    except Exception as exc:  # noqa: BLE001 - a broken lab is rebuilt, the run recorded
        same = False
        result["note"] = (result.get("note", "") + f" (lab check failed: {exc})").strip()
    if not same:
        if result["recovered"]:
            result["note"] = (result.get("note", "") + " rules differ from the baseline").strip()
        else:
            result["still_locked_out"] = True
        holder.log(f"    rebuilding the lab after: {sc.name}")
        holder.rebuild()


def summarize(sc: Scenario, runs: list[dict[str, Any]], limit_s: float) -> dict[str, Any]:
    done = [r["seconds"] for r in runs if r["recovered"]]
    after = [r["after_deadline"] for r in runs if r.get("after_deadline") is not None]
    out: dict[str, Any] = {
        "name": sc.name, "tool": sc.tool, "session": sc.session, "kind": sc.kind,
        "description": sc.description, "runs": runs, "n": len(runs),
        "recovered": bool(runs) and all(r["recovered"] for r in runs),
        "recovered_runs": len(done),
        "median_s": statistics.median(done) if done else None,
        "max_s": max(done) if done else None,
        "median_after_deadline_s": statistics.median(after) if after else None,
        "max_after_deadline_s": max(after) if after else None,
        "never_within_s": limit_s if len(done) < len(runs) else None,
    }
    return out


def run_recovery(holder: LabHolder, *, runs: int, timeout_s: int, long_s: int,
                 hangup_limit_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    skip = iptables_apply_available()
    scenarios = [s for s in SCENARIOS if not (skip and s.tool == "iptables-apply")]
    results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in scenarios}
    limits: dict[str, float] = {}
    for i in range(runs):
        for sc in scenarios:  # interleaved: every scenario once per round
            if sc.tool == "iptables-apply" and sc.session == "hangup":
                limit = hangup_limit_s
            elif sc.kind == "deadline":
                limit = timeout_s + 10.0
            else:
                limit = 20.0
            limits[sc.name] = limit
            log(f"  recovery run {i + 1}/{runs}: {sc.name}")
            started = time.monotonic()
            try:
                res = run_once(holder, sc, timeout_s, long_s, limit)
            except Exception as exc:  # noqa: BLE001 - recorded, the lab rebuilt, go on
                res = {"recovered": False, "seconds": None, "error": repr(exc),
                       "note": f"error: {exc}"}
                holder.rebuild()
            res["wall_s"] = time.monotonic() - started
            results[sc.name].append(res)
            shown = (f"{res['seconds']:.2f} s" if res.get("recovered")
                     else res.get("note") or "not recovered")
            log(f"    -> {shown}")
    refused: list[dict[str, Any]] = []
    if "--force" in apply_flags():
        for i in range(runs):
            log(f"  lockout check run {i + 1}/{runs}: fwsafe apply without --force")
            refused.append(run_refused(holder, timeout_s))
    refused_times = [r["seconds"] for r in refused if r["exit"] == 3]
    return {
        "refused_by_check": {
            "available": bool(refused), "runs": refused,
            "all_refused": bool(refused) and len(refused_times) == len(refused),
            "never_locked_out": all(r["new_connection_ok"] and r["rules_unchanged"]
                                    for r in refused),
            "median_s": statistics.median(refused_times) if refused_times else None,
            "max_s": max(refused_times) if refused_times else None,
        },
        "timeout_s": timeout_s,
        "long_timeout_s": long_s,
        "probe_interval_s": PROBE_INTERVAL,
        "probe_failures": PROBE_FAILURES,
        "fast_probe_timeout_s": FAST_PROBE_TIMEOUT,
        "runs": runs,
        "lab_rebuilds": holder.rebuilds,
        "iptables_apply": skip or "available",
        "scenarios": [summarize(s, results[s.name], limits.get(s.name, 0.0)) for s in scenarios],
        "skipped": ([{"name": s.name, "why": skip} for s in SCENARIOS if s.tool == "iptables-apply"]
                    if skip else []),
        "python": sys.version.split()[0],
    }
