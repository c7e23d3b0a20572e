"""Docker on a firewalld host survives a revert (issue 24): the real dockerd 20.10 and
firewalld 1.3 (nftables backend) together in the systemd lab.

With firewalld running, dockerd puts its bridges into firewalld's `docker` zone over D-Bus,
writes its own iptables chains (DOCKER, DOCKER-USER, DOCKER-ISOLATION-*, nat DOCKER) and
writes them again when firewalld says it reloaded. A revert through firewalld is a
`firewall-cmd --reload`; it must leave all of that working, and keep what Docker did during
the window (a network and a container started then, with their published port) and the
admin's own filter in DOCKER-USER (first in FORWARD).

The case: a container publishing 8080; `fwsafe firewall-cmd --remove-service=ssh` (a lockout),
not confirmed; during the window Docker creates a network and starts a second container
publishing 8081 on it. By the deadline + 5 s: a NEW ssh login gets in, both published ports
answer a NEW connection from the client, both bridges are in the `docker` zone, Docker's
chains and its DNAT rules are there, DOCKER-USER is still the first rule of FORWARD (a DROP
there still keeps a third container's port shut), and the new container reaches the client.

Beside them, on the same image, tests/lab/test_firewalld.py's panic mode case (`--panic-on`
reverted: panic mode off again), to keep the containers at once there at five.

Docker inside the nspawn container needs three things set up from here (the lab only): the
cgroup v1 controller mounts made writable (nspawn mounts them read-only) with a cgroup parent
named after the lab (removed at the end), runc without a new session keyring (nspawn's
seccomp filter refuses keyctl), and no userland proxy (a lost DNAT rule shows as a dead port).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.lab.test_firewalld import (
    LATE_LIMIT,
    LOCKED_OUT,
    TIMEOUT,
    case_panic,
    fwsafe_over_ssh,
    ipset_entries,
    new_ipset,
    outcome,
    start_firewalld,
)
from tests.lab.test_firewalld import wait_reverted as wait_reverted_firewalld
from tests.systemdlab import Image, SystemdLab, side_by_side

pytestmark = pytest.mark.lab

EXTRA = ("firewalld", "docker.io", "busybox-static")
# The revert with its proofs, done by the deadline + this (a NEW SSH login must get in by the
# deadline + 5 s, test_firewalld.LATE_LIMIT): a reload, reading firewalld's model three times
# and putting back what others changed, with two dockerd containers on two shared cores
WHOLE_LIMIT = 10.0
RUNC_WRAPPER = """#!/bin/sh
# runc without a new session keyring: nspawn's seccomp filter refuses keyctl (lab only)
n=$#; i=0
while [ "$i" -lt "$n" ]; do
    a=$1; shift; set -- "$@" "$a"
    [ "$a" = create ] && set -- "$@" --no-new-keyring
    i=$((i + 1))
done
exec /usr/bin/runc "$@"
"""


def cgroup_parent(lab: SystemdLab) -> str:
    return f"fwsafe-sdlab-docker-{lab.name}"


def remove_docker_cgroups(name: str) -> None:
    """Docker's cgroups of one lab (under the host's controllers: nspawn leaves the v1
    controllers at the host's root), deepest first; the lab is down, so they are empty."""
    found: list[str] = []
    for depth in range(1, 5):
        found += glob.glob("/sys/fs/cgroup/" + "*/" * depth + name)
    for top in found:
        for root, dirs, _files in sorted(os.walk(top, topdown=False), reverse=True):
            del dirs
            try:
                os.rmdir(root)
            except OSError:
                pass


def start_docker(lab: SystemdLab) -> None:
    leader = lab._leader()   # the container's PID 1 (the lab has no public accessor for it)
    mounts = lab.exec(["sh", "-c", "awk '$3 == \"cgroup\" {print $2}' /proc/self/mounts"])
    for point in mounts.stdout.split():
        if not point.endswith("/systemd"):
            subprocess.run(["nsenter", "-t", str(leader), "-m", "--", "mount", "-o",
                            "remount,bind,rw", point], check=True, timeout=30,
                           capture_output=True)
    lab.write("/usr/local/bin/runc-lab", RUNC_WRAPPER, mode="0755")
    lab.write("/etc/docker/daemon.json", json.dumps({
        "cgroup-parent": cgroup_parent(lab), "default-runtime": "lab", "userland-proxy": False,
        "runtimes": {"lab": {"path": "/usr/local/bin/runc-lab"}}}) + "\n")
    lab.exec(["systemctl", "restart", "docker"], timeout=120)
    lab.exec(["sh", "-c", "rm -rf /tmp/bb && mkdir -p /tmp/bb/bin && cp /bin/busybox /tmp/bb/bin/"
              " && tar -C /tmp/bb -c . | docker import - bb"], timeout=120)


def run_httpd(lab: SystemdLab, name: str, port: int, network: str = "bridge") -> None:
    lab.exec(["docker", "run", "-d", "--name", name, "--network", network, "-p", f"{port}:80",
              "bb", "/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/etc"], timeout=120)


GET = ("import http.client, sys\n"
       "c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=2,\n"
       "                               source_address=(sys.argv[4], 0) if sys.argv[4:] else None)\n"
       "c.request('GET', sys.argv[3]); r = c.getresponse(); assert r.status == 200, r.status\n"
       "print(r.read().decode().strip())")


def other_source(lab: SystemdLab) -> str:
    """The client's second address (the first, lab.cli_ip4, is the one the admin blocks)."""
    return lab.cli_ip4.rpartition(".")[0] + ".3"


def http_get(lab: SystemdLab, port: int, path: str = "/hostname",
             source: str | None = None) -> str | None:
    """A NEW connection from the client (from `source`, else its first address) to a
    published port: the container's hostname."""
    result = subprocess.run(["ip", "netns", "exec", lab.cli_ns, "python3", "-c", GET, lab.ip4,
                             str(port), path, *([source] if source else [])],
                            capture_output=True, text=True, timeout=10)
    return result.stdout.strip() if result.returncode == 0 else None


def wait_http(lab: SystemdLab, port: int, limit: float, path: str = "/hostname") -> str | None:
    end = time.monotonic() + limit
    while True:
        got = http_get(lab, port, path)
        if got or time.monotonic() > end:
            return got
        time.sleep(0.3)


LISTEN = ("import socket, sys\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('', int(sys.argv[1]))); s.listen(); s.settimeout(30)\n"
          "c, peer = s.accept(); c.sendall(b'hello from the client\\n'); c.close()\n"
          "print(peer[0])")


def reaches_out(lab: SystemdLab, container: str, port: int = 9090) -> str:
    """The container opens a connection to the client (masquerade, FORWARD out): what the
    client said, or the error."""
    listener = subprocess.Popen(["ip", "netns", "exec", lab.cli_ns, "python3", "-c", LISTEN,
                                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        time.sleep(0.5)
        got = lab.exec(["docker", "exec", container, "/bin/busybox", "nc", "-w", "3",
                        lab.cli_ip4, str(port)], check=False, timeout=30)
        return got.stdout.strip() or f"exit {got.returncode}: {got.stderr.strip()}"
    finally:
        try:
            listener.wait(timeout=5)
        except subprocess.TimeoutExpired:
            listener.kill()
            listener.wait()


def docker_zone(lab: SystemdLab) -> list[str]:
    return sorted(lab.exec(["firewall-cmd", "--zone=docker", "--list-interfaces"]).stdout.split())


def iptables(lab: SystemdLab) -> str:
    return lab.exec(["iptables-save"]).stdout


def prepare(lab: SystemdLab, ipset: str | None = None) -> dict[str, str]:
    """firewalld and Docker running, web1 publishing 8080, web3 publishing 8082 behind the
    admin's DROP in DOCKER-USER for the client's first address (its second gets in).
    `ipset`: a permanent ipset made first with this runtime entry (its reload flushes the
    iptables tables: before Docker and the admin's rule)."""
    start_firewalld(lab)
    if ipset is not None:
        new_ipset(lab, ipset)
    start_docker(lab)
    run_httpd(lab, "web1", 8080)
    first = wait_http(lab, 8080, 15)
    assert first, "the published port does not answer before the change"
    assert "docker0" in docker_zone(lab)
    run_httpd(lab, "web3", 8082)
    web3 = lab.exec(["docker", "inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web3"]
                    ).stdout.strip()
    subprocess.run(["ip", "-n", lab.cli_ns, "addr", "add", f"{other_source(lab)}/24", "dev",
                    "eth0"], check=True, timeout=15, capture_output=True)
    lab.exec(["iptables", "-I", "DOCKER-USER", "-s", lab.cli_ip4, "-d", web3, "-j", "DROP"])
    assert http_get(lab, 8082) is None, "DOCKER-USER does not filter before the change"
    assert wait_http_from(lab, 8082, other_source(lab), 10), "web3 shut for every source"
    return {"web1": first}


def wait_http_from(lab: SystemdLab, port: int, source: str, limit: float) -> str | None:
    end = time.monotonic() + limit
    while True:
        got = http_get(lab, port, source=source)
        if got or time.monotonic() > end:
            return got
        time.sleep(0.3)


def forward(lab: SystemdLab) -> list[str]:
    """FORWARD's rules (its policy line left out)."""
    return lab.exec(["iptables", "-S", "FORWARD"]).stdout.splitlines()[1:]


def docker_in_the_window(lab: SystemdLab, info: dict[str, Any]) -> str:
    """Docker's own changes during the window: a network (its bridge joins the docker zone)
    and a container publishing 8081 on it. The bridge's name."""
    lab.exec(["docker", "network", "create", "win"], timeout=60)
    bridge = "br-" + lab.exec(["docker", "network", "inspect", "-f", "{{.Id}}", "win"]
                              ).stdout.strip()[:12]
    run_httpd(lab, "web2", 8081, network="win")
    assert wait_http(lab, 8081, 15), "the window's published port does not answer"
    assert time.time() < float(info["deadline"]), "the window closed before Docker was done"
    return bridge


def after_revert(lab: SystemdLab, bridge: str) -> dict[str, Any]:
    """What a user sees once the revert is done."""
    got: dict[str, Any] = {"ssh": lab.new_connection_ok(timeout=2)}
    # Docker writes its chains again when firewalld reloads: give it a moment, not more
    got["answers"] = {port: wait_http(lab, port, 10) for port in (8080, 8081)}
    got["saved"] = iptables(lab)
    got["zone"] = docker_zone(lab)
    got["bridge"] = bridge
    got["out"] = reaches_out(lab, "web2")
    got["filtered"] = http_get(lab, 8082)
    got["unfiltered"] = wait_http_from(lab, 8082, other_source(lab), 5)
    got["forward"] = forward(lab)
    got["state"] = lab.exec(["firewall-cmd", "--state"], check=False).stdout.strip()
    got["services"] = lab.exec(["firewall-cmd", "--list-services"]).stdout.split()
    return got


def case_runtime(lab: SystemdLab) -> dict[str, Any]:
    """A runtime change (the revert needs no reload)."""
    got = prepare(lab)
    info = fwsafe_over_ssh(lab, ["fwsafe", "firewall-cmd", "--detach", "--json", "--timeout",
                                 str(TIMEOUT), "--remove-service=ssh"], LOCKED_OUT)
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    bridge = docker_in_the_window(lab, info)
    wait_reverted_firewalld(lab, info, "runtime --remove-service=ssh with Docker busy",
                            WHOLE_LIMIT)
    return {**got, **after_revert(lab, bridge)}


RICH = 'rule family="ipv4" source address="192.0.2.0/24" reject'


def case_permanent(lab: SystemdLab) -> dict[str, Any]:
    """A permanent change and reload (the revert reloads too), while Docker and a second
    firewall-cmd writer (a fail2ban-like rich rule, a port opened for a service, an ipset
    entry) change
    firewalld's runtime model in the window."""
    got = prepare(lab, ipset="192.0.2.7")
    lab.exec(["systemd-run", "--unit=web7777", "--working-directory=/etc", "python3", "-m",
              "http.server", "7777"])
    script = "firewall-cmd --permanent --remove-service=ssh && firewall-cmd --reload"
    info = fwsafe_over_ssh(lab, ["fwsafe", "apply", "--detach", "--json", "--timeout",
                                 str(TIMEOUT), "--", "sh", "-c", script], LOCKED_OUT)
    assert not lab.new_connection_ok(timeout=1), "the lockout is not live"
    bridge = docker_in_the_window(lab, info)
    # what the change's own reload did (firewalld flushed the iptables tables, Docker wrote
    # its chains again): the admin's DROP gone, DOCKER-USER no longer first
    got["window"] = {"forward": forward(lab), "filtered": http_get(lab, 8082)}
    lab.exec(["firewall-cmd", f"--add-rich-rule={RICH}"])
    lab.exec(["firewall-cmd", "--add-port=7777/tcp"])
    lab.exec(["firewall-cmd", "--ipset=fwsafe_test", "--add-entry=192.0.2.8"])
    assert wait_http(lab, 7777, 10, "/hostname"), "the other writer's port is not open"
    wait_reverted_firewalld(lab, info, "--permanent --remove-service=ssh + --reload, "
                                       "Docker and another writer busy", WHOLE_LIMIT)
    got.update(after_revert(lab, bridge))
    got["rich"] = lab.exec(["firewall-cmd", "--list-rich-rules"]).stdout.splitlines()
    got["7777"] = http_get(lab, 7777, "/hostname")
    got["ipset"] = ipset_entries(lab)
    return got


def case_panic_alone(lab: SystemdLab) -> dict[str, Any]:
    start_firewalld(lab)
    return case_panic(lab)


CASES: dict[str, Callable[[SystemdLab], dict[str, Any]]] = {
    "runtime": case_runtime, "permanent": case_permanent,
    # firewalld's panic mode (tests/lab/test_firewalld.py's case, Docker not started): run
    # here, beside these two, to keep the containers at once there at five
    "panic": case_panic_alone}


def close(lab: SystemdLab) -> None:
    name = cgroup_parent(lab)
    lab.close()
    remove_docker_cgroups(name)


@pytest.fixture(scope="module")
def outcomes() -> Iterator[dict[str, Any]]:
    """The cases at the same time, each in a container of its own."""
    yield from side_by_side(Image.build(extra=EXTRA), CASES, close=close)


def admin_filter_holds(got: dict[str, Any]) -> None:
    """DOCKER-USER first in FORWARD, the admin's DROP in it: web3 shut for the blocked
    address, open for the other."""
    assert got["forward"][:1] == ["-A FORWARD -j DOCKER-USER"], got["forward"]
    assert got["filtered"] is None, ("the admin's DOCKER-USER rule no longer filters",
                                     got["forward"], got["saved"])
    assert got["unfiltered"], ("web3 does not answer the address the admin did not block",
                               got["saved"])


def docker_works(got: dict[str, Any]) -> None:
    saved = got["saved"]
    assert got["ssh"], "a NEW ssh login does not get in"
    assert got["state"] == "running" and "ssh" in got["services"], got
    assert got["answers"][8080] == got["web1"], (got["answers"], saved)
    assert got["answers"][8081], ("the port published during the window is dead", saved)
    assert "docker0" in got["zone"] and got["bridge"] in got["zone"], got["zone"]
    for line in (":DOCKER-USER", "-A FORWARD -j DOCKER-USER", ":DOCKER-ISOLATION-STAGE-1",
                 "--dport 8080 -j DNAT", "--dport 8081 -j DNAT"):
        assert line in saved, (line, saved)
    for bridge in ("docker0", got["bridge"]):   # the networks stay apart (Docker's isolation)
        for line in (f"-A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} "
                     "-j DOCKER-ISOLATION-STAGE-2",
                     f"-A DOCKER-ISOLATION-STAGE-2 -o {bridge} -j DROP"):
            assert line in saved, (line, saved)
    assert got["out"] == "hello from the client", got["out"]


def test_docker_survives_the_revert_of_a_runtime_change_untouched(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "runtime")
    docker_works(got)
    # no reload: Docker's chains are as it left them, DOCKER-USER first in FORWARD, so the
    # admin's filter still works
    admin_filter_holds(got)


def test_docker_and_another_writer_survive_the_revert_of_a_permanent_change_and_reload(
        outcomes: dict[str, Any]) -> None:
    got = outcome(outcomes, "permanent")
    window = got["window"]
    print(f"\n[firewalld+docker] after the change's reload: FORWARD {window['forward'][:2]}, "
          f"the admin's DOCKER-USER drop {'holds' if window['filtered'] is None else 'LOST'}; "
          f"after the revert: FORWARD {got['forward'][:2]}, the drop "
          f"{'holds' if got['filtered'] is None else 'LOST'}")
    docker_works(got)
    # firewalld's reloads (the change's and the revert's) flushed the iptables tables and
    # Docker wrote its chains again: the revert puts the admin's DROP and DOCKER-USER's place
    # back (the iptables layer's three-way merge, read once Docker is done)
    admin_filter_holds(got)
    assert RICH in got["rich"], got["rich"]
    assert got["7777"], "the port the other writer opened in the window is closed again"
    # the ipset's runtime entry from before (lost with the reloads) and the other writer's
    assert got["ipset"] == ["192.0.2.7", "192.0.2.8"], got["ipset"]


def test_panic_mode_is_turned_off_again(outcomes: dict[str, Any]) -> None:
    """`--panic-on` drops every packet and firewalld keeps it through a reload: the revert
    turns it off (a NEW SSH login gets in by the deadline + 5 s)."""
    got = outcome(outcomes, "panic")
    assert got["late"] <= LATE_LIMIT, got
    assert got["panic"] == "no", got
    assert got["model"] and got["kernel"], got
