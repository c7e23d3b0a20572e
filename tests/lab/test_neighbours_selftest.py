"""Self-test of tests/neighbours.py: the real fail2ban and dockerd in the lab do what the
neighbour tests rely on, and leave nothing behind.

Everything runs inside lab namespaces; the root namespace's firewall is never touched and the
programs' system services are never started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fwsafe.lab import create_lab
from tests import neighbours
from tests.conftest import NeighbourLab, need_programs, require_capable

pytestmark = pytest.mark.lab


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry.name))
    return found


def _mounts_mentioning(text: str) -> list[str]:
    """Mount lines naming `text`, in the mount namespace of any process on the machine."""
    seen = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                info = (entry / "mountinfo").read_text()
            except OSError:
                continue
            seen += [f"pid {entry.name}: {ln}" for ln in info.splitlines() if text in ln]
    return seen


def test_fail2ban_ban_blocks_only_that_address(f2b_lab: NeighbourLab) -> None:
    nb = f2b_lab
    banned, other = nb.clients[0], nb.clients[1]
    assert "f2b-sshd" not in nb.record("fail2ban running, no ban yet")  # chain on first ban
    took = nb.f2b.ban(banned)
    print(f"ban took {took:.1f} s")
    live = nb.record("after the ban")
    assert nb.f2b.banned() == [banned]
    assert "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd" in live
    assert f"-A f2b-sshd -s {banned}/32 -j REJECT --reject-with icmp-port-unreachable" in live
    blocked = neighbours.tcp_probe(nb.lab, src=banned)
    assert not blocked.ok and "ConnectionRefused" in str(blocked.error), blocked
    assert neighbours.tcp_probe(nb.lab, src=other).ok
    assert neighbours.tcp_probe(nb.lab).ok  # the lab's own client address
    assert nb.lab.new_login_ok()

    nb.f2b.stop()  # as `systemctl stop fail2ban`: its jump and chain go
    assert "f2b-sshd" not in nb.record("fail2ban stopped")
    assert neighbours.tcp_probe(nb.lab, src=banned).ok

    nb.f2b.start()  # the ban comes back from fail2ban's database
    end = time.monotonic() + 20
    while not nb.f2b.chain_has(banned) and time.monotonic() < end:
        time.sleep(0.2)
    nb.record("fail2ban started again")
    assert nb.f2b.banned() == [banned]
    assert not neighbours.tcp_probe(nb.lab, src=banned).ok
    assert neighbours.tcp_probe(nb.lab, src=other).ok


def test_fail2ban_rebuilds_a_vanished_chain_with_new_bans_only(f2b_lab: NeighbourLab) -> None:
    """What fail2ban 1.0.2 does when its chain disappears under it (as after a whole-table
    restore): nothing until its next ban, whose "invariant check" fails; it then rebuilds chain
    and jump with the NEW ban only. Its status keeps listing the old ban, which no longer
    blocks: fail2ban's status is no proof of a block, a real connection is."""
    nb = f2b_lab
    old, new, other = nb.clients[:3]
    nb.f2b.ban(old)
    srv = nb.lab.srv_exec
    srv(["iptables", "-w", "-D", "INPUT", "-p", "tcp", "-m", "multiport", "--dports", "22",
         "-j", "f2b-sshd"])
    srv(["iptables", "-w", "-F", "f2b-sshd"])
    srv(["iptables", "-w", "-X", "f2b-sshd"])
    time.sleep(3)  # fail2ban does not notice by itself
    assert "f2b-sshd" not in nb.record("chain removed behind fail2ban's back")
    nb.f2b.ban(new)
    time.sleep(2)
    live = nb.record("after the next ban")
    assert "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd" in live
    assert f"-s {new}/32" in live and f"-s {old}/32" not in live
    assert sorted(nb.f2b.banned()) == sorted([old, new])
    assert "Invariant check failed" in nb.f2b.server_log.read_text()
    assert not neighbours.tcp_probe(nb.lab, src=new).ok
    assert neighbours.tcp_probe(nb.lab, src=old).ok  # listed as banned, yet gets in
    assert neighbours.tcp_probe(nb.lab, src=other).ok


def test_docker_published_port_answers_from_the_client(docker_lab: NeighbourLab) -> None:
    nb = docker_lab
    docker = nb.docker
    idle = nb.record("dockerd started")
    for chain in ("DOCKER", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2"):
        assert f":{chain} - [0:0]" in idle
    assert ":FORWARD DROP [0:0]" in idle  # dockerd turned ip_forward on, FORWARD policy DROP
    assert "-A DOCKER -p tcp" not in nb.save()

    docker.network_create("n1")
    bridge = docker.bridge("n1")
    docker.run_httpd("web1", "n1", 8081)
    answer = neighbours.wait_http(nb.lab, 8081)
    live = nb.record("network n1, container web1 published on 8081")
    assert answer.status == 200 and answer.body.strip() == "web1", answer
    assert f"-A FORWARD -o {bridge} -j DOCKER" in live
    assert "--dport 8081 -j DNAT" in live
    assert neighbours.http_get(nb.lab, 8082).status is None  # nothing published there

    docker.rm("web1")
    gone = neighbours.http_get(nb.lab, 8081, timeout=1.5)
    assert gone.status is None, gone
    docker.network_rm("n1")
    assert bridge not in nb.record("container and network removed")


def test_close_leaves_nothing_behind_even_after_a_dockerd_crash() -> None:
    require_capable()
    need_programs(neighbours.F2B_PROGRAMS + neighbours.DOCKER_PROGRAMS)
    etc_docker = sorted(os.listdir("/etc/docker")) if os.path.isdir("/etc/docker") else None
    run_containerd = os.path.exists("/run/containerd")
    lab = create_lab(f"nbs{os.getpid()}"[:14], 241)
    workdir = str(lab.workdir)
    f2b = neighbours.Fail2ban(lab)
    docker = neighbours.Dockerd(lab)
    try:
        lab.srv_exec(["iptables-restore"], input="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
        lab.start_sshd()
        clients = neighbours.add_client_addresses(lab, count=2)
        f2b.start()
        f2b.ban(clients[0])
        docker.start()
        docker.network_create("n1")
        docker.run_httpd("web1", "n1", 8081)
        assert neighbours.wait_http(lab, 8081).status == 200
        started = docker.pids() + [p for p in (f2b.pid,) if p is not None]
        assert len(started) >= 5, started  # dockerd, containerd, shim, sh->httpd, fail2ban
        cgroups = [d for d in docker.cgroup_dirs if d.exists()]
        assert cgroups
        assert _mounts_mentioning(workdir)  # dockerd's private mounts exist...
        assert not [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if workdir in ln]  # ...but not in the root mount namespace
        # dockerd crashes: containerd, the shim and the container live on.
        assert docker.pid is not None
        os.kill(docker.pid, signal.SIGKILL)
        time.sleep(0.5)
        assert [p for p in docker.pids() if p != docker.pid]
    finally:
        docker.close()
        f2b.close()
        lab.close()
    assert not {lab.srv_ns, lab.cli_ns} & _netns_names()
    assert not [p for p in started if Path(f"/proc/{p}").exists()
                and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not _pids_mentioning(workdir)
    assert not _mounts_mentioning(workdir)
    assert not [d for d in cgroups if d.exists()]
    assert not os.path.exists(workdir)
    if etc_docker is not None:
        assert sorted(os.listdir("/etc/docker")) == etc_docker  # key.json went to the copy
    assert os.path.exists("/run/containerd") == run_containerd
