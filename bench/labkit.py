"""Lab plumbing for the benchmarks: labs of our own, timing inside a namespace, a fine-grained
"is a NEW SSH connection possible again" poller, and a reader for interactive ssh sessions.

Everything runs in network namespaces made by :func:`fwsafe.lab.create_lab` with a ``fwb``
prefix; traffic only flows between our own namespaces, and everything started here is tracked
by the lab and stopped by PID in :meth:`fwsafe.lab.Lab.close`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from fwsafe.lab import Lab, LabError, create_lab, ssh_client_argv
from tests.rulesets import GOOD

PREFIX = "fwb"
INDEX_RECOVERY = 230
INDEX_SCALE = 231
INDEX_UFW = 232
PROBE_PORT = 9022

BASELINE_V4 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m multiport --dports 22,80 -m comment --comment "baseline ssh+web" -j ACCEPT
-A INPUT -p icmp -m limit --limit 5/sec -j ACCEPT
COMMIT
"""
BASELINE_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""
# The lockout: established connections (the admin's session) survive, NEW connections to sshd
# and to the probe listener are dropped, from outside and over loopback alike.
LOCKOUT_V4 = f"""\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m multiport --dports 22,{PROBE_PORT} -m conntrack --ctstate NEW -j DROP
COMMIT
"""
# A harmless change, for the footprint measurements (the one the lab tests use).
GOOD_V4 = GOOD

# Runs inside a namespace: reads {"env": {...}, "cmds": [{"argv": [...], "stdin": path}]} on
# stdin, runs the commands one after the other and prints one JSON list: per command its wall
# time, exit code, the CPU time of the command and everything it waited for, and its output.
# Only the command itself is inside the timed region (not `ip netns exec`, not this interpreter).
_TIMER_SCRIPT = r"""
import json, os, resource, subprocess, sys, time
spec = json.load(sys.stdin)
env = dict(os.environ)
env.update(spec.get("env") or {})
limit = int(spec.get("keep_output", 65536))
out = []
for cmd in spec["cmds"]:
    path = cmd.get("stdin")
    fin = open(path, "rb") if path else subprocess.DEVNULL
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.time()
    t0 = time.perf_counter()
    p = subprocess.run(cmd["argv"], stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, check=False)
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if path:
        fin.close()
    out.append({"elapsed": elapsed, "start": w0, "rc": p.returncode,
                "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
                "stdout": p.stdout[-limit:].decode(errors="replace"),
                "stderr": p.stderr[-limit:].decode(errors="replace")})
json.dump(out, sys.stdout)
"""

# Runs in the server namespace: accept TCP connections on HOST:PORT and close them (the target
# of the early-revert probe). Prints "ready" once listening.
_LISTENER_SCRIPT = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

# Runs in the client namespace: start a NEW TCP connection to HOST:PORT every EVERY seconds,
# each given PER seconds to deliver the "SSH-" banner, until one does (print "OK <unix time>
# <failed attempts>") or LIMIT seconds pass ("TIMEOUT <failed attempts>"). The first failed
# attempt is reported as "FAIL <unix time>": proof that the lockout is live. Overlapping
# attempts give a resolution of EVERY, although a dropped SYN is only retried after 1 s.
_POLLER_SCRIPT = r"""
import errno, selectors, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
limit, every, per = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
sel = selectors.DefaultSelector()
start = time.monotonic()
end = start + limit
pending = {}
fails = 0
print("READY", repr(time.time()), flush=True)

def fail(s):
    global fails
    fails += 1
    if fails == 1:
        print("FAIL", repr(time.time()), flush=True)
    try:
        sel.unregister(s)
    except (KeyError, ValueError):
        pass
    s.close()
    pending.pop(s, None)

next_at = start
while True:
    now = time.monotonic()
    if now >= end:
        print("TIMEOUT", fails, flush=True)
        sys.exit(1)
    if now >= next_at:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, port))
        pending[s] = [now, b"", False]
        if err not in (0, errno.EINPROGRESS):
            fail(s)
        else:
            sel.register(s, selectors.EVENT_WRITE)
        next_at = now + every
    wait = max(0.0, min(next_at, end) - time.monotonic())
    for key, _ in sel.select(wait):
        s = key.fileobj
        st = pending.get(s)
        if st is None:
            continue
        if not st[2]:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                fail(s)
                continue
            st[2] = True
            sel.modify(s, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(4 - len(st[1]))
        except BlockingIOError:
            continue
        except OSError:
            fail(s)
            continue
        if not data:
            fail(s)
            continue
        st[1] += data
        if len(st[1]) >= 4:
            if st[1] == b"SSH-":
                print("OK", repr(time.time()), fails, flush=True)
                sys.exit(0)
            fail(s)
    now = time.monotonic()
    for s, st in list(pending.items()):
        if now - st[0] > per:
            fail(s)
"""


def fwsafe_bin() -> str:
    """The fwsafe console script next to this interpreter (no shell shims in the timings), or
    $FWSAFE_BENCH_BIN (another build, e.g. main's, measured in the same run: a "before")."""
    other = os.environ.get("FWSAFE_BENCH_BIN")
    if other:
        return other
    here = Path(sys.executable).parent / "fwsafe"
    if here.exists():
        return str(here)
    found = shutil.which("fwsafe")
    if found is None:
        raise LabError("fwsafe is not installed (not next to the interpreter, not on PATH)")
    return found


_APPLY_FLAGS: set[str] = set()


def apply_flags() -> set[str]:
    """The long options this fwsafe's `apply` takes (it grows: --force, --no-check, ...)."""
    if not _APPLY_FLAGS:
        result = subprocess.run([fwsafe_bin(), "apply", "--help"], capture_output=True,
                                text=True, timeout=60, check=False)
        _APPLY_FLAGS.update(re.findall(r"(--[a-z][a-z0-9-]+)", result.stdout))
    return _APPLY_FLAGS


def prefix(role: str) -> str:
    """A lab prefix of our own: fwb + role + pid (unique among concurrent runs)."""
    return f"{PREFIX}{role}{os.getpid()}"[:14]


@dataclass
class Timed:
    """One command timed inside a namespace."""

    elapsed: float
    start: float
    rc: int
    cpu: float
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout)
        return data


@dataclass
class BenchLab:
    """A lab (server and client namespaces, sshd, baseline rules) with fwsafe's state inside."""

    lab: Lab
    state_dir: Path
    listener: subprocess.Popen[bytes] | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"FWSAFE_STATE_DIR": str(self.state_dir)}

    def write(self, name: str, text: str) -> Path:
        path = self.lab.workdir / name
        path.write_text(text)
        self.files[name] = path
        return path

    def timed(self, cmds: list[dict[str, Any]], *, env: dict[str, str] | None = None,
              timeout: float = 900) -> list[Timed]:
        """Run `cmds` ({"argv": [...], "stdin": path}) one by one in the server namespace."""
        spec = {"env": {**self.env, **(env or {})}, "cmds": cmds}
        result = self.lab.srv_exec([sys.executable, "-I", "-c", _TIMER_SCRIPT],
                                   input=json.dumps(spec), timeout=timeout)
        return [Timed(**item) for item in json.loads(result.stdout)]

    def time1(self, argv: list[str], *, stdin: Path | None = None,
              env: dict[str, str] | None = None, timeout: float = 900) -> Timed:
        cmd: dict[str, Any] = {"argv": argv}
        if stdin is not None:
            cmd["stdin"] = str(stdin)
        return self.timed([cmd], env=env, timeout=timeout)[0]

    def ssh_timed(self, commands: list[list[str]], *, timeout: float = 900) -> list[Timed]:
        """Run each argv in `commands` as its own `ssh root@SRV 'ARGV'` (a new login each time)
        from the client namespace, one after the other; each timed around the whole ssh
        process. The remote command line is the argv with every word shell-quoted; the
        session's environment (FWSAFE_STATE_DIR, PATH, SSH_CONNECTION) comes from the lab's
        sshd. Needs the lab's sshd (open_lab(..., sshd=True))."""
        lab = self.lab
        cmds = [{"argv": ssh_client_argv(lab.key, lab.known_hosts, lab.srv_ip4,
                                         shlex.join(argv), port=lab.ssh_port)}
                for argv in commands]
        result = lab.cli_exec([sys.executable, "-I", "-c", _TIMER_SCRIPT],
                              input=json.dumps({"cmds": cmds}), timeout=timeout)
        return [Timed(**item) for item in json.loads(result.stdout)]

    def check_ssh_env(self) -> None:
        """An ssh login into the server sees this lab's FWSAFE_STATE_DIR (raise if not)."""
        t = self.ssh_timed([["printenv", "FWSAFE_STATE_DIR"]], timeout=60)[0]
        if t.rc != 0 or t.stdout.strip() != str(self.state_dir):
            raise LabError(f"ssh session: FWSAFE_STATE_DIR is {t.stdout.strip()!r} (exit {t.rc},"
                           f" {t.stderr.strip()[-200:]!r}), not {self.state_dir}")

    def fw(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """fwsafe in the server namespace (not timed)."""
        return self.lab.srv_exec(["env", f"FWSAFE_STATE_DIR={self.state_dir}", fwsafe_bin(),
                                  *args], check=False, timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.fw("status", "--json")
        if result.returncode != 0:
            raise LabError(f"fwsafe status failed: {result.stderr.strip()}")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def wait_final(self, limit_s: float = 30) -> dict[str, Any]:
        """Wait until the current transaction (if any) is no longer open."""
        end = time.monotonic() + limit_s
        while True:
            info = self.status()
            if info["state"] not in ("preparing", "applying", "pending", "reverting") \
                    or time.monotonic() > end:
                return info
            time.sleep(0.1)

    def settle(self) -> None:
        """Leave no open transaction behind: revert a pending one."""
        info = self.status()
        if info["state"] == "pending":
            self.fw("revert")
        self.wait_final()

    def start_listener(self, port: int = PROBE_PORT) -> None:
        proc = self.lab.srv_popen([sys.executable, "-I", "-u", "-c", _LISTENER_SCRIPT,
                                   self.lab.srv_ip4, str(port)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        stdout = cast(IO[bytes], proc.stdout)
        line = stdout.readline()
        if line.strip() != b"ready":
            raise LabError(f"probe listener did not start (exit {proc.poll()})")
        self.listener = proc

    def load_baseline(self) -> None:
        self.lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
        self.lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)

    def close(self) -> None:
        self.lab.close()


def open_lab(role: str, index: int, *, private_ufw: bool = False, sshd: bool = True,
             listener: bool = False, baseline: bool = True) -> BenchLab:
    """Build a lab of our own; everything made is removed again if a step fails."""
    lab = create_lab(prefix(role), index, private_ufw=private_ufw)
    try:
        bench = BenchLab(lab=lab, state_dir=lab.workdir / "state")
        if baseline:
            bench.load_baseline()
        if sshd:
            lab.start_sshd(env=bench.env)
        if listener:
            bench.start_listener()
        return bench
    except BaseException:
        lab.close()
        raise


class SessionReader(threading.Thread):
    """Collects an interactive session's output with the arrival time of every chunk."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True, name=f"session-{proc.pid}")
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.cond = threading.Condition()
        self.text = ""
        self.marks: list[tuple[int, float]] = []   # (end offset, arrival time)
        self.eof = False
        self.start()

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                chunk = b""
            now = time.time()
            with self.cond:
                if not chunk:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.text += chunk.decode(errors="replace")
                self.marks.append((len(self.text), now))
                self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> float | None:
        """The arrival time of the output that completed `pattern`; None on timeout or EOF."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                match = regex.search(self.text)
                if match:
                    return next(t for off, t in self.marks if off >= match.end())
                left = end - time.monotonic()
                if left <= 0 or self.eof:
                    return None
                self.cond.wait(left)


class Poller:
    """The NEW-connection poller in the client namespace (see _POLLER_SCRIPT)."""

    def __init__(self, bl: BenchLab, limit_s: float, *, every: float = 0.05,
                 per: float = 0.25) -> None:
        lab = bl.lab
        self.proc = lab.cli_popen([sys.executable, "-I", "-u", "-c", _POLLER_SCRIPT,
                                   lab.srv_ip4, str(lab.ssh_port), f"{limit_s:.3f}",
                                   f"{every:.3f}", f"{per:.3f}"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        self.limit_s = limit_s
        self.lines: list[str] = []
        self.first_fail: float | None = None
        self.ok_at: float | None = None
        self.fails = 0
        self.cond = threading.Condition()
        self.done = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stdout = cast(IO[bytes], self.proc.stdout)
        for raw in stdout:
            line = raw.decode(errors="replace").strip()
            with self.cond:
                self.lines.append(line)
                parts = line.split()
                if parts[:1] == ["FAIL"]:
                    self.first_fail = float(parts[1])
                elif parts[:1] == ["OK"]:
                    self.ok_at, self.fails = float(parts[1]), int(parts[2])
                elif parts[:1] == ["TIMEOUT"]:
                    self.fails = int(parts[1])
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_first_fail(self, timeout: float) -> float | None:
        end = time.monotonic() + timeout
        with self.cond:
            while self.first_fail is None and not self.done:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.first_fail

    def wait(self) -> float | None:
        """Block until the poller ends; the Unix time of the first successful connection."""
        end = time.monotonic() + self.limit_s + 15
        with self.cond:
            while not self.done:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.ok_at


def dir_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the files under `path`."""
    apparent = allocated = 0
    for item in path.rglob("*"):
        try:
            st = item.lstat()
        except OSError:
            continue
        if item.is_file():
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_when_idle(pid: int, limit_s: float = 120.0) -> int | None:
    """VmRSS of `pid` once it has stopped working (no CPU time used over 0.5 s: a guard done
    with its capture after the change, which it reads in a thread while it already answers),
    at most `limit_s` from now."""
    end = time.monotonic() + limit_s
    last = proc_cpu_ticks(pid)
    while last is not None and time.monotonic() < end:
        time.sleep(0.5)
        now = proc_cpu_ticks(pid)
        if now == last:
            break
        last = now
    return proc_status_kb(pid, "VmRSS")


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])
