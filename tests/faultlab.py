"""The fault lab: a workstation and a server joined through a router whose wire delays, drops or
cuts packets on command, with the server's fwsafe state directory on a small tmpfs.

Layout (every namespace made here; the root namespace's interfaces and firewall are never
touched):

    <prefix>-cli  the workstation: eth0 10.237.<i>.2/25, default route via the router;
                  `fwsafe apply --host` and the judge's ssh run here
    <prefix>-rtr  the router: c0 10.237.<i>.1/25, s0 10.237.<i>.129/25, forwarding on; every
                  packet it forwards goes through tun0 and tests/faultwire.py (delay, loss,
                  one-way cuts, per direction, changed at any moment); `tbf` on c0/s0 for a
                  rate limit (this kernel has no sch_netem)
    <prefix>-srv  the server: eth0 10.237.<i>.130/25, a real sshd in a private mount
                  namespace where the state directory is a tmpfs (`state_mb` MiB) and the
                  sessions' TMPDIR a directory of the lab's own (the upload directories of
                  `apply --host` are counted there)

The plumbing is the namespace lab's (fwsafe.check.netns, fwsafe.lab: sshd, keys, the mount
holder, the per-prefix lock). Everything started here is stopped by PID; what still lives in the
namespaces at the end (guards, backstops) is killed by the PIDs `ip netns pids` lists.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.check.netns import Namespaces
from fwsafe.lab import (
    LabError,
    MountHolder,
    SshServer,
    banner_probe_argv,
    known_hosts_line,
    normalize_save,
    pub_path,
    run,
    ssh_client_argv,
    ssh_keygen,
    stop_popen,
    teardown,
)
from fwsafe.lab.network import acquire_prefix_lock
from tests.bins import FWSAFE
from tests.fleetlab import SESSION_PATH
from tests.rulesets import BASELINE_V4, BASELINE_V6

__all__ = ["FaultLab", "create_fault_lab"]

WIRE = Path(__file__).resolve().parent / "faultwire.py"
_COUNTER = itertools.count(1)

# Fixed shell text; paths come as positional parameters: a tmpfs over the state directory in a
# private mount namespace, then hold that namespace open.
_STATE_HOLDER = (
    'mount -t tmpfs -o "size=$2m,mode=0700" fwsafe-fault-state "$1" '
    "&& echo ready && exec sleep infinity"
)


@dataclass
class FaultLab:
    """One client/router/server triple. Use as a context manager."""

    prefix: str
    index: int
    workdir: Path
    state_mb: int = 32
    net: Namespaces = field(default_factory=Namespaces)
    sshd: SshServer = field(init=False)
    holder: MountHolder = field(init=False)
    _wire: subprocess.Popen[bytes] | None = None
    _lock_fd: int | None = None
    _children: list[subprocess.Popen[Any]] = field(default_factory=list)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.sshd = SshServer(self.workdir, self.host_key, self.workdir / "authorized_keys",
                              [self.srv_ip], extra=["MaxSessions 50"])
        self.holder = MountHolder(self.srv_ns, self.workdir / "mount-holder.err")

    # -- names ---------------------------------------------------------------------------------
    cli_ns = property(lambda self: f"{self.prefix}-cli")
    rtr_ns = property(lambda self: f"{self.prefix}-rtr")
    srv_ns = property(lambda self: f"{self.prefix}-srv")
    cli_ip = property(lambda self: f"10.237.{self.index}.2")
    srv_ip = property(lambda self: f"10.237.{self.index}.130")
    key = property(lambda self: self.workdir / "id_ed25519")
    host_key = property(lambda self: self.workdir / "ssh_host_ed25519_key")
    known_hosts = property(lambda self: self.workdir / "known_hosts")
    state_dir = property(lambda self: self.workdir / "state")
    session_tmp = property(lambda self: self.workdir / "session-tmp")
    control = property(lambda self: self.workdir / "wire.sock")

    def __enter__(self) -> FaultLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire ------------------------------------------------------------------------------
    def link(self, **change: Any) -> dict[str, Any]:
        """Change the wire: ``link(up={"delay": 0.5}, down={"cut": True})``, ``link(reset=True)``;
        returns its settings and counters."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.control))
            sock.sendall((json.dumps(change) + "\n").encode())
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        data: dict[str, Any] = json.loads(answer)
        return data

    def delay(self, each_way: float, loss: float = 0.0) -> None:
        self.link(up={"delay": each_way, "loss": loss}, down={"delay": each_way, "loss": loss})

    def cut(self, up: bool = True, down: bool = True) -> None:
        self.link(up={"cut": up}, down={"cut": down})

    def rate_limit(self, rate: str) -> None:
        """tbf on both router ports (e.g. "512kbit")."""
        for dev in ("c0", "s0"):
            run(["tc", "-n", self.rtr_ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", rate, "burst", "16kb", "latency", "2s"], timeout=30)

    # -- the server ----------------------------------------------------------------------------
    def srv(self, argv: list[str], *, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run argv on the server (its network namespace and its mounts)."""
        return run([*self.holder.enter_argv(), *argv], check=check, input=input, timeout=timeout)

    def fw(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.srv(["env", f"FWSAFE_STATE_DIR={self.state_dir}", f"PATH={SESSION_PATH}",
                         FWSAFE, *args], check=check)

    def status(self) -> dict[str, Any]:
        res = self.fw("status", "--json")
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def ruleset(self) -> str:
        return normalize_save(self.srv(["iptables-save"]).stdout)

    def fill_state_disk(self) -> None:
        """Fill the state directory's tmpfs to the last byte."""
        self.srv(["sh", "-c", 'dd if=/dev/zero of="$1/filler" bs=64k 2>/dev/null; '
                  'dd if=/dev/zero of="$1/filler2" bs=1 2>/dev/null; exit 0', "fill",
                  str(self.state_dir)], timeout=60)

    def free_state_disk(self) -> None:
        self.srv(["rm", "-f", f"{self.state_dir}/filler", f"{self.state_dir}/filler2"])

    def upload_leftovers(self) -> list[str]:
        """Upload directories of `apply --host` left in the sessions' TMPDIR."""
        return sorted(p.name for p in self.session_tmp.glob("fwsafe-upload.*"))

    def upload_modes(self) -> dict[str, int]:
        return {str(p.relative_to(self.session_tmp)): p.stat().st_mode & 0o777
                for p in self.session_tmp.rglob("*")}

    # -- the workstation -----------------------------------------------------------------------
    def client_popen(self, argv: list[str]) -> subprocess.Popen[str]:
        """Start argv on the workstation (`ip netns exec` and env(1) exec it: the PID is
        argv's), with SIGHUP, SIGINT and SIGTERM at their defaults as in an admin's terminal:
        a suite started under nohup or as a background job would otherwise pass its ignored
        signals on, and the client rightly keeps an ignored signal ignored. faulthandler is on:
        a client that hangs prints every thread's stack when sent SIGABRT."""
        argv = ["env", "--default-signal=HUP,INT,TERM", "PYTHONFAULTHANDLER=1", *argv]
        proc = subprocess.Popen(self.net.exec_argv(self.cli_ns, argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self._children.append(proc)
        return proc

    def apply_argv(self, *args: str) -> list[str]:
        return [FWSAFE, "apply", "--host", f"root@{self.srv_ip}", "-i", str(self.key),
                "--known-hosts", str(self.known_hosts), "--json", *args]

    def new_connection_ok(self, timeout: float = 1.0) -> bool:
        res = run(self.net.exec_argv(self.cli_ns, banner_probe_argv(self.srv_ip, 22, timeout)),
                  check=False, timeout=timeout + 15)
        return res.returncode == 0

    def new_login_ok(self, timeout: float = 8.0) -> bool:
        """A full, new ssh login (OpenSSH's client) running `true` succeeds."""
        argv = ssh_client_argv(self.key, self.known_hosts, self.srv_ip, "true",
                               extra_opts=["-o", "ConnectTimeout=5"])
        try:
            res = run(self.net.exec_argv(self.cli_ns, argv), check=False, timeout=timeout)
        except LabError:
            return False
        return res.returncode == 0

    def wait_login(self, until: float) -> float | None:
        """Poll (local monotonic time) until a new login gets in; when it did, or None."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            if self.new_login_ok(timeout=max(min(left, 8.0), 1.0)):
                return time.monotonic()
            time.sleep(0.2)

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._children:
            with suppress(Exception):
                stop_popen(proc, group=True)
        if self._wire is not None:
            with suppress(Exception):
                stop_popen(self._wire, group=True)
        errors = teardown([("stopping sshd", self.sshd.stop),
                           ("stopping the mount holder", self.holder.stop),
                           ("removing namespaces", self.net.close)])
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_fd is not None:
            with suppress(OSError):
                os.close(self._lock_fd)
        if errors:
            raise LabError(f"fault lab {self.prefix} teardown incomplete: " + "; ".join(errors))


def _build(lab: FaultLab) -> None:
    net = lab.net
    i = lab.index
    for ns in (lab.cli_ns, lab.rtr_ns, lab.srv_ns):
        net.create(ns)
    net.veth(lab.cli_ns, "eth0", lab.rtr_ns, "c0")
    net.veth(lab.srv_ns, "eth0", lab.rtr_ns, "s0")
    net.configure(lab.cli_ns, "eth0", [f"{lab.cli_ip}/25"])
    net.configure(lab.srv_ns, "eth0", [f"{lab.srv_ip}/25"])
    net.configure(lab.rtr_ns, "c0", [f"10.237.{i}.1/25"])
    net.configure(lab.rtr_ns, "s0", [f"10.237.{i}.129/25"])
    net.batch(lab.cli_ns, [f"route add default via 10.237.{i}.1"])
    net.batch(lab.srv_ns, [f"route add default via 10.237.{i}.129"])
    net.batch(lab.rtr_ns, ["tuntap add dev tun0 mode tun", "link set tun0 up",
                           "rule add iif c0 lookup 100 pref 100",
                           "rule add iif s0 lookup 100 pref 101",
                           "route add default dev tun0 table 100"])
    sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
               "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.tun0.rp_filter=0",
               "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.c0.send_redirects=0",
               "net.ipv4.conf.s0.send_redirects=0"]
    run(net.exec_argv(lab.rtr_ns, ["sysctl", "-q", "-w", *sysctls]), timeout=30)
    err = open(lab.workdir / "wire.err", "wb")  # noqa: SIM115 - the child keeps it
    with err:
        lab._wire = subprocess.Popen(
            net.exec_argv(lab.rtr_ns, [sys.executable, str(WIRE), "tun0", str(lab.control),
                                       f"10.237.{i}.128/25"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True)
    assert lab._wire.stdout is not None
    if lab._wire.stdout.readline().strip() != b"ready":
        raise LabError(f"the fault wire did not start: {(lab.workdir / 'wire.err').read_text()}")
    lab.state_dir.mkdir(mode=0o700)
    lab.session_tmp.mkdir(mode=0o700)
    lab.holder.start(net.exec_argv(lab.srv_ns, []), _STATE_HOLDER,
                     [str(lab.state_dir), str(lab.state_mb)], name="fault-state")
    lab.srv(["iptables-restore"], input=BASELINE_V4)
    lab.srv(["ip6tables-restore"], input=BASELINE_V6)
    ssh_keygen(lab.key, f"fault-{lab.prefix}-client")
    ssh_keygen(lab.host_key, f"fault-{lab.prefix}-host")
    auth = lab.workdir / "authorized_keys"
    auth.write_text(pub_path(lab.key).read_text())
    auth.chmod(0o600)
    lab.known_hosts.write_text(known_hosts_line([lab.srv_ip], lab.host_key))
    env = {"PATH": SESSION_PATH, "FWSAFE_STATE_DIR": str(lab.state_dir),
           "TMPDIR": str(lab.session_tmp)}
    lab.sshd.start(lab.holder.enter_argv(), env=env,
                   answering=lambda _address: lab.new_connection_ok(timeout=0.5))


def create_fault_lab(*, state_mb: int = 32) -> FaultLab:
    """Build a fault lab (a fresh prefix and index per call); cleans up on failure."""
    n = next(_COUNTER)
    prefix = f"fz{os.getpid() % 100000}x{n}"[:14]
    index = (os.getpid() * 7 + n) % 250 + 1
    lock_fd = acquire_prefix_lock(prefix)
    workdir = Path(tempfile.mkdtemp(prefix=f"fwsafe-fault-{prefix}-"))
    lab = FaultLab(prefix=prefix, index=index, workdir=workdir, state_mb=state_mb)
    lab._lock_fd = lock_fd
    try:
        _build(lab)
    except BaseException:
        lab.close()
        raise
    return lab


def interrupt(proc: subprocess.Popen[Any], sig: int = signal.SIGINT) -> None:
    """Send `sig` to the client (its PID is fwsafe's own)."""
    with suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
