"""The faults of the world (issue 30), as a matrix of trials of `fwsafe apply --host` in the fault
lab (tests/faultlab.py): latency up to 500 ms each way, loss, one-way and two-way cuts at
chosen moments, a rate limit, a full state directory, a killed guard, and SIGINT (SIGTERM,
SIGHUP) to the client at each phase.

The judge of every trial, after the client returned (the wire then cleared):
* a NEW ssh login (OpenSSH's client) gets in by the guard's deadline + 10 s;
* the host's ruleset is the old one (reverted, or never changed) or the new one (confirmed);
* the client's exit code matches the host's record: 0 confirmed (new rules live), 4 reverted
  (old rules), 3 only when nothing was applied (no transaction, old rules), 5 only in the trials
  where the truth could not be known (the link still cut, a second Ctrl-C) and naming the
  command that shows it; never 2;
* the client returned within its documented bound (docs/operations.md): after a signal, within
  the "giving up in N s" it printed; otherwise by the deadline + AFTER_DEADLINE_S + one remote
  command; and within the trial's own, tighter expectation;
* no upload directory is left on the host, and the files in it were never readable by others.

The trials run concurrently, each in a lab of its own (they mostly wait). The matrix is printed
(pytest -s) and written to $FWSAFE_FAULT_MATRIX if set. FWSAFE_FAULT_WORKERS (default 8) sets
how many labs run at once; FWSAFE_FAULT_ONLY=name,name runs only those trials.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fwsafe.lab import require_lab_capable, run
from fwsafe.remote import timing
from tests.bins import VENV_BIN
from tests.faultlab import FaultLab, create_fault_lab, interrupt
from tests.lab.test_ansible import COLLECTION, RECORDER
from tests.rulesets import DROP_NEW_SSH, GOOD

pytestmark = pytest.mark.lab

IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def big_rules(count: int) -> str:
    """A harmless ruleset of `count` rules (SSH stays open)."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]
    lines += [f"-A INPUT -s 10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}/32 -p tcp -m tcp "
              f"--dport 8080 -j ACCEPT" for n in range(count)]
    return "\n".join([*lines, "COMMIT", ""])


Action = Callable[[FaultLab, "subprocess.Popen[str]"], None]


@dataclass
class Step:
    """When a line matching `after` has appeared on the client's stderr (None: at once), wait
    `delay` seconds, then do `action`."""

    after: str | None
    delay: float
    action: Action
    what: str


@dataclass
class Trial:
    name: str
    fault: str                      # for the matrix
    rules: str = GOOD
    timeout: float = 10
    args: tuple[str, ...] = ("--no-check",)
    before: Callable[[FaultLab], None] | None = None
    steps: list[Step] = field(default_factory=list)
    expect: frozenset[int] = frozenset({0})
    unknown_ok: bool = False        # exit 5 is the truth here (the host cannot be reached)
    max_wall: float = 60            # the trial's own expectation of the client's wall time
    crlf: bool = False
    ansible: bool = False           # the Ansible module drives the change, not `--host`


@dataclass
class Outcome:
    trial: Trial
    code: int | None = None
    wall: float = 0.0
    state: str = "?"
    ruleset: str = "?"
    problems: list[str] = field(default_factory=list)
    stderr: str = ""
    stdout: str = ""
    signal_at: float | None = None
    giving_up_s: float | None = None

    def row(self) -> str:
        return (f"| {self.trial.name} | {self.trial.fault} | {self.code} | {self.state} "
                f"({self.ruleset}) | {self.wall:.1f} s | "
                f"{'ok' if not self.problems else 'FAIL: ' + '; '.join(self.problems)} |")


# -- actions ----------------------------------------------------------------------------------

def sig(signum: int = signal.SIGINT) -> Action:
    def act(lab: FaultLab, proc: subprocess.Popen[str]) -> None:
        interrupt(proc, signum)
    return act


def link(**change: Any) -> Action:
    def act(lab: FaultLab, proc: subprocess.Popen[str]) -> None:
        lab.link(**change)
    return act


def fill_disk(lab: FaultLab, proc: subprocess.Popen[str]) -> None:
    lab.fill_state_disk()


def free_disk(lab: FaultLab, proc: subprocess.Popen[str]) -> None:
    lab.free_state_disk()


def kill_guard(lab: FaultLab, proc: subprocess.Popen[str]) -> None:
    pid = lab.status().get("guard_pid")
    assert isinstance(pid, int), "no guard PID in the host's status"
    lab.srv(["kill", "-9", str(pid)], check=False)


def delay(each_way: float, loss: float = 0.0) -> Callable[[FaultLab], None]:
    def before(lab: FaultLab) -> None:
        lab.delay(each_way, loss)
    return before


def rate(limit: str, each_way: float = 0.0) -> Callable[[FaultLab], None]:
    def before(lab: FaultLab) -> None:
        lab.rate_limit(limit)
        if each_way:
            lab.delay(each_way)
    return before


ARMED = r"fwsafe: armed:"
UPLOADED = r"fwsafe: uploaded "
LINK = r"fwsafe: link: "
FAILED_LOGIN = r"new login #\d+ failed"
GOT_IN = r"new login #1 got in"
WAITING = r"waiting for SSH on .* to answer again"
INT = frozenset({0, 3, 4})   # an interrupt's truthful answers (checked against the host)

TRIALS: list[Trial] = [
    # -- the link as it is ---------------------------------------------------------------------
    Trial("clean-good", "none; the lockout check on", args=(), max_wall=30),
    Trial("clean-lockout", "none; rules drop new SSH (--force)", rules=DROP_NEW_SSH,
          args=("--force",), expect=frozenset({4}), max_wall=40),
    Trial("crlf-good", "none; the rules file has CRLF line ends", crlf=True, max_wall=30),
    # -- latency and loss (item 3) ---------------------------------------------------------------
    Trial("lat300-good", "300 ms each way", before=delay(0.3), timeout=30, max_wall=60),
    Trial("lat500-good", "500 ms each way (round trip 1 s)", before=delay(0.5), timeout=30,
          max_wall=75),
    Trial("lat350-lockout", "350 ms each way; rules drop new SSH", rules=DROP_NEW_SSH,
          before=delay(0.35), timeout=20, expect=frozenset({4}), max_wall=90),
    Trial("lat500-lockout", "500 ms each way; rules drop new SSH", rules=DROP_NEW_SSH,
          before=delay(0.5), timeout=25, expect=frozenset({4}), max_wall=110),
    Trial("loss10-good", "10% loss both ways", before=delay(0.0, 0.10), timeout=30, max_wall=90),
    Trial("loss20-lockout", "20% loss + 100 ms each way; rules drop new SSH",
          rules=DROP_NEW_SSH, before=delay(0.1, 0.20), timeout=20, expect=frozenset({4}),
          max_wall=110),
    Trial("rate-50k-good", "tbf 4 Mbit/s + 50 ms each way; 50k rules", rules=big_rules(50000),
          before=rate("4mbit", 0.05), timeout=40, max_wall=120),
    # -- cuts at chosen moments (items 5, 6) -----------------------------------------------------
    Trial("cut-down-after-apply", "server->client cut as the apply starts, back after 6 s",
          steps=[Step(UPLOADED, 0.0, link(down={"cut": True}), "cut down"),
                 Step(None, 6.0, link(down={"cut": False}), "restore")],
          timeout=25, expect=frozenset({0}), max_wall=60),
    Trial("lost-apply-reply", "server->client cut as the apply starts, until after the "
          "deadline (the apply's answer is lost)",
          rules=DROP_NEW_SSH,
          steps=[Step(UPLOADED, 0.5, link(down={"cut": True}), "cut down"),
                 Step(None, 14.0, link(down={"cut": False}), "restore")],
          timeout=8, expect=frozenset({4}), max_wall=60),
    Trial("cut-down-as-apply-is-sent", "server->client cut the moment the apply is sent, "
          "back 14 s later (the apply may never start)", rules=DROP_NEW_SSH,
          steps=[Step(UPLOADED, 0.0, link(down={"cut": True}), "cut down"),
                 Step(None, 14.0, link(down={"cut": False}), "restore")],
          timeout=8, expect=frozenset({3, 4}), max_wall=60),
    Trial("cut-up-as-apply-is-sent", "client->server cut as the apply is sent, back after 5 s",
          steps=[Step(UPLOADED, 0.0, link(up={"cut": True}), "cut up"),
                 Step(None, 5.0, link(up={"cut": False}), "restore")],
          timeout=20, expect=frozenset({0, 3}), max_wall=60),
    Trial("cut-both-window", "both ways cut once armed, back 8 s after the deadline",
          steps=[Step(ARMED, 0.0, link(up={"cut": True}, down={"cut": True}), "cut"),
                 Step(None, 16.0, link(up={"cut": False}, down={"cut": False}), "restore")],
          timeout=8, expect=frozenset({4}), max_wall=60),
    Trial("cut-during-confirm", "both ways cut as the first new login got in, back after 5 s",
          steps=[Step(GOT_IN, 0.0, link(up={"cut": True}, down={"cut": True}), "cut"),
                 Step(None, 5.0, link(up={"cut": False}, down={"cut": False}), "restore")],
          timeout=20, expect=frozenset({0, 4}), max_wall=60),
    Trial("lat500-cut-after-deadline", "500 ms each way; rules drop new SSH; both ways cut "
          "from the deadline for 10 s", rules=DROP_NEW_SSH, before=delay(0.5), timeout=25,
          steps=[Step(WAITING, 0.0, link(up={"cut": True}, down={"cut": True}), "cut"),
                 Step(None, 10.0, link(up={"cut": False}, down={"cut": False}), "restore")],
          expect=frozenset({4}), max_wall=120),
    # -- the state directory on a full disk (items 1, 2) ---------------------------------------
    Trial("disk-full-from-start", "state tmpfs full before the apply",
          before=lambda lab: lab.fill_state_disk(), expect=frozenset({3}), max_wall=30),
    Trial("disk-full-guard-alive", "rules drop new SSH; state tmpfs filled once armed",
          rules=DROP_NEW_SSH, steps=[Step(ARMED, 0.0, fill_disk, "fill")],
          expect=frozenset({4}), max_wall=60),
    Trial("disk-full-guard-killed", "rules drop new SSH; state tmpfs filled, then the guard "
          "killed (SIGKILL); space freed 12 s later", rules=DROP_NEW_SSH, timeout=20,
          steps=[Step(ARMED, 0.5, fill_disk, "fill"), Step(None, 0.5, kill_guard, "kill guard"),
                 Step(None, 12.0, free_disk, "free")],
          expect=frozenset({4}), max_wall=60),
    # -- SIGINT (and SIGTERM, SIGHUP) at each phase (item 4) -------------------------------------
    Trial("int-connecting", "SIGINT while connecting (500 ms each way)", before=delay(0.5),
          steps=[Step(None, 1.5, sig(), "SIGINT")], expect=frozenset({3}), max_wall=20),
    Trial("int-uploading", "SIGINT during the upload (tbf 1 Mbit/s, 20k rules)",
          rules=big_rules(20000), before=rate("1mbit"),
          steps=[Step(LINK, 1.5, sig(), "SIGINT")], expect=frozenset({3}), max_wall=30),
    Trial("int-applying", "SIGINT just after the apply was sent", timeout=20,
          steps=[Step(UPLOADED, 0.05, sig(), "SIGINT")], expect=INT, max_wall=40),
    Trial("int-applying-lat", "SIGINT while the apply runs (300 ms each way)",
          before=delay(0.3), timeout=30, steps=[Step(UPLOADED, 0.8, sig(), "SIGINT")],
          expect=INT, max_wall=80),
    Trial("int-waiting-lockout", "rules drop new SSH; SIGINT while new logins fail",
          rules=DROP_NEW_SSH, timeout=30, steps=[Step(FAILED_LOGIN, 0.0, sig(), "SIGINT")],
          expect=frozenset({4}), max_wall=25),
    Trial("term-waiting-lockout", "rules drop new SSH; SIGTERM while new logins fail",
          rules=DROP_NEW_SSH, timeout=30,
          steps=[Step(FAILED_LOGIN, 0.0, sig(signal.SIGTERM), "SIGTERM")],
          expect=frozenset({4}), max_wall=25),
    Trial("hup-waiting-lockout", "rules drop new SSH; SIGHUP while new logins fail",
          rules=DROP_NEW_SSH, timeout=30,
          steps=[Step(FAILED_LOGIN, 0.0, sig(signal.SIGHUP), "SIGHUP")],
          expect=frozenset({4}), max_wall=25),
    Trial("int-waiting-lat500", "500 ms each way; rules drop new SSH; SIGINT while new logins "
          "fail", rules=DROP_NEW_SSH, before=delay(0.5), timeout=40,
          steps=[Step(FAILED_LOGIN, 0.0, sig(), "SIGINT")], expect=frozenset({4}),
          max_wall=90),
    Trial("int-confirming", "SIGINT as the confirming login got in",
          steps=[Step(GOT_IN, 0.0, sig(), "SIGINT")], timeout=20, expect=frozenset({0, 4}),
          max_wall=40),
    Trial("int-confirming-lat", "300 ms each way; SIGINT during the remote confirm",
          before=delay(0.3), steps=[Step(GOT_IN, 0.4, sig(), "SIGINT")], timeout=30,
          expect=frozenset({0, 4}), max_wall=80),
    Trial("int-after-deadline", "rules drop new SSH; SIGINT while waiting after the deadline",
          rules=DROP_NEW_SSH, timeout=8, steps=[Step(WAITING, 0.5, sig(), "SIGINT")],
          expect=frozenset({4}), max_wall=45),
    Trial("int-cut-unknown", "both ways cut once armed, for good; SIGINT 1 s later",
          timeout=40, steps=[Step(ARMED, 0.0, link(up={"cut": True}, down={"cut": True}), "cut"),
                             Step(None, 1.0, sig(), "SIGINT")],
          expect=frozenset({5}), unknown_ok=True, max_wall=70),
    Trial("int-cut-then-back", "both ways cut once armed; SIGINT; the link back 4 s later",
          timeout=40, steps=[Step(ARMED, 0.0, link(up={"cut": True}, down={"cut": True}), "cut"),
                             Step(None, 1.0, sig(), "SIGINT"),
                             Step(None, 4.0, link(reset=True), "restore")],
          expect=frozenset({4}), max_wall=60),
    # -- the Ansible module on the same slow link: it agrees with --host ------------------------
    Trial("ansible-lat500-good", "Ansible module; 500 ms each way", before=delay(0.5),
          timeout=40, ansible=True, max_wall=150),
    Trial("ansible-lat500-lockout", "Ansible module; 500 ms each way; rules drop new SSH",
          rules=DROP_NEW_SSH, before=delay(0.5), timeout=25, ansible=True,
          expect=frozenset({4}), max_wall=200),
    Trial("int-twice", "both ways cut once armed; SIGINT, and again 1 s later",
          timeout=40, steps=[Step(ARMED, 0.0, link(up={"cut": True}, down={"cut": True}), "cut"),
                             Step(None, 1.0, sig(), "SIGINT"), Step(None, 1.0, sig(), "SIGINT")],
          expect=frozenset({5}), unknown_ok=True, max_wall=20),
]


def _wait_for_line(lines: list[tuple[float, str]], cond: threading.Condition, pattern: str,
                   start: int, proc: subprocess.Popen[str], limit: float) -> int | None:
    """The index of the first line from `start` on that matches, once it is there."""
    regex = re.compile(pattern)
    end = time.monotonic() + limit
    with cond:
        while True:
            for index in range(start, len(lines)):
                if regex.search(lines[index][1]):
                    return index
            if proc.poll() is not None or time.monotonic() > end:
                return None
            cond.wait(0.1)


def run_trial(trial: Trial) -> Outcome:
    outcome = Outcome(trial)
    with create_fault_lab() as lab:
        if trial.before is not None:
            trial.before(lab)
        text = trial.rules.replace("\n", "\r\n") if trial.crlf else trial.rules
        rules = lab.workdir / "new.rules"
        rules.write_bytes(text.encode())
        before = lab.ruleset()
        started = time.monotonic()
        if trial.ansible:
            outcome.code, outcome.stdout, text = run_ansible(
                lab, rules, trial.timeout, force=trial.rules is DROP_NEW_SSH)
            outcome.wall = time.monotonic() - started
            outcome.stderr = text
            lab.link(reset=True)
            judge(trial, outcome, lab, before, started, time.monotonic())
            return outcome
        proc = lab.client_popen(lab.apply_argv("--timeout", f"{trial.timeout:g}", *trial.args,
                                               str(rules)))
        lines: list[tuple[float, str]] = []
        cond = threading.Condition()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                with cond:
                    lines.append((time.monotonic(), line))
                    cond.notify_all()

        stdout: list[str] = []
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert proc.stdout is not None
        out_reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()),  # type: ignore[union-attr]
                                      daemon=True)
        out_reader.start()
        at = 0
        for step in trial.steps:
            if step.after is not None:
                found = _wait_for_line(lines, cond, step.after, at, proc, 300)
                if found is None:
                    outcome.problems.append(f"step {step.what!r}: {step.after!r} never came")
                    break
                at = found + 1
            time.sleep(step.delay)
            step.action(lab, proc)
            if step.what.startswith("SIG"):
                outcome.signal_at = time.monotonic()
        hang_limit = max(3 * trial.max_wall, 120)
        try:
            proc.wait(timeout=hang_limit)
        except subprocess.TimeoutExpired:
            # faulthandler (PYTHONFAULTHANDLER, set by client_popen) prints every thread's
            # stack on SIGABRT: the report then says where the client hung.
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            outcome.problems.append(f"the client did not return within {hang_limit:.0f} s "
                                    "(its stacks, from SIGABRT, are in its stderr below)")
        reader.join(10)
        out_reader.join(10)
        out = "".join(stdout)
        ended = time.monotonic()
        outcome.wall = ended - started
        outcome.code = proc.returncode
        outcome.stdout = out
        outcome.stderr = "".join(line for _, line in lines)
        lab.link(reset=True)
        judge(trial, outcome, lab, before, started, ended)
    return outcome


#: The Ansible task's state, as the exit code `fwsafe apply --host` gives for it.
ANSIBLE_STATES = {"confirmed": 0, "refused": 3, "reverted": 4, "unknown": 5}


def run_ansible(lab: FaultLab, rules: Path, timeout: float, *,
                force: bool) -> tuple[int | None, str, str]:
    """ansible-playbook on the workstation, with the collection from ./ansible in a private
    Ansible home: (the task's state as an exit code, its result as JSON, the output)."""
    root = lab.workdir / "ansible"
    for sub in ("home", "collections", "cp", "remote-tmp", "local-tmp", "callbacks"):
        (root / sub).mkdir(parents=True)
    (root / "callbacks" / "fleet_record.py").write_text(RECORDER)
    cfg = root / "ansible.cfg"
    cfg.write_text(
        f"[defaults]\nhome = {root / 'home'}\ncollections_path = {root / 'collections'}\n"
        f"remote_tmp = {root / 'remote-tmp'}\nlocal_tmp = {root / 'local-tmp'}\n"
        f"callback_plugins = {root / 'callbacks'}\ncallbacks_enabled = fleet_record\n"
        "interpreter_python = /usr/bin/python3\nhost_key_checking = True\n"
        "retry_files_enabled = False\ntimeout = 30\n"
        f"[ssh_connection]\ncontrol_path_dir = {root / 'cp'}\n")
    record = root / "record.jsonl"
    env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root / "home"),
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "ANSIBLE_CONFIG": str(cfg),
           "ANSIBLE_NOCOLOR": "1", "FLEET_RECORD": str(record)}
    envv = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
    install = run(lab.net.exec_argv(lab.cli_ns, [*envv, str(VENV_BIN / "ansible-galaxy"),
                                                 "collection", "install", "--force",
                                                 str(COLLECTION)]), check=False, timeout=300)
    if install.returncode != 0:
        return None, "", install.stdout + install.stderr
    inventory = root / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": {"srv": {
        "ansible_host": lab.srv_ip, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(lab.key),
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={lab.known_hosts} "
                                   "-o StrictHostKeyChecking=yes",
        "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    playbook = root / "apply.yml"
    playbook.write_text(json.dumps([{"hosts": "all", "gather_facts": False, "tasks": [{
        "name": "fwsafe apply", "fwsafe.firewall.apply": {
            "rules": str(rules), "timeout": int(timeout), "force": force}}]}]))
    res = run(lab.net.exec_argv(lab.cli_ns, [*envv, str(VENV_BIN / "ansible-playbook"), "-i",
                                             str(inventory), str(playbook)]),
              check=False, timeout=600)
    events = [json.loads(line) for line in record.read_text().splitlines()] \
        if record.exists() else []
    task = next((e for e in events if e["task"] == "fwsafe apply"), None)
    if task is None:
        return None, "", res.stdout + res.stderr
    result = task["result"]
    code = ANSIBLE_STATES.get(str(result.get("state")))
    return code, json.dumps({"id": result.get("transaction"), "state": result.get("state"),
                             "hint": result.get("msg"), "link": result.get("link")}) + "\n", \
        res.stdout + res.stderr


def judge(trial: Trial, outcome: Outcome, lab: FaultLab, before: str, started: float,
          ended: float) -> None:
    problems = outcome.problems
    code = outcome.code
    err = outcome.stderr
    if code not in trial.expect:
        problems.append(f"exit {code}, expected {sorted(trial.expect)}")
    if code == 2:
        problems.append("exit 2 (usage) for a fault")
    status = lab.status()
    deadline = status.get("deadline")
    left = deadline - time.time() if isinstance(deadline, (int, float)) else 0.0
    until = ended + max(left, 0) + 10
    if lab.wait_login(until) is None:
        problems.append("no NEW ssh login got in by the deadline + 10 s")
    if code == 5 and isinstance(deadline, (int, float)):
        # The client could not know; the host's guard decides by itself at its deadline.
        time.sleep(max(deadline - time.time(), 0) + 3)
    status = lab.status()  # after the deadline the guard has decided
    state = status.get("state")
    now = lab.ruleset()
    new_rules = "--dport 443" in now or "--dport 8080" in now
    outcome.state = str(state)
    outcome.ruleset = "old" if now == before else ("new" if new_rules else "other")
    data: dict[str, Any] = {}
    try:
        data = json.loads(outcome.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        problems.append("no JSON on stdout")
    if code == 0:
        if state != "confirmed" or data.get("id") != status.get("id"):
            problems.append(f"exit 0 but the host's record is {state} ({status.get('id')})")
        if trial.rules is DROP_NEW_SSH or not new_rules:
            problems.append("exit 0 but the new rules are not live")
    elif code == 4:
        if state != "reverted" or now != before:
            problems.append(f"exit 4 but the host's record is {state}, ruleset {outcome.ruleset}")
    elif code == 3:
        if now != before or state not in ("none", "rejected", "aborted"):
            problems.append(f"exit 3 but the host's record is {state}, ruleset {outcome.ruleset}")
    elif code == 5:
        if not trial.unknown_ok:
            problems.append("exit 5 where the host could be reached")
        if "fwsafe status" not in str(data.get("hint")):
            problems.append("exit 5 without the command to check")
        if state != "reverted" or now != before:
            problems.append(f"exit 5, then the guard did not revert ({state})")
    if outcome.ruleset == "other":
        problems.append("the ruleset is neither the old one nor the new one")
    if lab.upload_leftovers() and code != 5:
        problems.append(f"upload directories left on the host: {lab.upload_leftovers()}")
    readable = {p: m for p, m in lab.upload_modes().items() if m & 0o077}
    if readable:
        problems.append(f"upload files readable by others: {readable}")
    if trial.crlf and "Windows line ends" not in err:
        problems.append("the CRLF line ends were not mentioned")
    # Documented bounds (docs/operations.md, fwsafe.remote.timing).
    giving_up = re.findall(r"giving up in (\d+) s at the latest", err)
    if outcome.signal_at is not None and giving_up:
        outcome.giving_up_s = float(giving_up[-1])
        if ended - outcome.signal_at > outcome.giving_up_s + 5:
            problems.append(f"returned {ended - outcome.signal_at:.1f} s after the signal, "
                            f"past the {giving_up[-1]} s it had promised")
    armed = re.search(r"reverts transaction \S+ in ([\d.]+) s unless", err)
    if armed and outcome.signal_at is None:
        bound = trial.timeout + timing.AFTER_DEADLINE_S + timing.QUERY_CEILING
        if outcome.wall > bound + 60:
            problems.append(f"returned after {outcome.wall:.0f} s, past the documented bound")
    if outcome.wall > trial.max_wall:
        problems.append(f"took {outcome.wall:.1f} s, more than the expected {trial.max_wall} s")


# -- the matrix ---------------------------------------------------------------------------------

def _selected() -> list[Trial]:
    only = {n for n in os.environ.get("FWSAFE_FAULT_ONLY", "").split(",") if n}
    return [t for t in TRIALS if not only or t.name in only]


@pytest.fixture(scope="module")
def matrix() -> Iterator[dict[str, Outcome]]:
    reason = require_lab_capable()
    if reason:
        if IN_CI:
            pytest.fail(f"lab tests must run in CI, but: {reason}")
        pytest.skip(reason)
    trials = sorted(_selected(), key=lambda t: -t.max_wall)
    workers = int(os.environ.get("FWSAFE_FAULT_WORKERS", "8"))
    started = time.monotonic()
    results: dict[str, Outcome] = {}

    def one(trial: Trial) -> None:
        try:
            results[trial.name] = run_trial(trial)
        except Exception as exc:  # a lab that could not be built is that trial's failure
            results[trial.name] = Outcome(trial, problems=[f"{type(exc).__name__}: {exc}"])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, trials))
    table = ["| trial | fault | exit | host (ruleset) | client wall time | judge |",
             "|---|---|---|---|---|---|"]
    table += [results[t.name].row() for t in TRIALS if t.name in results]
    text = "\n".join(table) + f"\n\n{len(results)} trials in {time.monotonic() - started:.0f} s"
    print("\n" + text)
    target = os.environ.get("FWSAFE_FAULT_MATRIX")
    if target:
        Path(target).write_text(text + "\n")
    yield results


@pytest.mark.parametrize("trial", [pytest.param(t, id=t.name) for t in TRIALS])
def test_fault_trial(matrix: dict[str, Outcome], trial: Trial) -> None:
    if trial.name not in matrix:
        pytest.skip("not selected (FWSAFE_FAULT_ONLY)")
    outcome = matrix[trial.name]
    assert not outcome.problems, (
        f"{trial.name} ({trial.fault}): " + "; ".join(outcome.problems)
        + f"\n--- stdout\n{outcome.stdout}\n--- stderr\n{outcome.stderr}")


def test_the_matrix_has_at_least_30_trials() -> None:
    assert len(TRIALS) >= 30
    assert len({t.name for t in TRIALS}) == len(TRIALS)
