"""A fleet in network namespaces: one Ansible controller and several hosts, each with its own
sshd, state directory and firewall, for the tests of the Ansible collection (ansible/).

Layout (everything inside namespaces this module creates; the root namespace's interfaces and
firewall are never touched):

    <prefix>-ctl   the controller: a bridge ``br0`` with 10.234.<index>.1/24; ansible-playbook
                   and ssh run here
    <prefix>-h1..  the hosts: ``eth0`` (a veth whose peer is a port of br0 in the controller
                   namespace, both ends created directly inside the namespaces) with
                   10.234.<index>.(10+N)/24, a real sshd on port 22, a baseline ruleset

A ufw host lives, besides its network namespace, in a private mount namespace whose /etc is an
overlay with its writable layer in the fleet's workdir: ufw (and whatever else writes /etc
there) never touches this machine's files. Its sshd runs in that mount namespace, so sessions
see the same files.

Every process started here is tracked and stopped by PID; anything else still living in one of
the fleet's namespaces at the end (fwsafe guards, ssh ControlPersist masters) is killed by the
PIDs `ip netns pids` lists for those namespaces, then the namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.lab import SSHD, LabError
from tests.bins import VENV_BIN

NETNS_DIR = Path("/run/netns")
SESSION_PATH = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"

# Fixed shell text; paths come as positional parameters. An overlay over /etc (upper layer in
# the workdir) in a private mount namespace, then hold that namespace open.
_UFW_HOLDER = (
    'mount -t overlay fleet-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc '
    "&& echo ready && exec sleep infinity"
)

# A NEW TCP connection from the controller namespace; exit 0 if the SSH banner arrives in time.
_BANNER = """\
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 22), timeout=float(sys.argv[2]))
    s.settimeout(float(sys.argv[2]))
    sys.exit(0 if s.recv(4) == b"SSH-" else 1)
except OSError:
    sys.exit(1)
"""

_COUNTER_RE = re.compile(r"\[\d+:\d+\]")


def run(argv: list[str], *, input: str | None = None, check: bool = True,
        timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell); a failure with `check` raises LabError with the output."""
    try:
        res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                             check=False, env=env,
                             stdin=subprocess.DEVNULL if input is None else None)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g} s: {' '.join(argv)}") from exc
    if check and res.returncode != 0:
        raise LabError(f"exit {res.returncode}: {' '.join(argv)}\n{res.stderr}{res.stdout}")
    return res


def normalize_save(text: str) -> str:
    """iptables-save output without comments, blank lines and counters."""
    lines = [_COUNTER_RE.sub("[0:0]", ln) for ln in text.splitlines()
             if ln.strip() and not ln.startswith("#")]
    return "\n".join(lines) + "\n"


def _stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM then SIGKILL to the process group of a child we started (its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _netns_pids(ns: str) -> list[int]:
    if not (NETNS_DIR / ns).exists():
        return []
    res = run(["ip", "netns", "pids", ns], check=False, timeout=15)
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _destroy_netns(ns: str) -> None:
    """Kill what still runs in OUR namespace `ns` (by PID) and delete it."""
    if not (NETNS_DIR / ns).exists():
        return
    deadline = time.monotonic() + 10
    while pids := [p for p in _netns_pids(ns) if p != os.getpid()]:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise LabError(f"processes keep living in netns {ns}: {pids}")
        time.sleep(0.05)
    run(["ip", "netns", "del", ns], check=False, timeout=15)
    if (NETNS_DIR / ns).exists():
        with contextlib.suppress(OSError):
            (NETNS_DIR / ns).unlink()


@dataclass
class Host:
    """One managed host: its namespace, address, sshd and fwsafe state directory."""

    name: str
    ns: str
    ip: str
    workdir: Path
    ufw: bool = False
    sshd: subprocess.Popen[bytes] | None = None
    holder: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def host_key(self) -> Path:
        return self.workdir / "ssh_host_ed25519_key"

    @property
    def sshd_log(self) -> Path:
        return self.workdir / "sshd.log"

    def prefix(self) -> list[str]:
        """argv prefix that runs a command in this host's namespace(s)."""
        if self.holder is not None:
            return ["nsenter", f"--net={NETNS_DIR / self.ns}",
                    f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]
        return ["ip", "netns", "exec", self.ns]

    def exec(self, argv: list[str], *, input: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run([*self.prefix(), *argv], input=input, check=check, timeout=timeout)

    def fw(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """fwsafe on the host (not over SSH), with the host's state directory."""
        return self.exec(["env", f"FWSAFE_STATE_DIR={self.state_dir}", f"PATH={SESSION_PATH}",
                          str(VENV_BIN / "fwsafe"), *args], check=check)

    def status(self) -> dict[str, Any]:
        res = self.fw("status", "--json", check=True)
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def ruleset(self) -> str:
        """The live IPv4 and IPv6 rules, normalized."""
        return (normalize_save(self.exec(["iptables-save"]).stdout) + "==\n"
                + normalize_save(self.exec(["ip6tables-save"]).stdout))

    def accepted_logins(self) -> int:
        """SSH logins sshd accepted so far (from its VERBOSE log)."""
        try:
            return self.sshd_log.read_text(errors="replace").count("Accepted publickey")
        except FileNotFoundError:
            return 0


@dataclass
class Fleet:
    """The controller namespace and the hosts. Use as a context manager."""

    prefix: str
    index: int
    workdir: Path
    hosts: list[Host] = field(default_factory=list)
    _closed: bool = False

    @property
    def ctl_ns(self) -> str:
        return f"{self.prefix}-ctl"

    @property
    def ctl_ip(self) -> str:
        return f"10.234.{self.index}.1"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def namespaces(self) -> list[str]:
        return [self.ctl_ns, *(h.ns for h in self.hosts)]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ctl(self, argv: list[str], *, env: dict[str, str], timeout: float = 600,
            ) -> subprocess.CompletedProcess[str]:
        """Run argv in the controller namespace with exactly `env` (nothing inherited)."""
        return run(["ip", "netns", "exec", self.ctl_ns, "env", "-i",
                    *(f"{k}={v}" for k, v in env.items()), *argv],
                   check=False, timeout=timeout)

    def new_connection_ok(self, host: Host, timeout: float = 1.0) -> bool:
        """A NEW TCP connection from the controller to host:22 gets the SSH banner."""
        res = run(["ip", "netns", "exec", self.ctl_ns, sys.executable, "-I", "-c", _BANNER,
                   host.ip, str(timeout)], check=False, timeout=timeout + 15)
        return res.returncode == 0

    def wait_reachable(self, host: Host, limit_s: float) -> bool:
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            if self.new_connection_ok(host, timeout=1.0):
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for host in self.hosts:
            for proc in (host.sshd, host.holder):
                if proc is not None:
                    try:
                        _stop(proc)
                    except Exception as exc:  # keep tearing down
                        errors.append(f"{host.name}: {exc}")
        for ns in self.namespaces():
            try:
                _destroy_netns(ns)
            except Exception as exc:
                errors.append(str(exc))
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("fleet teardown incomplete: " + "; ".join(errors))


def _keygen(path: Path, comment: str) -> None:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _start_sshd(fleet: Fleet, host: Host) -> None:
    cfg = host.workdir / "sshd_config"
    auth = fleet.workdir / "authorized_keys"
    cfg.write_text("\n".join([
        "Port 22",
        f"ListenAddress {host.ip}",
        f"HostKey {host.host_key}",
        f"PidFile {host.workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth}",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "ClientAliveInterval 2",
        "ClientAliveCountMax 2",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 100:30:200",
        "MaxSessions 50",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
        f'SetEnv "PATH={SESSION_PATH}" "FWSAFE_STATE_DIR={host.state_dir}"',
    ]) + "\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with open(host.sshd_log, "ab") as log:
        host.sshd = subprocess.Popen([*host.prefix(), SSHD, "-D", "-e", "-f", str(cfg)],
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    if not fleet.wait_reachable(host, 10):
        raise LabError(f"sshd of {host.name} does not answer:\n{host.sshd_log.read_text()}")


def _start_ufw_holder(host: Host) -> None:
    upper, work = host.workdir / "etc-upper", host.workdir / "etc-work"
    upper.mkdir()
    work.mkdir()
    argv = ["ip", "netns", "exec", host.ns, "unshare", "--mount", "--propagation", "private",
            "sh", "-c", _UFW_HOLDER, "fleet-mounts", str(upper), str(work)]
    host.holder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    assert host.holder.stdout is not None
    line = host.holder.stdout.readline()
    if line.strip() != b"ready":
        raise LabError(f"private /etc for {host.name} failed: {line!r}")


def create_fleet(baseline_v4: str, baseline_v6: str, *, hosts: int = 3, ufw_hosts: int = 1,
                 ) -> Fleet:
    """Build the fleet: `hosts` iptables hosts (h1..) with the baseline rules, then `ufw_hosts`
    ufw hosts (ufw enabled, allowing 22/tcp), every sshd running. Cleans up on failure."""
    prefix = f"fwa{os.getpid() % 100000}"
    index = os.getpid() % 200 + 20
    workdir = Path(tempfile.mkdtemp(prefix=f"fwsafe-fleet-{prefix}-"))
    fleet = Fleet(prefix=prefix, index=index, workdir=workdir)
    try:
        for i in range(1, hosts + ufw_hosts + 1):
            hdir = workdir / f"h{i}"
            hdir.mkdir()
            fleet.hosts.append(Host(name=f"h{i}", ns=f"{prefix}-h{i}", ip=f"10.234.{index}.{10 + i}",
                                    workdir=hdir, ufw=i > hosts))
        for ns in fleet.namespaces():
            _destroy_netns(ns)  # stale, from a crashed run of the same PID
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        ctl = fleet.ctl_ns
        run(["ip", "-n", ctl, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", ctl, "addr", "add", f"{fleet.ctl_ip}/24", "dev", "br0"])
        run(["ip", "-n", ctl, "link", "set", "br0", "up"])
        _keygen(fleet.key, f"fleet-{prefix}-controller")
        (workdir / "authorized_keys").write_text(Path(f"{fleet.key}.pub").read_text())
        known: list[str] = []
        for i, host in enumerate(fleet.hosts, start=1):
            # Both ends are created inside the namespaces: nothing appears in the root one.
            run(["ip", "link", "add", "eth0", "netns", host.ns, "type", "veth",
                 "peer", "name", f"port{i}", "netns", ctl])
            run(["ip", "-n", ctl, "link", "set", f"port{i}", "master", "br0"])
            run(["ip", "-n", ctl, "link", "set", f"port{i}", "up"])
            run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
            run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
            _keygen(host.host_key, f"fleet-{prefix}-{host.name}")
            kind, b64 = Path(f"{host.host_key}.pub").read_text().split()[:2]
            known.append(f"{host.ip} {kind} {b64}")
            if host.ufw:
                _start_ufw_holder(host)
                host.exec(["ufw", "allow", "22/tcp"])
                host.exec(["ufw", "--force", "enable"])
            else:
                host.exec(["iptables-restore"], input=baseline_v4)
                host.exec(["ip6tables-restore"], input=baseline_v6)
            _start_sshd(fleet, host)
        fleet.known_hosts.write_text("\n".join(known) + "\n")
    except BaseException:
        fleet.close()
        raise
    return fleet
