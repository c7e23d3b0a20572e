"""`fwsafe audit`'s findings, report and plan, without a sandbox: expected_open, unexpected
services, Docker's published ports read from real-looking iptables-save output, `sshd -T`,
the boot unit and a pending transaction; the JSON and the exit code; who sends from where."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fwsafe.audit import facts, plan
from fwsafe.audit.audit_report import AuditReport, ExposureChange
from fwsafe.audit.docker import docker_state
from fwsafe.audit.findings import (
    docker_findings,
    expected_ports,
    forward_findings,
    is_expected,
    listener_findings,
    parse_sshd_t,
    pending_finding,
    sshd_findings,
)
from fwsafe.audit.listeners import Listener
from fwsafe.audit.nat import nat_rules
from fwsafe.audit.plan import Source, make_plan
from fwsafe.audit.reach import CANDIDATE, CURRENT, Reach, ReachReport
from fwsafe.audit.space import PER_SHAPE, idle, named_space, representative
from fwsafe.check.host import ClientPath, Interface
from fwsafe.core.config import Config, load_config, parse_open_port
from fwsafe.errors import ConfigError

NODE = Listener("tcp", 4, "0.0.0.0", 5678, [11], "node", 1234)
SSHD = Listener("tcp", 4, "0.0.0.0", 22, [12], "sshd", 812)
LOCAL = Listener("tcp", 4, "127.0.0.1", 8000, [13], "python3", 99)
DNS = Listener("udp", 6, "::", 53, [14], "named", 700, v6only=False)
WORLD_V4 = [("world", 4), ("10.0.0.0/24", 4)]


# --------------------------------------------------------------------------------------------
# expected_open
# --------------------------------------------------------------------------------------------
def test_open_port_entries() -> None:
    assert str(parse_open_port("22/tcp")) == "22/tcp"
    assert str(parse_open_port(" 60000-61000/UDP ")) == "60000-61000/udp"
    mosh = parse_open_port("60000-61000/udp")
    assert mosh.matches("udp", 60001) and not mosh.matches("tcp", 60001)
    for bad in ("22", "22/icmp", "0/tcp", "70000/tcp", "90-80/tcp", "ssh/tcp", ""):
        with pytest.raises(ValueError):
            parse_open_port(bad)
    expected = expected_ports(["22/tcp", "443/tcp"])
    assert is_expected(expected, "tcp", 443) and not is_expected(expected, "udp", 443)


def test_expected_open_in_the_config(tmp_path: Path) -> None:
    assert Config().expected_open == ("22/tcp",)
    path = tmp_path / "fwsafe.toml"
    path.write_text('expected_open = ["22/tcp", "80/tcp", "443/TCP", "51820/udp"]\n')
    assert load_config(str(path), env={}).expected_open == ("22/tcp", "80/tcp", "443/tcp",
                                                            "51820/udp")
    path.write_text("expected_open = []\n")
    assert load_config(str(path), env={}).expected_open == ()
    path.write_text('expected_open = ["22/tcp", "http"]\n')
    with pytest.raises(ConfigError, match=r"expected_open\[1\]: 'http' is not PORT/PROTO"):
        load_config(str(path), env={})
    path.write_text('expected_open = "22/tcp"\n')
    with pytest.raises(ConfigError, match="expected_open: expected an array"):
        load_config(str(path), env={})
    path.write_text('expected_opn = ["22/tcp"]\n')
    with pytest.raises(ConfigError, match="did you mean 'expected_open'"):
        load_config(str(path), env={})


# --------------------------------------------------------------------------------------------
# listeners
# --------------------------------------------------------------------------------------------
def test_an_unexpected_service_the_world_reaches_is_high_and_an_exposure() -> None:
    reach = {NODE.key(): Reach(WORLD_V4), SSHD.key(): Reach(WORLD_V4)}
    (finding,) = listener_findings([NODE, SSHD, LOCAL], reach, expected_ports(["22/tcp"]))
    assert finding.severity == "high" and finding.exposure and finding.kind == "unexpected-service"
    assert "5678/tcp (node, PID 1234; listening on 0.0.0.0:5678)" in finding.what
    assert '"5678/tcp"' in finding.fix
    assert listener_findings([NODE], reach, expected_ports(["5000-6000/tcp"])) == []


def test_local_subnet_only_and_not_checked_are_low() -> None:
    reach = {NODE.key(): Reach([("10.0.0.0/24", 4)]), DNS.key(): Reach(problem="not checked: x")}
    found = listener_findings([NODE, DNS], reach, expected_ports([]))
    assert [(f.severity, f.kind, f.exposure) for f in found] == [
        ("low", "local-service", False), ("low", "not-checked", False)]
    assert "from 10.0.0.0/24 (not from the world)" in found[0].what
    assert "udp [::]:53 (named, PID 700): not checked: x" in found[1].what


def test_loopback_listeners_are_findings_only_when_a_translation_reaches_them() -> None:
    assert listener_findings([LOCAL], {LOCAL.key(): Reach()}, []) == []
    assert listener_findings([LOCAL], {LOCAL.key(): Reach(problem="not checked: x")}, []) == []
    # reached from the world: only a DNAT to 127.0.0.1 (route_localnet) does that
    (found,) = listener_findings([LOCAL], {LOCAL.key(): Reach(WORLD_V4)}, [])
    assert found.exposure and found.kind == "unexpected-service"


# --------------------------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------------------------
DOCKER_UFW = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -d 127.0.0.1/32 ! -i docker0 -p tcp -m tcp --dport 5432 -j DNAT --to-destination 172.17.0.3:5432
-A DOCKER -d 203.0.113.5/32 ! -i docker0 -p udp -m udp --dport 5353 -j DNAT --to-destination 172.17.0.4:53
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 443 -j DNAT --to-destination 172.17.0.5:443
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-USER - [0:0]
:ufw-before-forward - [0:0]
:ufw-before-input - [0:0]
-A INPUT -j ufw-before-input
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
-A FORWARD -j ufw-before-forward
-A DOCKER -d 172.17.0.2/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
"""


def test_docker_publishes_past_ufw() -> None:
    state = docker_state({4: DOCKER_UFW})
    assert state.ufw and state.before_ufw and state.docker_user_rules == 0
    assert [(p.label, p.address, p.target) for p in state.published] == [
        ("8080/tcp", None, "172.17.0.2:80"), ("5353/udp", "203.0.113.5", "172.17.0.4:53"),
        ("443/tcp", None, "172.17.0.5:443")]     # 127.0.0.1:5432 is this host's only
    found = docker_findings(state, expected_ports(["22/tcp", "443/tcp"]))
    assert [(f.severity, f.kind, f.exposure) for f in found] == [
        ("high", "docker-published", True)] * 2
    assert "Docker publishes 8080/tcp on every address (IPv4) to 172.17.0.2:80, past ufw" \
        in found[0].what
    assert "on 203.0.113.5" in found[1].what
    assert "-p 127.0.0.1:8080:" in found[0].fix and "DOCKER-USER" in found[0].fix


def test_docker_user_rules_make_it_medium() -> None:
    text = DOCKER_UFW.replace("-A DOCKER-USER -j RETURN\n",
                              "-A DOCKER-USER ! -s 10.0.0.0/8 -j DROP\n-A DOCKER-USER -j RETURN\n")
    (first, *_) = docker_findings(docker_state({4: text}), [])
    assert first.severity == "medium" and not first.exposure and "DOCKER-USER has 1 rule" \
        in first.what


def test_docker_without_ufw_and_without_docker() -> None:
    no_ufw = "\n".join(line for line in DOCKER_UFW.splitlines() if "ufw" not in line) + "\n"
    state = docker_state({4: no_ufw})
    assert not state.ufw and not state.before_ufw
    assert "past every INPUT rule" in docker_findings(state, [])[0].what
    ufw_first = DOCKER_UFW.replace("-A FORWARD -j ufw-before-forward\n", "").replace(
        "-A FORWARD -j DOCKER-USER\n", "-A FORWARD -j ufw-before-forward\n-A FORWARD -j DOCKER-USER\n")
    assert not docker_state({4: ufw_first}).before_ufw
    plain = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    assert docker_findings(docker_state({4: plain, 6: plain}), []) == []


# --------------------------------------------------------------------------------------------
# sshd
# --------------------------------------------------------------------------------------------
SSHD_T = """\
port 22
addressfamily any
usepam yes
permitrootlogin without-password
passwordauthentication yes
kbdinteractiveauthentication no
authenticationmethods any
"""


def test_sshd_password_logins() -> None:
    settings = parse_sshd_t(SSHD_T)
    assert settings["permitrootlogin"] == "without-password"
    (finding,) = sshd_findings(settings)
    assert (finding.severity, finding.kind, finding.exposure) == ("medium", "sshd-password", False)
    assert "PasswordAuthentication yes" in finding.what


def test_sshd_root_password_login_is_high() -> None:
    settings = parse_sshd_t(SSHD_T.replace("without-password", "yes"))
    (finding,) = sshd_findings(settings)
    assert (finding.severity, finding.kind) == ("high", "sshd-root-password")
    assert "prohibit-password" in finding.fix


def test_sshd_keys_only_is_fine() -> None:
    assert sshd_findings(parse_sshd_t(SSHD_T.replace("passwordauthentication yes",
                                                     "passwordauthentication no"))) == []
    # keyboard-interactive through PAM asks for the password too
    pam = SSHD_T.replace("passwordauthentication yes", "passwordauthentication no").replace(
        "kbdinteractiveauthentication no", "kbdinteractiveauthentication yes")
    assert [f.kind for f in sshd_findings(parse_sshd_t(pam))] == ["sshd-password"]
    # a key must come first: a password alone does not log in
    keyed = SSHD_T.replace("authenticationmethods any", "authenticationmethods publickey,password")
    assert sshd_findings(parse_sshd_t(keyed)) == []


# --------------------------------------------------------------------------------------------
# boot unit, pending transaction
# --------------------------------------------------------------------------------------------
def test_boot_unit_only_on_systemd_hosts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(facts, "systemd_is_init", lambda: False)
    assert facts.boot_unit_findings(tmp_path, True) == []
    monkeypatch.setattr(facts, "systemd_is_init", lambda: True)
    monkeypatch.setattr(facts.boothook, "is_installed", lambda root, state: False)
    (missing,) = facts.boot_unit_findings(tmp_path, True)
    assert (missing.severity, missing.kind) == ("medium", "no-boot-unit")
    assert "fwsafe install-boot-hook" in missing.fix
    assert facts.boot_unit_findings(tmp_path, False)[0].severity == "low"
    monkeypatch.setattr(facts.boothook, "is_installed", lambda root, state: True)
    assert facts.boot_unit_findings(tmp_path, True) == []


def test_pending_transaction(tmp_path: Path) -> None:
    assert facts.pending_findings(tmp_path / "none") == []
    pending = pending_finding("20260101-000000-abcd", "pending", 42.4)
    assert (pending.severity, pending.kind) == ("medium", "pending-transaction")
    assert "is pending, 42 s left" in pending.what and "fwsafe confirm" in pending.fix
    failed = pending_finding("x", "revert-failed", None)
    assert failed.severity == "high" and "fwsafe recover" in failed.fix


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _reach(current: list[tuple[Listener, Reach]],
           candidate: list[tuple[Listener, Reach]] | None = None) -> ReachReport:
    rounds = {CURRENT: {k.key(): v for k, v in current}}
    if candidate is not None:
        rounds[CANDIDATE] = {k.key(): v for k, v in candidate}
    sources = [Source("world", 4, "1.2.3.4", "eth0"),
               Source("10.0.0.0/24", 4, "10.0.0.254", "eth0", "10.0.0.0/24")]
    return ReachReport(sources=sources, rounds=rounds)


def test_report_json_and_exit_code() -> None:
    listeners = [SSHD, NODE, LOCAL, DNS]
    reach = _reach([(SSHD, Reach(WORLD_V4)), (NODE, Reach(WORLD_V4)), (LOCAL, Reach()),
                    (DNS, Reach([("world", 6)]))])
    expected = expected_ports(["22/tcp", "53/udp"])
    report = AuditReport(listeners, reach, CURRENT, expected)
    report.findings = listener_findings(listeners, reach.rounds[CURRENT], expected)
    data = report.to_json()
    assert data["exit_code"] == 1 and data["ok"] is False and data["rules"] == "live"
    by_port = {x["port"]: x for x in data["listeners"]}
    assert by_port[5678] == {
        "proto": "tcp", "family": "ipv4", "address": "0.0.0.0", "port": 5678, "process": "node",
        "pid": 1234, "exposed": True, "reachable_from": ["world", "10.0.0.0/24"],
        "expected": False, "not_checked": None, "world_over": ["ipv4"], "world": True,
        "uncertain": None}
    assert by_port[8000]["exposed"] is False and by_port[8000]["reachable_from"] == []
    assert by_port[53]["v6only"] is False and by_port[53]["world_over"] == ["ipv6"]
    assert [f["severity"] for f in data["findings"]] == ["high"]
    text = report.describe()
    assert "world (IPv6 only)" in text and "UNEXPECTED" in text and "(exit 1)" in text
    assert "- (loopback only)" in text

    calm = AuditReport([SSHD], _reach([(SSHD, Reach(WORLD_V4))]), CURRENT, expected)
    assert calm.exit_code == 0 and "nothing unexpected" in calm.describe()


def test_exposure_change_between_the_rounds() -> None:
    listeners = [SSHD, NODE, LOCAL, DNS]
    reach = _reach([(SSHD, Reach(WORLD_V4)), (NODE, Reach()),
                    (DNS, Reach([("world", 4), ("world", 6)]))],
                   [(SSHD, Reach(WORLD_V4)), (NODE, Reach(WORLD_V4)), (DNS, Reach([("world", 6)]))])
    change = ExposureChange.between(listeners, reach)
    assert [(x.port, pairs) for x, pairs in change.opens] == [(5678, WORLD_V4)]
    assert [(x.port, pairs) for x, pairs in change.closes] == [(53, [("world", 4)])]
    data = change.to_json()
    assert data["opens"][0]["from"] == [{"source": "world", "family": "ipv4"},
                                        {"source": "10.0.0.0/24", "family": "ipv4"}]
    text = change.describe()
    assert "opens   5678/tcp on 0.0.0.0:5678 (node, PID 1234): world over IPv4, 10.0.0.0/24" \
        in text
    assert "closes  53/udp on [::]:53 (named, PID 700): world over IPv4" in text
    same = ExposureChange.between([SSHD], _reach([(SSHD, Reach(WORLD_V4))],
                                                 [(SSHD, Reach(WORLD_V4))]))
    assert "no change" in same.describe()


# --------------------------------------------------------------------------------------------
# the plan: who sends from where, to which address
# --------------------------------------------------------------------------------------------
def _interfaces() -> dict[str, Interface]:
    return {
        "lo": Interface("lo", 65536, [("127.0.0.1", 8, "host"), ("::1", 128, "host"),
                                      ("198.51.100.53", 32, "global")]),
        "eth0": Interface("eth0", 1500, [("203.0.113.10", 24, "global"),
                                         ("2001:db8:1::10", 64, "global"),
                                         ("fe80::1", 64, "link")]),
        "docker0": Interface("docker0", 1500, [("172.17.0.1", 16, "global")]),
        "veth1": Interface("veth1", 1500, [("fe80::2", 64, "link")]),
    }


def test_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    def route(client: str, hint: str | None, interfaces: object,
              routes: object = None) -> ClientPath:
        return ClientPath(client, 6 if ":" in client else 4, dev="eth0")

    monkeypatch.setattr(plan, "client_path", route)
    monkeypatch.setattr(plan, "routes_to", lambda addresses: {})
    made = make_plan(_interfaces(), avoid="-A INPUT -s 1.2.3.4/32 -j DROP")
    assert [link.name for link in made.links] == ["docker0", "eth0"]   # veth1: link-local only
    names = [(s.name, s.address, s.link) for s in made.sources]
    assert names == [("world", "1.2.3.5", "eth0"), ("world", "2a00:f00d::4", "eth0"),
                     ("172.17.0.0/16", "172.17.255.254", "docker0"),
                     ("203.0.113.0/24", "203.0.113.254", "eth0"),
                     ("2001:db8:1::/64", "2001:db8:1:0:ffff:ffff:ffff:fffe", "eth0")]
    eth0 = made.links[1]
    assert "1.2.3.5" in eth0.clients and "198.51.100.53" in eth0.servers
    world4, world6, docker, subnet4, _ = made.sources
    # every address of this host, whichever interface the packet comes in by (issue 29)
    every4 = ["172.17.0.1", "203.0.113.10", "198.51.100.53"]
    wild = Listener("tcp", 6, "::", 80, v6only=False)
    assert made.destinations(wild, world4) == every4
    assert made.destinations(wild, world6) == ["2001:db8:1::10"]
    assert made.destinations(wild, docker) == every4
    assert set(eth0.servers) >= {*every4, "2001:db8:1::10"}
    private = Listener("tcp", 4, "172.17.0.1", 9000)
    assert made.destinations(private, world4) == ["172.17.0.1"]
    assert made.destinations(private, docker) == ["172.17.0.1"]
    anycast = Listener("udp", 4, "198.51.100.53", 53)
    assert made.destinations(anycast, world4) == ["198.51.100.53"]
    assert made.destinations(anycast, subnet4) == ["198.51.100.53"]
    assert made.unplaced(Listener("tcp", 4, "192.0.2.99", 80)) is not None
    assert made.unplaced(Listener("tcp", 6, "fe80::1", 80)) is not None
    assert made.unplaced(wild) is None


def test_no_route_to_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    def route(client: str, hint: str | None, interfaces: object) -> ClientPath:
        return ClientPath(client, 6 if ":" in client else 4, problem="no route")

    monkeypatch.setattr(plan, "client_path", route)
    made = make_plan(_interfaces())
    assert all(s.name != "world" for s in made.sources)
    assert any("no route to the world over IPv4" in n for n in made.notes)


def test_plan_tries_every_network_the_rules_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ban of 1.0.0.0/8 must not hide the world (issue 29 point 2): the world at large is
    an address outside it, and the banned network and an allow-listed office are tried too."""
    def route(client: str, hint: str | None, interfaces: object,
              routes: object = None) -> ClientPath:
        return ClientPath(client, 6 if ":" in client else 4, dev="eth0")

    monkeypatch.setattr(plan, "client_path", route)
    monkeypatch.setattr(plan, "routes_to", lambda addresses: {})
    rules = ("-A INPUT -s 1.0.0.0/8 -j DROP\n-A INPUT -s 192.0.2.0/24 -j ACCEPT\n"
             "-A INPUT -s 2001:db8:99::/48 -j ACCEPT\n")
    made = make_plan(_interfaces(), avoid=rules, space=named_space([rules]))
    names = {s.name: s.address for s in made.sources if s.family == 4 or s.name != "world"}
    assert names["world"] == "2.77.77.77"                    # outside 1.0.0.0/8
    assert names["world 1.0.0.0/8"] == "1.0.0.1"
    assert names["world 192.0.2.0/24"] == "192.0.2.1"
    assert names["world 2001:db8:99::/48"] == "2001:db8:99::1"
    assert all(s.link == "eth0" for s in made.sources if s.name.startswith("world"))


def test_named_space_is_bounded_by_rule_shape() -> None:
    """50,000 per-address bans of one shape are two cells, not 50,000; source ports named."""
    bans = "\n".join(f"-A INPUT -s 10.{i // 65536}.{i // 256 % 256}.{i % 256}/32 -j DROP"
                     for i in range(50000))
    space = named_space([bans, "-A INPUT -p tcp -m tcp --sport 80 -j ACCEPT\n"
                               "-A INPUT -p udp -m multiport --sports 53,67:68 -j ACCEPT\n"
                               "add rule inet t c udp sport { 123, 500 } accept\n"])
    assert len(space.networks[4]) == PER_SHAPE and space.collapsed == 50000 - PER_SHAPE
    assert space.sports == [80, 53, 67, 68, 123, 500]
    inner = named_space(["-A INPUT -s 10.0.0.0/8 -j DROP\n-A INPUT -s 10.0.0.0/24 -j ACCEPT"])
    outer = inner.networks[4][0]
    assert representative(outer, inner, set()) == "10.255.255.254"   # not in the /24


def test_idle_state_rewrites_rate_limits() -> None:
    """A SYN-flood chain answers the simultaneous probes as it answers one connection after
    idle (issue 29 point 3)."""
    assert idle("-A SYN -m limit --limit 1/sec --limit-burst 3 -j RETURN") \
        == "-A SYN -m limit --limit 10000/sec --limit-burst 10000 -j RETURN"
    assert idle("-A I -m hashlimit --hashlimit-above 1/sec --hashlimit-mode srcip "
                "--hashlimit-name x -j DROP") == (
        "-A I -m hashlimit --hashlimit-above 10000/sec --hashlimit-burst 10000 "
        "--hashlimit-mode srcip --hashlimit-name x -j DROP")
    assert idle("tcp flags syn limit rate over 5/second burst 3 packets drop") \
        == "tcp flags syn limit rate over 10000/second burst 10000 packets drop"
    assert idle("-A I -m connlimit --connlimit-above 3 -j REJECT") \
        == "-A I -m connlimit --connlimit-above 1000000 -j REJECT"
    assert idle("ct count over 4 drop") == "ct count over 1000000 drop"


def test_a_leftover_legacy_docker_chain_does_not_hide_published_ports() -> None:
    """iptables-nft's and iptables-legacy's saves are read apart: an empty legacy nat DOCKER
    chain must not replace the one with Docker's DNAT rules (issue 29 point 6)."""
    nft = ("*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n"
           "-A DOCKER ! -i br-1 -p tcp -m tcp --dport 8085 -j DNAT "
           "--to-destination 172.18.0.2:80\nCOMMIT\n")
    legacy = "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\nCOMMIT\n"
    state = docker_state([(4, nft), (4, legacy)])
    assert [(p.ports, p.target) for p in state.published] == [("8085", "172.18.0.2:80")]


def test_nat_rules_entries_and_forwards() -> None:
    """REDIRECT and DNAT to this host or loopback are entry ports (tried in the sandbox);
    DNAT elsewhere is a forward, open unless the rule limits who is forwarded."""
    save = ("*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n"
            "-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8001\n"
            "-A PREROUTING -p tcp -m tcp --dport 8080 -j DNAT --to-destination 127.0.0.1:8004\n"
            "-A PREROUTING -p udp -m udp --dport 5353 -j DNAT --to-destination 10.0.0.1:53\n"
            "-A PREROUTING -p tcp -m tcp --dport 8090 -j DNAT --to-destination 10.9.0.10:80\n"
            "-A PREROUTING -s 192.0.2.0/24 -p tcp -m tcp --dport 8091 -j DNAT "
            "--to-destination 10.9.0.11:80\n"
            "-A DOCKER -d 127.0.0.1/32 ! -i br-1 -p tcp -m tcp --dport 8086 -j DNAT "
            "--to-destination 172.18.0.3:80\nCOMMIT\n")
    entries, forwards = nat_rules([(4, save)], {"10.0.0.1"})
    assert [(e.proto, e.port) for e in entries] == [("tcp", 80), ("tcp", 8080), ("udp", 5353)]
    found = {(f.label, f.address, f.target_port, f.open, f.docker) for f in forwards}
    assert found == {("8090/tcp", "10.9.0.10", 80, True, False),
                     ("8091/tcp", "10.9.0.11", 80, False, False),
                     ("8086/tcp", "172.18.0.3", 80, False, True)}
    kinds = [(f.kind, f.exposure) for f in forward_findings(forwards, [])]
    assert sorted(kinds) == [("docker-loopback", False), ("forwarded-port", False),
                             ("forwarded-port", True)]


def test_the_running_sshd_configuration_is_read(tmp_path: Path) -> None:
    """sshd's facts come from the running daemon's own -f/-o (issue 29), not /etc/ssh: the
    daemons of this network namespace, not their sessions, nor another namespace's."""
    (tmp_path / "self" / "ns").mkdir(parents=True)
    ours = tmp_path / "self" / "ns" / "net"
    ours.write_text("")
    other = tmp_path / "other-net"
    other.write_text("")

    def process(pid: int, ppid: int, comm: str, argv: list[str], net: Path) -> None:
        d = tmp_path / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1")
        os.link(net, d / "ns" / "net")

    process(1, 0, "systemd", ["/sbin/init"], ours)
    process(10, 1, "sshd", ["/usr/sbin/sshd", "-D", "-f", "/srv/lab/sshd_config",
                            "-oPermitRootLogin=yes"], ours)
    process(11, 10, "sshd", ["sshd: root@pts/0"], ours)          # a session
    process(12, 1, "sshd", ["/usr/sbin/sshd", "-D"], other)      # another namespace's
    assert facts.running_sshd_options(tmp_path) == [
        ["-f", "/srv/lab/sshd_config", "-o", "PermitRootLogin=yes"]]


def test_nft_nat_rules_entries_and_forwards() -> None:
    listing = ("table ip nat {\n\tchain pre {\n\t\ttype nat hook prerouting priority dstnat; "
               "policy accept;\n\t\ttcp dport 80 redirect to :8001\n"
               "\t\ttcp dport 8080 dnat to 127.0.0.1:8004\n"
               "\t\tiifname \"eth1\" tcp dport 8091 dnat to 10.9.0.11:80\n"
               "\t\ttcp dport 8090 dnat to 10.9.0.10:80\n\t}\n}\n")
    entries, forwards = nat_rules([], set(), listing)
    assert [(e.proto, e.family, e.port) for e in entries] == [("tcp", 4, 80), ("tcp", 4, 8080)]
    assert [(f.label, f.address, f.target_port, f.open) for f in forwards] == [
        ("8091/tcp", "10.9.0.11", 80, False), ("8090/tcp", "10.9.0.10", 80, True)]


def test_nft_port_maps_are_entries_and_forwards() -> None:
    """`dnat to tcp dport map { ... }` and `redirect to :tcp dport map { ... }`, anonymous or
    named, as nft 1.0.6 lists them: every key is an entry port or a forward (issue 29)."""
    listing = ("table ip nat {\n\tmap fwd {\n\t\ttype inet_service : ipv4_addr . inet_service\n"
               "\t\telements = { 8082 : 127.0.0.1 . 8004,\n\t\t\t     8092 : 10.9.0.12 . 80 }\n"
               "\t}\n\tchain pre {\n\t\ttype nat hook prerouting priority dstnat; "
               "policy accept;\n"
               "\t\tmeta l4proto tcp redirect to :tcp dport map { 80 : 8001, 81-82 : 8002 }\n"
               "\t\tdnat ip to tcp dport map { 8080 : 127.0.0.1 . 8004, 8090 : 10.9.0.10 . 80 }\n"
               "\t\tdnat to udp dport map { 5353 : 10.0.0.1, 5354 : 10.9.0.11 }\n"
               "\t\tiifname \"eth1\" dnat ip to tcp dport map @fwd\n\t}\n}\n")
    entries, forwards = nat_rules([], {"10.0.0.1"}, listing)
    assert [(e.proto, e.family, e.port) for e in entries] == [
        ("tcp", 4, 80), ("tcp", 4, 81), ("tcp", 4, 8080), ("udp", 4, 5353), ("tcp", 4, 8082)]
    assert [(f.label, f.address, f.target_port, f.open) for f in forwards] == [
        ("8090/tcp", "10.9.0.10", 80, True), ("5354/udp", "10.9.0.11", None, True),
        ("8092/tcp", "10.9.0.12", 80, False)]


def test_idle_state_rewrites_byte_rate_limits() -> None:
    """Byte-rate limits (hashlimit's byte mode, nft `bytes/second`) answer the simultaneous
    probes as they answer one connection after idle, in a form iptables-restore and nft take
    (a byte burst must be a second's worth at least: hashlimit keeps its default)."""
    assert idle("-A I -p tcp -m hashlimit --hashlimit-above 1kb/s --hashlimit-burst 2kb "
                "--hashlimit-name b -j DROP") \
        == "-A I -p tcp -m hashlimit --hashlimit-above 100mb/s --hashlimit-name b -j DROP"
    assert idle("-A I -m hashlimit --hashlimit-upto 512b/s --hashlimit-name c -j ACCEPT") \
        == "-A I -m hashlimit --hashlimit-upto 100mb/s --hashlimit-name c -j ACCEPT"
    assert idle("meta l4proto tcp limit rate over 400 bytes/second burst 400 bytes drop") \
        == "meta l4proto tcp limit rate over 1000 mbytes/second burst 1000 mbytes drop"
    assert idle("limit rate 2 kbytes/minute accept") \
        == "limit rate 1000 mbytes/second burst 1000 mbytes accept"


def test_addresses_no_packet_comes_from_are_not_sources() -> None:
    """recent's `--mask 255.255.255.255`, class E and 0.0.0.0/8 name no sender: a probe from
    one never arrives (and its batch would wait the whole timeout)."""
    space = named_space(["-A INPUT -p tcp -m recent --rcheck --seconds 30 --name k "
                         "--mask 255.255.255.255 --rsource -j ACCEPT",
                         "-A INPUT -s 240.0.0.0/4 -j DROP", "-A INPUT -s 0.0.0.0/8 -j DROP",
                         "-A INPUT -s 1.0.0.0/8 -j DROP"])
    assert [str(n) for n in space.networks[4]] == ["1.0.0.0/8"]


def test_routes_asked_in_one_batch_are_the_routes_asked_one_by_one() -> None:
    """`routes_to` (one `ip -batch`) gives for each address what `ip route get` gives alone
    (read only: this host's own routes)."""
    from fwsafe.check.host import ip_json, routes_to

    wanted = ["127.0.0.1", "127.0.0.2", "::1"]
    found = routes_to(wanted)
    for address in wanted:
        assert found[address] == ip_json(["route", "get", address]), address
    assert routes_to([]) == {}
