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

The plumbing is the namespace lab's: the namespace builder (fwsafe.check.netns), sshd, keys,
known_hosts, the mount holder and the banner probe (fwsafe.lab).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
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
    ssh_keygen,
)
from tests.bins import VENV_BIN

__all__ = ["Fleet", "Host", "create_fleet", "normalize_save"]

SESSION_PATH = f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"

# Fixed shell text; paths come as positional parameters. An overlay over /etc (upper layer in
# the workdir) in a private mount namespace, then hold that namespace open.
_UFW_HOLDER = (
    'mount -t overlay fleet-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc '
    "&& echo ready && exec sleep infinity"
)


@dataclass
class Host:
    """One managed host: its namespace, address, sshd and fwsafe state directory."""

    name: str
    ns: str
    ip: str
    workdir: Path
    ufw: bool = False
    sshd: SshServer = field(init=False)
    holder: MountHolder = field(init=False)

    def __post_init__(self) -> None:
        self.sshd = SshServer(self.workdir, self.host_key, self.workdir.parent / "authorized_keys",
                              [self.ip], extra=["MaxSessions 50"])
        self.holder = MountHolder(self.ns, self.workdir / "mount-holder.err")

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
        if self.holder.pid is not None:
            return self.holder.enter_argv()
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
        return self.sshd.accepted_logins()


@dataclass
class Fleet:
    """The controller namespace and the hosts. Use as a context manager."""

    prefix: str
    index: int
    workdir: Path
    hosts: list[Host] = field(default_factory=list)
    net: Namespaces = field(default_factory=Namespaces)
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
        return run(self.net.exec_argv(self.ctl_ns, ["env", "-i",
                                                    *(f"{k}={v}" for k, v in env.items()), *argv]),
                   check=False, timeout=timeout)

    def new_connection_ok(self, host: Host, timeout: float = 1.0) -> bool:
        """A NEW TCP connection from the controller to host:22 gets the SSH banner."""
        res = run(self.net.exec_argv(self.ctl_ns, banner_probe_argv(host.ip, 22, timeout)),
                  check=False, timeout=timeout + 15)
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
            for stop in (host.sshd.stop, host.holder.stop):
                try:
                    stop()
                except Exception as exc:  # keep tearing down
                    errors.append(f"{host.name}: {exc}")
        try:  # what still runs in them (fwsafe guards, ssh masters) is killed by PID
            self.net.close()
        except Exception as exc:
            errors.append(str(exc))
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("fleet teardown incomplete: " + "; ".join(errors))


def _start_sshd(fleet: Fleet, host: Host) -> None:
    env = {"PATH": SESSION_PATH, "FWSAFE_STATE_DIR": str(host.state_dir)}
    host.sshd.start(host.prefix(), env=env,
                    answering=lambda _address: fleet.new_connection_ok(host, timeout=0.5))


def _start_ufw_holder(fleet: Fleet, host: Host) -> None:
    upper, work = host.workdir / "etc-upper", host.workdir / "etc-work"
    upper.mkdir()
    work.mkdir()
    host.holder.start(fleet.net.exec_argv(host.ns, []), _UFW_HOLDER, [str(upper), str(work)],
                      name="fleet-mounts")


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
        net, ctl = fleet.net, fleet.ctl_ns
        for ns in fleet.namespaces():
            net.create(ns)  # a stale one, from a crashed run of the same PID, is removed first
        net.batch(ctl, ["link add br0 type bridge"])
        net.configure(ctl, "br0", [f"{fleet.ctl_ip}/24"])
        ssh_keygen(fleet.key, f"fleet-{prefix}-controller")
        (workdir / "authorized_keys").write_text(pub_path(fleet.key).read_text())
        known: list[str] = []
        for i, host in enumerate(fleet.hosts, start=1):
            # Both ends are created inside the namespaces: nothing appears in the root one.
            net.veth(host.ns, "eth0", ctl, f"port{i}")
            net.batch(ctl, [f"link set port{i} master br0", f"link set port{i} up"])
            net.configure(host.ns, "eth0", [f"{host.ip}/24"])
            ssh_keygen(host.host_key, f"fleet-{prefix}-{host.name}")
            known.append(known_hosts_line([host.ip], host.host_key))
            if host.ufw:
                _start_ufw_holder(fleet, host)
                host.exec(["ufw", "allow", "22/tcp"])
                host.exec(["ufw", "--force", "enable"])
            else:
                host.exec(["iptables-restore"], input=baseline_v4)
                host.exec(["ip6tables-restore"], input=baseline_v6)
            _start_sshd(fleet, host)
        fleet.known_hosts.write_text("".join(known))
    except BaseException:
        fleet.close()
        raise
    return fleet
