"""Self-test of the namespace lab (fwsafe.lab): real sshd, real netfilter, real cgroups.

Everything runs in network namespaces made here; the root namespace's firewall is never
touched. Each test tears down what it built, also when it fails.
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwsafe.lab import (
    Lab,
    LabError,
    MemoryCgroup,
    PidsCgroup,
    create_lab,
    require_lab_capable,
)

pytestmark = pytest.mark.lab

DROP_NEW_SSH = ["INPUT", "-p", "tcp", "--dport", "22", "-m", "conntrack", "--ctstate", "NEW"]


@pytest.fixture(autouse=True)
def _lab_capable() -> None:
    """Skip where labs cannot run (not root, no netns) — but fail in CI, where they must run."""
    reason = require_lab_capable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"namespace lab unavailable in CI: {reason}")
    pytest.skip(f"namespace lab unavailable: {reason}")


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _procs_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions ``text`` (e.g. a lab's workdir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _expect_output(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 10.0) -> None:
    """Read the session's stdout until ``marker`` shows up (fail after ``timeout``)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {marker!r} from the session within {timeout}s; got {buf!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"session ended before {marker!r}; got {buf!r}")
            buf += chunk


def _echo_through(session: subprocess.Popen[bytes], word: str) -> None:
    """Send a line through a remote `cat` and see it come back: the session is alive."""
    assert session.stdin is not None
    session.stdin.write(f"{word}\n".encode())
    session.stdin.flush()
    _expect_output(session, word.encode())


def _tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file below ``paths`` (for "the host's files are unchanged")."""
    digests: dict[str, str] = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def _assert_gone(lab: Lab, sshd_pid: int) -> None:
    names = _netns_names()
    assert lab.srv_ns not in names and lab.cli_ns not in names
    assert not Path(f"/proc/{sshd_pid}").exists(), "sshd still running after close()"
    assert _procs_mentioning(str(lab.workdir)) == []
    assert not lab.workdir.exists()


def test_lab_sshd_env_and_new_connection_blocking() -> None:
    lab = create_lab("fwself", 200)
    sshd_pid = 0
    try:
        assert {lab.srv_ns, lab.cli_ns} <= _netns_names()
        lab.start_sshd(env={"FWSAFE_SELFTEST": "hello lab"})
        assert lab.sshd_pid is not None
        sshd_pid = lab.sshd_pid

        assert lab.new_connection_ok()
        assert lab.new_connection_ok(ipv6=True)
        assert lab.new_login_ok()
        assert lab.new_login_ok(ipv6=True)

        res = lab.ssh('printf "%s|%s" "$FWSAFE_SELFTEST" "$PATH"')
        assert res.returncode == 0, res.stderr
        value, path = res.stdout.split("|", 1)
        assert value == "hello lab"
        assert os.path.dirname(os.path.abspath(sys.executable)) in path.split(":")
        assert lab.ssh("cat", input="through stdin\n").stdout == "through stdin\n"

        # A session that is already open, as a person's would be.
        session = lab.ssh_popen(
            "cat",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        _echo_through(session, "before-the-rule")

        lab.srv_exec(["iptables", "-I", *DROP_NEW_SSH, "-j", "DROP"])
        assert not lab.new_connection_ok(timeout=1.0)
        assert not lab.new_login_ok(timeout=6.0)
        assert lab.wait_new_login(deadline_s=1.5) is None
        _echo_through(session, "after-the-rule")  # established traffic still flows
        assert lab.new_connection_ok(ipv6=True)  # only the IPv4 table has the rule

        rules = lab.ruleset()
        assert "== ipv4 ==" in rules and "== ipv6 ==" in rules
        assert "-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP" in rules
        assert ":INPUT ACCEPT [0:0]" in rules
        assert not any(line.startswith("#") for line in rules.splitlines())

        lab.srv_exec(["iptables", "-D", *DROP_NEW_SSH, "-j", "DROP"])
        waited = lab.wait_new_login(deadline_s=10)
        assert waited is not None and waited < 10
        _echo_through(session, "still-there")
        assert session.poll() is None
    finally:
        lab.close()
    if sshd_pid:
        _assert_gone(lab, sshd_pid)
    assert session.returncode is not None  # close() stopped the tracked session
    for pipe in (session.stdin, session.stdout):
        if pipe is not None:
            pipe.close()
    lab.close()  # idempotent
    with pytest.raises(LabError):
        lab.srv_exec(["true"])


def test_private_ufw_uses_a_private_copy() -> None:
    real = [Path("/etc/ufw"), Path("/etc/default/ufw")]
    before = _tree_digest(*real)
    marker = f"fwsafe-selftest-{os.getpid()}"
    lab = create_lab("fwselfu", 201, private_ufw=True)
    sshd_pid = 0
    try:
        assert lab.ufw_dir is not None and lab.default_ufw is not None
        (lab.ufw_dir / marker).write_text("private copy\n")
        assert lab.srv_exec(["cat", f"/etc/ufw/{marker}"]).stdout == "private copy\n"
        assert not Path("/etc/ufw", marker).exists()

        # ufw itself reads and writes the copy.
        lab.srv_exec(["ufw", "allow", "2222/tcp"])
        assert "2222" in (lab.ufw_dir / "user.rules").read_text()
        assert "ENABLED=" in lab.srv_exec(["cat", "/etc/ufw/ufw.conf"]).stdout

        lab.start_sshd()
        assert lab.sshd_pid is not None and lab.mount_ns_pid is not None
        sshd_pid = lab.sshd_pid
        assert os.readlink(f"/proc/{sshd_pid}/ns/mnt") == os.readlink(
            f"/proc/{lab.mount_ns_pid}/ns/mnt"
        )
        res = lab.ssh(f"cat /etc/ufw/{marker}")
        assert res.returncode == 0, res.stderr
        assert res.stdout == "private copy\n"
    finally:
        lab.close()
    assert _tree_digest(*real) == before
    if sshd_pid:
        _assert_gone(lab, sshd_pid)


def test_memory_cgroup_oom_kills_a_hog() -> None:
    cg = MemoryCgroup(f"fwsafe-selftest-mem-{os.getpid()}", 50 * 1024 * 1024)
    path = cg.path
    hog = "import sys\nsys.stdin.readline()\nb = b'x' * (200 * 1024 * 1024)\nprint(len(b))\n"
    try:
        assert path.is_dir()
        proc = subprocess.Popen(
            [sys.executable, "-c", hog],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            cg.add(proc.pid)
            assert proc.pid in cg.pids()
            out, _ = proc.communicate(b"go\n", timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -9, out
        assert cg.oom_kills() >= 1
    finally:
        cg.close()
    assert not path.exists()
    cg.close()  # idempotent


FORK_PROBE = """\
import os, sys
try:
    pid = os.fork()
except OSError as exc:
    print("fork-blocked", type(exc).__name__)
    sys.exit(0)
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("fork-ok")
"""


def test_pids_cgroup_blocks_fork() -> None:
    cg = PidsCgroup(f"fwsafe-selftest-pids-{os.getpid()}", 1)
    path = cg.path
    try:
        blocked = subprocess.run(
            cg.wrap_argv([sys.executable, "-c", FORK_PROBE]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert blocked.stdout.split() in (
            ["fork-blocked", "BlockingIOError"],
            ["fork-blocked", "OSError"],
        ), blocked
        cg.set_max(None)
        allowed = subprocess.run(
            cg.wrap_argv([sys.executable, "-c", FORK_PROBE]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert allowed.stdout.strip() == "fork-ok", allowed
    finally:
        cg.close()
    assert not path.exists()
    cg.close()  # idempotent


def test_netns_pids_agrees_with_ip_and_close_kills_what_runs_inside() -> None:
    """`netns_pids` reads /proc itself (every sandbox's teardown asks it twice a namespace):
    the same PIDs as `ip netns pids`; closing kills them and removes the namespace."""
    from fwsafe.check.netns import Namespaces, netns_exists, netns_pids

    namespaces = Namespaces()
    name = f"fwtpids{os.getpid()}"
    sleeper = None
    try:
        namespaces.create(name)
        assert netns_pids(name) == []
        sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
        deadline = time.monotonic() + 5
        while not netns_pids(name) and time.monotonic() < deadline:
            time.sleep(0.02)
        listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                                check=True).stdout.split()
        assert netns_pids(name) == sorted(int(p) for p in listed) == [sleeper.pid]
        namespaces.close()
        assert sleeper.wait(timeout=5) == -9 and not netns_exists(name)
        assert netns_pids(name) == []
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        namespaces.close()
