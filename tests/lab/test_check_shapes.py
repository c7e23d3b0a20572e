"""`fwsafe check` on the shapes real hosts have (issue 27): the sandbox leaves out what none of
its packets can meet (by address, by the chains they reach, through address translations),
and the rule that changes the verdict is still loaded and named; reality agrees."""

from __future__ import annotations

import json
import re

import pytest

from tests.bins import FWSAFE
from tests.conftest import FwLab
from tests.lab.test_check import HEAD, applied_new_connection_ok, check, verdict

pytestmark = pytest.mark.lab

PORTS = (25, 80, 443, 3306, 5432, 6379, 8080)


def _blocklist(count: int) -> list[str]:
    """fail2ban / abuse-list style: sources, ports and targets vary per rule."""
    return [f"-A INPUT -s 198.18.{i // 250}.{i % 250 + 1}/32 -p tcp -m tcp "
            f"--dport {PORTS[i % len(PORTS)]} -j "
            + ("DROP" if i % 3 else "REJECT --reject-with icmp-port-unreachable")
            for i in range(count)]


def test_blocklist_with_varied_ports_culprit_found_and_most_left_out(fwlab: FwLab) -> None:
    client = fwlab.lab.cli_ip4
    rules = _blocklist(2000)
    rules.insert(1000, f"-A INPUT -s {client}/32 -p tcp -m tcp --dport 22 -j REJECT "
                       "--reject-with tcp-reset")
    lines = [*HEAD.format(inp="ACCEPT").splitlines(),
             "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", *rules,
             "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT", "COMMIT"]
    path = fwlab.write("blocklist.rules", "\n".join(lines) + "\n")
    culprit_line = lines.index(rules[1000]) + 1
    code, data, stderr = check(fwlab, str(path), "--client", client, "--no-exposure")
    assert code == 1, stderr
    assert re.search(rf"blocklist\.rules:{culprit_line}: `-A INPUT -s {re.escape(client)}/32",
                     verdict(data, "new", client)["culprit"])
    assert data["sandbox"]["rules_left_out"] >= 1990, data["sandbox"]
    assert applied_new_connection_ok(fwlab, path) is False


def _kube(services: int, server: str | None) -> str:
    """kube-proxy's nat chains (KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, three endpoints,
    probability matches, DNAT); with `server`, one service on the host's own address and port
    22, so the client's SSH is translated to a pod that does not exist."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
             "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"]
    entries = []
    names = [(f"S{s:05d}", f"10.96.{s // 250}.{s % 250 + 1}", 80) for s in range(services)]
    if server is not None:
        names.insert(services // 2, ("SSH00", server, 22))
    for n, (name, address, port) in enumerate(names):
        chains.append(f":KUBE-SVC-{name} - [0:0]")
        entries.append(f"-A KUBE-SERVICES -d {address}/32 -p tcp -m comment --comment "
                       f"\"ns/{name}\" -m tcp --dport {port} -j KUBE-SVC-{name}")
        for e in range(3):
            pod = f"10.244.{(3 * n + e) // 250}.{(3 * n + e) % 250 + 1}"
            sep = f"KUBE-SEP-{name}{e}"
            chains.append(f":{sep} - [0:0]")
            chance = ("-m statistic --mode random --probability 0.33333333349 " if e == 0 else
                      "-m statistic --mode random --probability 0.50000000000 " if e == 1 else "")
            rules.append(f"-A KUBE-SVC-{name} -m comment --comment \"ns/{name}\" {chance}"
                         f"-j {sep}")
            rules.append(f"-A {sep} -s {pod}/32 -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {pod}:2222")
    filt = HEAD.format(inp="ACCEPT") + (
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", *chains, *rules, *entries, "COMMIT"]
    return filt + "\n".join(nat) + "\n"


def test_kube_proxy_services_left_out_and_no_false_lockout(fwlab: FwLab) -> None:
    """Address translations no longer switch the pruning off: services the management path
    never reaches are left out, and the path stays open, as in reality."""
    client = fwlab.lab.cli_ip4
    path = fwlab.write("kube.rules", _kube(600, None))
    code, data, stderr = check(fwlab, str(path), "--client", client, "--no-exposure")
    assert code == 0, stderr
    assert verdict(data, "new", client)["ok"] is True
    assert data["sandbox"]["rules_left_out"] >= 5000, data["sandbox"]
    assert applied_new_connection_ok(fwlab, path) is True


def test_kube_proxy_service_on_the_ssh_path_is_kept_and_predicts_the_lockout(
        fwlab: FwLab) -> None:
    """A service on the host's own address and port 22, among 600 others: its chains and DNAT
    are reached by the client's packets, so they are loaded and the lockout is predicted."""
    client = fwlab.lab.cli_ip4
    path = fwlab.write("kube-ssh.rules", _kube(600, fwlab.lab.srv_ip4))
    code, data, stderr = check(fwlab, str(path), "--client", client, "--no-exposure")
    assert code == 1, stderr
    assert verdict(data, "new", client)["ok"] is False
    assert data["sandbox"]["rules_left_out"] >= 5000, data["sandbox"]
    assert applied_new_connection_ok(fwlab, path) is False


def test_missing_chain_jump_in_an_unreached_chain_is_refused(fwlab: FwLab) -> None:
    """Rules of chains no sandbox packet reaches are left out, one of each shape kept; user
    chain names are not part of the shape, but a jump to a chain that is not declared is:
    the kernel still refuses it (exit 3), as the real load would."""
    chains = [f":C{i} - [0:0]" for i in range(300)]
    rules = [f"-A INPUT -s 198.18.1.{i % 250 + 1}/32 -j C{i}" for i in range(300)]
    rules += [f"-A C{i} -p tcp -j ACCEPT" for i in range(300)]
    rules.append("-A C7 -p udp -j NOSUCHCHAIN")
    text = HEAD.format(inp="ACCEPT") + "\n".join(chains + rules) + "\nCOMMIT\n"
    path = fwlab.write("unreached.rules", text)
    code, _, stderr = check(fwlab, str(path), "--client", fwlab.lab.cli_ip4, "--no-exposure")
    assert code == 3, stderr
    assert "NOSUCHCHAIN" in stderr


def _docker(networks: int, drop_on: str | None = None, publish_ssh: bool = False) -> str:
    """Docker's chains for `networks` user networks (a bridge each, a published port each:
    FORWARD, DOCKER-ISOLATION-STAGE-1/2, nat DOCKER DNAT and MASQUERADE); `drop_on`: one
    more rule that drops SSH arriving on that interface (the management path's own);
    `publish_ssh`: port 22 published too (to a container that does not exist)."""
    filt = [":DOCKER - [0:0]", ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
            ":DOCKER-ISOLATION-STAGE-2 - [0:0]", ":DOCKER-USER - [0:0]",
            "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"]
    nat = [":DOCKER - [0:0]", "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"]
    for k in range(networks):
        br, net = f"br-{k:012x}", f"172.{20 + k // 250}.{k % 250}"
        filt += [f"-A FORWARD -o {br} -j DOCKER", f"-A FORWARD -i {br} ! -o {br} -j ACCEPT",
                 f"-A DOCKER -d {net}.2/32 ! -i {br} -o {br} -p tcp -m tcp --dport 80 -j ACCEPT",
                 f"-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2",
                 f"-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP",
                 f"-A INPUT -i {br} -p tcp -m tcp --dport 22 -j DROP"]
        nat += [f"-A POSTROUTING -s {net}.0/24 ! -o {br} -j MASQUERADE",
                f"-A DOCKER -i {br} -j RETURN",
                f"-A DOCKER ! -i {br} -p tcp -m tcp --dport {10000 + k} -j DNAT "
                f"--to-destination {net}.2:80"]
    if drop_on is not None:
        filt.append(f"-A INPUT -i {drop_on} -p tcp -m tcp --dport 22 -j DROP")
    if publish_ssh:
        nat.append("-A DOCKER ! -i br-ssh -p tcp -m tcp --dport 22 -j DNAT "
                   "--to-destination 172.31.0.2:22")
    filt += ["-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]
    return (HEAD.format(inp="ACCEPT") + "\n".join(filt) + "\nCOMMIT\n*nat\n"
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            ":POSTROUTING ACCEPT [0:0]\n" + "\n".join(nat) + "\nCOMMIT\n")


def test_docker_bridges_left_out_by_interface_and_the_management_interface_kept(
        fwlab: FwLab) -> None:
    """Rules on Docker's bridges (`-i/-o br-...`) meet no packet of the sandbox, whose
    interfaces are the host's management ones: left out, one of each shape loaded; a drop on
    the management interface itself is loaded, named, and reality agrees."""
    client = fwlab.lab.cli_ip4
    path = fwlab.write("docker.rules", _docker(300))
    code, data, stderr = check(fwlab, str(path), "--client", client, "--no-exposure")
    assert code == 0, stderr
    assert verdict(data, "new", client)["ok"] is True
    # by interface, and the published ports' nat rules by port (the check opens port 22
    # only), with the MASQUERADE of their networks: one of each shape loaded
    assert data["sandbox"]["rules_left_out"] >= 2600, data["sandbox"]
    assert not [n for n in data["not_checked"] if "! -i br-" in n or "! -o br-" in n]
    assert applied_new_connection_ok(fwlab, path) is True

    path = fwlab.write("docker-ssh.rules", _docker(300, publish_ssh=True))
    code, data, stderr = check(fwlab, str(path), "--client", client, "--no-exposure")
    assert code == 1, stderr   # SSH is translated to a container that is not there
    assert any("translations" in why for why in data["sandbox"]["pruning"]), data["sandbox"]
    assert applied_new_connection_ok(fwlab, path) is False

    dev = fwlab.lab.srv_exec(["ip", "-j", "route", "get", client]).stdout
    iface = json.loads(dev)[0]["dev"]
    path = fwlab.write("docker-drop.rules", _docker(300, drop_on=iface))
    code, data, stderr = check(fwlab, str(path), "--client", client, "--no-exposure")
    assert code == 1, stderr
    assert f"-i {iface} " in verdict(data, "new", client)["culprit"]
    assert applied_new_connection_ok(fwlab, path) is False
    shown = fwlab.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", "-v", str(path),
                                "--client", client, "--no-exposure"], check=False)
    assert re.search(r"^Sandbox: [\d,]+ rules left out", shown.stdout, re.M), shown.stdout
