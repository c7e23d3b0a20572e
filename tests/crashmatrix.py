"""The crash matrix (issue 23): every failpoint of fwsafe (fwsafe/failpoints.py) x what can
happen to the processes there, each trial judged as a user would: a NEW SSH connection gets in
in time, nothing needs a hand (the next apply works, no record is left stuck), the record tells
the truth (and so do the exit codes). Used by tests/lab/test_crash_matrix.py (namespace lab)
and tests/lab/test_systemd_guard.py (systemd lab); both build on `Host`, which hides how
commands reach the server.

A trial: the failpoint's action is ``pause`` (the process that reaches it writes a marker and
waits), then the column's action is done to the processes as they are at that moment, the
paused one is let go (unless killed), and the outcome is judged; the ``raise`` column instead
raises MemoryError at the failpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.failpoints import POINTS
from fwsafe.lab import normalize_save
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_NEW_SSH, GOOD

COLUMNS = ("kill-cli", "kill-guard", "kill-both", "stop-guard", "stop-both", "raise")
FROZEN = ("kill-both", "stop-both")   # nothing of fwsafe runs: the hatch is the way back
TIMEOUT_S = 2          # the change's window
STUCK_GRACE_S = 1
HATCH_GRACE_S = 2
CLONE_NEWNET = 0x40000000


def ssh_back(lab: Any, limit: float) -> float | None:
    """Wall-clock time at which a NEW connection first gets the SSH banner (`lab`: a namespace
    or systemd lab, polled through its `new_connection_ok`), or None within `limit` seconds."""
    end = time.time() + limit
    while time.time() < end:
        if lab.new_connection_ok(timeout=0.3):
            return time.time()
        time.sleep(0.05)
    return None


class NetnsProber:
    """NEW TCP connections from inside a network namespace, without a process each: a thread
    of this process joins the namespace (setns(2) acts on the calling thread) and connects."""

    def __init__(self, netns_path: str) -> None:
        self.jobs: queue.Queue[tuple[str, int, float, queue.Queue[bool]] | None] = queue.Queue()
        self.error: str | None = None
        ready: queue.Queue[bool] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, args=(netns_path, ready), daemon=True)
        self.thread.start()
        if not ready.get(timeout=10):
            raise RuntimeError(f"cannot enter {netns_path}: {self.error}")

    def _serve(self, netns_path: str, ready: queue.Queue[bool]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                self.error = os.strerror(ctypes.get_errno())
                ready.put(False)
                return
        finally:
            os.close(fd)
        ready.put(True)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            host, port, timeout, answer = job
            answer.put(self._banner(host, port, timeout))

    @staticmethod
    def _banner(host: str, port: int, timeout: float) -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.settimeout(timeout)
                return sock.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def banner_ok(self, host: str, port: int = 22, timeout: float = 0.3) -> bool:
        answer: queue.Queue[bool] = queue.Queue()
        self.jobs.put((host, port, timeout, answer))
        return answer.get(timeout=timeout + 10)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)


class Host:
    """How a matrix reaches one server: run fwsafe and tools there, start fwsafe in the
    background, find its processes, signal them. Subclassed per lab."""

    state_dir: str
    client_ip: str
    server_ip: str
    failpoint_dir: str      # as the host's processes see it
    markers_here: Path      # the same directory, as this test process sees it
    rules_dir: str
    prober: NetnsProber

    def env_argv(self, argv: Sequence[str], env: dict[str, str] | None) -> list[str]:
        """`argv` run with `env` added to the environment (through env(1))."""
        return ["env", *(f"{k}={v}" for k, v in (env or {}).items()), *argv]

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        raise NotImplementedError

    def start(self, argv: Sequence[str], env: dict[str, str]) -> Any:
        """Start `argv` in the background; the handle has .pid (in our pid namespace), .poll(),
        .wait(timeout)."""
        raise NotImplementedError

    def processes(self) -> dict[str, list[int]]:
        """{"guard": [...], "backstop": [...]}: fwsafe's processes for this state directory."""
        raise NotImplementedError

    def signal(self, pids: Sequence[int], signum: int) -> None:
        """Signal fwsafe's processes of this host's state directory (found by `processes`)."""
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def markers(self) -> list[str]:
        """The failpoint markers there: "NAME.PID"."""
        try:
            return sorted(m for m in os.listdir(self.markers_here) if not m.startswith("."))
        except FileNotFoundError:
            return []

    def release(self, marker: str) -> None:
        try:
            os.unlink(self.markers_here / marker)
        except FileNotFoundError:
            pass

    def marker_pid(self, marker: str) -> int:
        """The PID (in our pid namespace) of the process that wrote `marker`."""
        return int(marker.rsplit(".", 1)[1])

    # -- on top ---------------------------------------------------------------------------
    def fwsafe(self, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> tuple[int, str, str]:
        return self.run(["fwsafe", *args], env=env or {"FWSAFE_STATE_DIR": self.state_dir},
                        timeout=timeout)

    def status(self) -> dict[str, Any]:
        code, out, err = self.fwsafe("status", "--json")
        if code != 0:
            raise AssertionError(f"fwsafe status failed ({code}): {err}")
        data: dict[str, Any] = json.loads(out)
        return data

    def iptables(self) -> str:
        return normalize_save(self.run(["iptables-save"])[1])

    def ssh_ok(self, timeout: float = 0.3) -> bool:
        return self.prober.banner_ok(self.server_ip, 22, timeout)

    def write(self, path: str, text: str) -> None:
        raise NotImplementedError


@dataclass
class Trial:
    failpoint: str
    column: str
    ok: bool = False
    ssh_after_deadline: float | None = None   # seconds; negative: never shut
    limit: float = 0.0
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    final: str = ""
    problems: list[str] = field(default_factory=list)
    took: float = 0.0
    how: str = ""

    def line(self) -> str:
        ssh = "-" if self.ssh_after_deadline is None else f"{self.ssh_after_deadline:+.1f}s"
        codes = " ".join(f"{k}={v}" for k, v in self.exit_codes.items())
        return (f"{'ok  ' if self.ok else 'FAIL'} {self.failpoint:<22} {self.column:<10} "
                f"ssh {ssh:>7} (limit +{self.limit:.0f}s) final={self.final:<10} {codes} "
                f"[{self.took:.1f}s]" + (f" :: {'; '.join(self.problems)} ({self.how})"
                                         if self.problems else ""))


def differ(before: str, after: str) -> str:
    old, new = set(before.splitlines()), set(after.splitlines())
    return f"gone {sorted(old - new)[:3]}, new {sorted(new - old)[:3]}"


def kind_of(failpoint: str) -> str:
    """What a trial of `failpoint` does: which change, and what reaches the failpoint."""
    if failpoint.startswith(("confirm.", "guard.confirm")):
        return "confirm"
    if failpoint.startswith("revert.") and failpoint != "revert.round":
        return "revert"
    if failpoint == "backstop.killing":
        return "stuck"
    if failpoint.startswith(("recover.", "backstop.")):
        return "killed"
    return "apply"


class Matrix:
    """Runs trials on one `Host` (its own lab), one after another."""

    def __init__(self, host: Host, log: Callable[[str], None] = print) -> None:
        self.host = host
        self.log = log
        self.config = f"{host.rules_dir}/crashmatrix.toml"
        self.previous: str | None = None
        self.rules = {"drop": f"{host.rules_dir}/crashmatrix-drop.rules",
                      "good": f"{host.rules_dir}/crashmatrix-good.rules"}
        host.write(self.rules["drop"], DROP_NEW_SSH)
        host.write(self.rules["good"], GOOD)
        host.write(self.config, f"stuck_grace = {STUCK_GRACE_S}\nhatch_grace = {HATCH_GRACE_S}\n"
                                f'admin_sources = ["{host.client_ip}"]\n')

    def env(self, failpoints: str = "") -> dict[str, str]:
        env = {"FWSAFE_STATE_DIR": self.host.state_dir, "FWSAFE_CONFIG": self.config,
               "FWSAFE_FAILPOINT_DIR": self.host.failpoint_dir}
        if failpoints:
            env["FWSAFE_FAILPOINTS"] = failpoints
        return env

    def baseline(self) -> str:
        self.host.run(["iptables-restore"], input=BASELINE_V4)
        self.host.run(["ip6tables-restore"], input=BASELINE_V6)
        return self.host.iptables()

    # -- one trial ---------------------------------------------------------------------------
    def trial(self, failpoint: str, column: str) -> Trial:
        started = time.monotonic()
        result = Trial(failpoint, column)
        stopped: list[int] = []
        try:
            self._trial(result, stopped)
        except Exception as exc:  # noqa: BLE001 - the trial fails with the reason
            result.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            if stopped:
                self.host.signal(stopped, signal.SIGCONT)
            for marker in self.host.markers():
                self.host.release(marker)
        result.ok = not result.problems
        result.took = time.monotonic() - started
        self.log(result.line())
        return result

    def _trial(self, result: Trial, stopped: list[int]) -> None:
        host, fp, column = self.host, result.failpoint, result.column
        before = self.baseline()
        self.previous = host.status().get("id")
        kind = kind_of(fp)
        action = "raise:MemoryError" if column == "raise" else "pause"
        armed_env = self.env(f"{fp}={action}")
        apply_env = armed_env if kind in ("apply", "stuck", "killed", "confirm") else self.env()
        rules = self.rules["good" if kind == "confirm" else "drop"]
        t0 = time.time()
        cli = host.start(["fwsafe", "apply", "--detach", "--json", "--force", "--no-check",
                          "--timeout", str(TIMEOUT_S), rules], apply_env)
        second = None
        if kind != "apply":   # the change must be live first (its CLI returns then)
            result.exit_codes["apply"] = self._wait(cli, 60)
            if result.exit_codes["apply"] != 0:
                raise AssertionError(f"the apply before the failpoint failed "
                                     f"({result.exit_codes['apply']})")
            procs = host.processes()
            if kind == "confirm":
                second = host.start(["fwsafe", "confirm"], self.env(
                    f"{fp}={action}" if fp.startswith("confirm.") else ""))
            elif kind == "revert":
                second = host.start(["fwsafe", "revert"], armed_env)
            elif kind == "stuck":
                host.signal(procs["guard"], signal.SIGSTOP)
                stopped += procs["guard"]
            elif kind == "killed":
                host.signal(procs["guard"], signal.SIGKILL)
        marker = self._marker(fp, 40) if action == "pause" else None
        if marker is not None:
            self._act(column, marker, stopped)
        result.limit = 10 + (HATCH_GRACE_S + 5 if column in FROZEN else 0)
        back = self._ssh_back(t0 + TIMEOUT_S + result.limit + 3)   # the deadline comes later
        deadline = self._deadline(t0)
        if back is None or back > deadline + result.limit:
            result.problems.append(f"no NEW ssh connection by the deadline + {result.limit} s")
        if back is not None:
            result.ssh_after_deadline = back - deadline
        if stopped:
            host.signal(stopped, signal.SIGCONT)
            stopped.clear()
        for name, proc in (("apply", cli), ("second", second)):
            if proc is not None and name not in result.exit_codes:
                result.exit_codes[name] = self._wait(proc, 90)
        self._judge(result, before, kind)

    def _wait(self, proc: Any, limit: float) -> int | None:
        try:
            code: int | None = proc.wait(timeout=limit)
        except Exception:  # noqa: BLE001 - still running: a bound broken
            with contextlib.suppress(Exception):
                proc.kill()
            return None
        return code

    def _marker(self, fp: str, limit: float) -> str | None:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            found = [m for m in self.host.markers() if m.startswith(fp + ".")]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"nothing reached failpoint {fp} within {limit:g} s")

    def _act(self, column: str, marker: str, stopped: list[int]) -> None:
        """Do the column's action to the processes as they are now; let the paused one go."""
        host = self.host
        paused = host.marker_pid(marker)
        procs = host.processes()
        guard, backstop = procs["guard"], procs["backstop"]
        released = True
        if column == "kill-cli":
            target = [paused] if paused in procs["cli"] else procs["cli"]
            host.signal(target, signal.SIGKILL)
            released = paused not in target
        elif column == "kill-guard":
            host.signal(guard, signal.SIGKILL)
            released = paused not in guard
        elif column == "kill-both":
            host.signal(guard + backstop, signal.SIGKILL)
            released = paused not in guard + backstop
        elif column in ("stop-guard", "stop-both"):
            targets = guard + (backstop if column == "stop-both" else [])
            host.signal(targets, signal.SIGSTOP)
            stopped += targets
        if released or column.startswith("stop"):
            host.release(marker)

    def _deadline(self, t0: float) -> float:
        """The trial's transaction's deadline (its record's), else when it would have been."""
        with contextlib.suppress(Exception):
            info = self.host.status()
            if info.get("id") != self.previous and info.get("deadline"):
                return float(info["deadline"])
        return t0 + TIMEOUT_S

    def _release_all(self) -> None:
        """Who reaches the failpoint after the trial's subject (the backstop taking over, the
        next round) is let go: the trial is about the first."""
        for marker in self.host.markers():
            self.host.release(marker)

    def _ssh_back(self, until: float) -> float | None:
        """When a NEW ssh connection first gets in (wall clock), None if not until `until`."""
        while time.time() < until:
            self._release_all()
            if self.host.ssh_ok(timeout=0.3):
                return time.time()
            time.sleep(0.05)
        return None

    def _judge(self, result: Trial, before: str, kind: str) -> None:
        """Settled: the record tells the truth, the exit codes never lie, nothing needs a
        hand (the next apply works and removes what was left open), no hatch is left."""
        host = self.host
        end = time.monotonic() + 40
        info = host.status()
        while info["state"] in ("applying", "reverting", "pending") and (
                info.get("guard_alive") or info.get("taken_over")):
            if time.monotonic() > end:
                result.problems.append(f"not settled: {info['state']} ({info.get('reason')})")
                break
            self._release_all()
            time.sleep(0.2)
            info = host.status()
        if info.get("id") == self.previous:
            info = {**info, "state": "none"}   # the trial made no transaction
        result.final = info["state"]
        result.how = f"{info.get('reverted_by') or ''}: {info.get('reason') or ''}"[:160]
        # nothing needs a hand: settled by itself (the commands above are `fwsafe status`, the
        # first command of any kind, which takes over a transaction left open past its
        # deadline with nobody on it), before the next apply would clean up
        if info["state"] in ("preparing", "applying", "pending", "reverting"):
            result.problems.append(f"left {info['state']} with nobody on it (needs a hand)")
        if "fwsafe-hatch" in host.run(["iptables-save"])[1] and info["state"] != "pending":
            result.problems.append("a hatch rule is left before the next apply")
        live = host.iptables()
        if info["state"] in ("reverted", "aborted", "rejected", "none") and live != before:
            result.problems.append(f"record says {info['state']} but the rules differ: "
                                   + differ(before, live))
        if info["state"] == "confirmed" and "--dport 443" not in live:
            result.problems.append("record says confirmed but the change is not live")
        if info["state"] == "revert-failed":
            result.problems.append(f"revert-failed: {info.get('error')}")
        changed = info["state"] not in ("aborted", "rejected", "none")
        for name, code in result.exit_codes.items():
            if code == 3 and changed:
                result.problems.append(f"{name} exited 3 (nothing changed) but the record "
                                       f"says {info['state']}")
            if code == 0 and name == "second" and info["state"] == "reverted" \
                    and kind == "confirm":
                result.problems.append("confirm exited 0 but the change was reverted")
            if code == 4 and info["state"] == "confirmed":
                result.problems.append(f"{name} exited 4 but the change was confirmed")
        # nothing needs a hand: the next apply works (it reverts a transaction left open with
        # nobody looking after it), then a revert; no hatch anywhere afterwards
        code, out, err = host.fwsafe("apply", "--detach", "--json", "--no-check", "--timeout",
                                     "30", self.rules["good"], env=self.env())
        if code != 0:
            result.problems.append(f"the next apply exited {code}: {err.strip()[-200:]}")
        else:
            code, _, err = host.fwsafe("revert", env=self.env())
            if code != 4:
                result.problems.append(f"the revert after the next apply exited {code}: {err}")
        if info["state"] != "confirmed":
            live = before   # the next apply reverts what nobody looked after
        live = "".join(line for line in live.splitlines(True) if "fwsafe-hatch" not in line)
        if host.iptables() != live:
            result.problems.append("the next apply and its revert did not give back the rules "
                                   "as they were: " + differ(live, host.iptables()))
        if "fwsafe-hatch" in host.run(["iptables-save"])[1]:
            result.problems.append("a hatch rule is left")
        left = host.processes()
        if left["guard"] or left["backstop"]:
            time.sleep(2)
            left = host.processes()
            if left["guard"] or left["backstop"]:
                result.problems.append(f"fwsafe processes left running: {left}")
                host.signal(left["guard"] + left["backstop"], signal.SIGKILL)


def trials(failpoints: Sequence[str] | None = None,
           columns: Sequence[str] = COLUMNS) -> list[tuple[str, str]]:
    return [(fp, column) for fp in (failpoints or list(POINTS)) for column in columns]


def run_parallel(matrices: Sequence[Matrix], work: Sequence[tuple[str, str]]) -> list[Trial]:
    """Each matrix (its own lab) takes the next trial until none is left."""
    todo: queue.Queue[tuple[str, str]] = queue.Queue()
    for item in work:
        todo.put(item)
    done: list[Trial] = []
    lock = threading.Lock()

    def worker(matrix: Matrix) -> None:
        while True:
            try:
                fp, column = todo.get_nowait()
            except queue.Empty:
                return
            trial = matrix.trial(fp, column)
            with lock:
                done.append(trial)

    threads = [threading.Thread(target=worker, args=(m,)) for m in matrices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done


def summary(results: Sequence[Trial]) -> str:
    """The worst time to SSH (after the deadline) in each column, and the failures."""
    lines = [f"crash matrix: {len(results)} trials, "
             f"{sum(1 for r in results if not r.ok)} failed"]
    for column in COLUMNS:
        times = [r.ssh_after_deadline for r in results
                 if r.column == column and r.ssh_after_deadline is not None]
        if times:
            lines.append(f"  {column:<10} worst SSH back: deadline {max(times):+.1f} s "
                         f"({len(times)} trials)")
    return "\n".join(lines)


def scan_processes(state_dir: str, proc: Path = Path("/proc"),
                   only: Callable[[Path], bool] = lambda _entry: True) -> dict[str, list[int]]:
    """fwsafe's processes working on `state_dir` (from their command lines and environment):
    the guard, its backstop, and the `fwsafe` commands (the CLI)."""
    found: dict[str, list[int]] = {"guard": [], "backstop": [], "cli": []}
    marker = f"FWSAFE_STATE_DIR={state_dir}".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or not only(entry):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if state == "Z":
            continue
        if b"fwsafe.guard.backstop" in argv and state_dir.encode() in argv:
            found["backstop"].append(int(entry.name))
        elif b"fwsafe.guard" in argv and state_dir.encode() in argv:
            found["guard"].append(int(entry.name))
        elif len(argv) > 1 and argv[1].endswith(b"/fwsafe") and marker in environ:
            found["cli"].append(int(entry.name))
    return found
