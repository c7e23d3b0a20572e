"""`fwsafe audit` in the namespace lab: real listeners in the server namespace (http.server on
0.0.0.0, on 127.0.0.1, dual-stack on [::], IPv6-only on the lab's IPv6 address, a UDP one),
the audit run there, and every verdict about the world compared with a real connection from a
world address in the client namespace. Exposure follows the rules (given as RULES, and applied
for real), loopback is never exposed, unexpected services make exit 1, expected ones exit 0;
`fwsafe check` shows what a change opens and closes; Docker's published ports are found."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bins import FWSAFE
from tests.conftest import FwLab, NeighbourLab, our_namespaces
from tests.rulesets import BASELINE_V4, BASELINE_V6

pytestmark = pytest.mark.lab

# A world address of our own in the client namespace: the server answers it through its default
# route (via the client), as it would answer anyone on the internet.
WORLD4, WORLD6 = "198.51.100.77", "2001:db8:77::77"
HTTP, LOCAL_HTTP, DUAL, V6ONLY, UDP = 8080, 8081, 8082, 8083, 5353

UDP_SERVER = """\
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = sock.recvfrom(512)
    sock.sendto(data, peer)
"""
PROBE = """\
import socket, sys
proto, src, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
sock = socket.socket(family, kind)
sock.settimeout(1.5)
sock.bind((src, 0))
try:
    if proto == "tcp":
        sock.connect((dst, port))
    else:
        sock.sendto(b"ping", (dst, port))
        sock.recvfrom(512)
except OSError as exc:
    print(exc)
    sys.exit(1)
"""


def with_rule(save: str, rule: str) -> str:
    """`save` with `rule` appended to INPUT (before COMMIT of the filter table)."""
    return save.replace("COMMIT\n", f"{rule}\nCOMMIT\n", 1)


class AuditLab:
    """The lab's server with listeners, a default route (via the client) and world addresses."""

    def __init__(self, fw: FwLab) -> None:
        self.fw = fw
        lab = fw.lab
        self.lab = lab
        self.subnet4 = re.sub(r"\.\d+$", ".0/24", lab.srv_ip4)
        self.subnet6 = lab.srv_ip6.rsplit("::", 1)[0] + "::/64"
        lab.srv_exec(["ip", "route", "add", "default", "via", lab.cli_ip4])
        lab.srv_exec(["ip", "-6", "route", "add", "default", "via", lab.cli_ip6])
        lab.cli_exec(["ip", "addr", "add", f"{WORLD4}/32", "dev", "eth0"])
        lab.cli_exec(["ip", "addr", "add", f"{WORLD6}/128", "dev", "eth0", "nodad"])
        self.config = fw.write("audit.toml", 'expected_open = ["22/tcp"]\n')
        self.pids: dict[int, int] = {}

    def start(self, port: int, argv: list[str], proto: str = "tcp") -> None:
        proc = self.lab.srv_popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pids[port] = proc.pid
        end = time.monotonic() + 15
        flag = "-Hlnt" if proto == "tcp" else "-Hlnu"
        while not re.search(rf":{port}\s", self.lab.srv_exec(["ss", flag]).stdout):
            assert proc.poll() is None, f"the listener on {port}/{proto} exited"
            assert time.monotonic() < end, f"nothing listens on {port}/{proto}"
            time.sleep(0.1)

    def start_all(self) -> None:
        http = ["python3", "-m", "http.server", "--bind"]
        self.start(HTTP, [*http, "0.0.0.0", str(HTTP)])
        self.start(LOCAL_HTTP, [*http, "127.0.0.1", str(LOCAL_HTTP)])
        self.start(DUAL, [*http, "::", str(DUAL)])                 # dual-stack (IPV6_V6ONLY 0)
        self.start(V6ONLY, [*http, self.lab.srv_ip6, str(V6ONLY)])
        self.start(UDP, ["python3", "-c", UDP_SERVER, str(UDP)], proto="udp")

    def audit(self, *args: str, config: Path | None = None) -> tuple[int, dict[str, Any], str]:
        """`fwsafe audit --json ARGS` in the server namespace; it changes nothing."""
        before = self.lab.ruleset()
        result = self.fw.fw("audit", "--json", "--config", str(config or self.config), *args,
                            timeout=120)
        assert self.lab.ruleset() == before, "fwsafe audit changed the live ruleset"
        assert not our_namespaces(), "the sandbox namespaces were left behind"
        assert result.stdout.strip(), result.stderr
        return result.returncode, json.loads(result.stdout), result.stderr

    def world_reaches(self, proto: str, port: int, *, ipv6: bool = False) -> bool:
        """Reality: does a connection (TCP) or an echo (UDP) from a world address get through?"""
        src, dst = (WORLD6, self.lab.srv_ip6) if ipv6 else (WORLD4, self.lab.srv_ip4)
        result = self.lab.cli_exec(["python3", "-c", PROBE, proto, src, dst, str(port)],
                                   check=False, timeout=30)
        return result.returncode == 0


def listener(data: dict[str, Any], proto: str, port: int, address: str | None = None
             ) -> dict[str, Any]:
    for item in data["listeners"]:
        if item["proto"] == proto and item["port"] == port \
                and (address is None or item["address"] == address):
            found: dict[str, Any] = item
            return found
    raise AssertionError(f"no {proto} listener on {port}: {data['listeners']}")


def kinds(data: dict[str, Any]) -> list[str]:
    return [f["kind"] for f in data["findings"]]


@pytest.fixture
def audit_lab(fwlab: FwLab) -> AuditLab:
    return AuditLab(fwlab)


# --------------------------------------------------------------------------------------------
# the live rules
# --------------------------------------------------------------------------------------------
def test_what_the_world_reaches_under_the_live_rules(audit_lab: AuditLab) -> None:
    al = audit_lab
    al.start_all()
    code, data, stderr = al.audit()
    assert code == 1, stderr
    world = ["world", al.subnet4]

    web = listener(data, "tcp", HTTP)
    assert (web["address"], web["family"], web["exposed"]) == ("0.0.0.0", "ipv4", True)
    assert web["reachable_from"] == world and web["expected"] is False
    assert web["process"] == "python3" and web["pid"] == al.pids[HTTP]
    assert al.world_reaches("tcp", HTTP)

    local = listener(data, "tcp", LOCAL_HTTP)
    assert (local["address"], local["exposed"], local["reachable_from"]) == ("127.0.0.1", False, [])
    assert not al.world_reaches("tcp", LOCAL_HTTP)

    dual = listener(data, "tcp", DUAL)
    assert (dual["address"], dual["family"], dual["v6only"]) == ("::", "ipv6", False)
    assert dual["reachable_from"] == ["world", al.subnet4, al.subnet6]
    assert dual["world_over"] == ["ipv4", "ipv6"]
    assert al.world_reaches("tcp", DUAL) and al.world_reaches("tcp", DUAL, ipv6=True)

    v6 = listener(data, "tcp", V6ONLY)
    assert (v6["address"], v6["family"]) == (al.lab.srv_ip6, "ipv6")
    assert v6["reachable_from"] == ["world", al.subnet6] and v6["world_over"] == ["ipv6"]
    assert al.world_reaches("tcp", V6ONLY, ipv6=True)

    udp = listener(data, "udp", UDP)
    assert (udp["address"], udp["exposed"], udp["reachable_from"]) == ("0.0.0.0", True, world)
    assert al.world_reaches("udp", UDP)

    sshd = listener(data, "tcp", 22, al.lab.srv_ip4)
    assert sshd["expected"] is True and sshd["exposed"] is True and sshd["process"] == "sshd"

    unexpected = [f for f in data["findings"] if f["kind"] == "unexpected-service"]
    assert {re.match(r"(\d+/\w+)", f["what"]).group(1) for f in unexpected} == {  # type: ignore[union-attr]
        f"{HTTP}/tcp", f"{DUAL}/tcp", f"{V6ONLY}/tcp", f"{UDP}/udp"}
    assert all(f["severity"] == "high" and f["fix"] for f in unexpected)
    assert {s["name"] for s in data["sources"]} == {"world", al.subnet4, al.subnet6}

    text = al.fw.fw("audit", "--config", str(al.config), timeout=120)
    assert text.returncode == 1
    assert re.search(rf"tcp   0\.0\.0\.0:{HTTP}\s+python3 \({al.pids[HTTP]}\)\s+world, "
                     rf"{re.escape(al.subnet4)}\s+UNEXPECTED", text.stdout), text.stdout
    assert re.search(rf"127\.0\.0\.1:{LOCAL_HTTP}\s.*- \(loopback only\)", text.stdout)
    assert "(exit 1)" in text.stdout


def test_a_dropped_port_is_not_exposed_and_the_prediction_holds(audit_lab: AuditLab) -> None:
    al = audit_lab
    al.start_all()
    dropped = with_rule(BASELINE_V4, f"-A INPUT -p tcp --dport {HTTP} -j DROP\n"
                                     f"-A INPUT -p udp --dport {UDP} -j DROP")
    dropped6 = with_rule(BASELINE_V6, f"-A INPUT -p tcp --dport {DUAL} -j DROP")
    rules = al.fw.write("drop.rules", dropped)
    rules6 = al.fw.write("drop.rules6", dropped6)

    # before applying: RULES given
    code, data, stderr = al.audit(str(rules), "--rules6", str(rules6))
    assert code == 1, stderr    # DUAL (IPv4) and V6ONLY stay open
    assert data["rules"] == {"ipv4": str(rules), "ipv6": str(rules6)}
    assert listener(data, "tcp", HTTP)["exposed"] is False
    assert listener(data, "udp", UDP)["reachable_from"] == []
    dual = listener(data, "tcp", DUAL)
    assert dual["exposed"] is True and dual["world_over"] == ["ipv4"]
    assert al.subnet6 not in dual["reachable_from"]
    closes = {(c["proto"], c["port"]): c["from"] for c in data["exposure"]["closes"]}
    assert {"source": "world", "family": "ipv4"} in closes[("tcp", HTTP)]
    assert {"source": "world", "family": "ipv4"} in closes[("udp", UDP)]
    assert closes[("tcp", DUAL)] == [{"source": "world", "family": "ipv6"},
                                     {"source": al.subnet6, "family": "ipv6"}]
    assert data["exposure"]["opens"] == []

    # applied for real: the live rules say the same, and so does reality
    applied = al.fw.fw("apply", "--force", "--detach", "--timeout", "120", str(rules),
                       "--rules6", str(rules6))
    assert applied.returncode == 0, applied.stderr
    try:
        code, live, stderr = al.audit()
        assert code == 1, stderr
        for proto, port in (("tcp", HTTP), ("udp", UDP)):
            assert listener(live, proto, port)["exposed"] is False
            assert not al.world_reaches(proto, port)
        assert listener(live, "tcp", DUAL)["world_over"] == ["ipv4"]
        assert al.world_reaches("tcp", DUAL) and not al.world_reaches("tcp", DUAL, ipv6=True)
        assert "pending-transaction" in kinds(live)
    finally:
        reverted = al.fw.fw("revert")
        assert reverted.returncode == 4, reverted.stderr
    code, after, _ = al.audit()
    assert listener(after, "tcp", HTTP)["exposed"] is True and al.world_reaches("tcp", HTTP)
    assert "pending-transaction" not in kinds(after)


def test_only_expected_services_exit_0(audit_lab: AuditLab) -> None:
    al = audit_lab
    al.start(HTTP, ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(HTTP)])
    al.start(LOCAL_HTTP, ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(LOCAL_HTTP)])
    code, data, _ = al.audit()
    assert code == 1 and "unexpected-service" in kinds(data)
    web = al.fw.write("web.toml", f'expected_open = ["22/tcp", "8000-{HTTP}/tcp"]\n')
    code, data, stderr = al.audit(config=web)
    assert code == 0, stderr
    assert data["ok"] is True and data["expected_open"] == ["22/tcp", f"8000-{HTTP}/tcp"]
    assert listener(data, "tcp", HTTP)["expected"] is True
    assert listener(data, "tcp", HTTP)["exposed"] is True
    assert not any(f["kind"] in ("unexpected-service", "docker-published")
                   for f in data["findings"])


def test_without_a_default_route_the_world_reaches_nothing(fwlab: FwLab) -> None:
    lab = fwlab.lab
    fwlab.lab.srv_popen(["python3", "-m", "http.server", "--bind", "0.0.0.0", str(HTTP)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = fwlab.write("audit.toml", 'expected_open = ["22/tcp"]\n')
    end = time.monotonic() + 15
    while f":{HTTP} " not in lab.srv_exec(["ss", "-Hlnt"]).stdout:
        assert time.monotonic() < end
        time.sleep(0.1)
    result = fwlab.fw("audit", "--json", "--config", str(config), timeout=120)
    data = json.loads(result.stdout)
    web = listener(data, "tcp", HTTP)
    assert web["exposed"] is True and web["reachable_from"] == [re.sub(r"\.\d+$", ".0/24",
                                                                      lab.srv_ip4)]
    assert result.returncode == 0          # the local subnet only: a low finding
    assert "local-service" in kinds(data)
    assert any("no route to the world over IPv4" in n for n in data["notes"])


def test_check_shows_what_a_change_opens_and_closes(audit_lab: AuditLab) -> None:
    al = audit_lab
    al.start(HTTP, ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(HTTP)])
    rules = al.fw.write("drop-web.rules",
                        with_rule(BASELINE_V4, f"-A INPUT -p tcp --dport {HTTP} -j DROP"))
    result = al.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", "--json",
                              str(rules), "--client", al.lab.cli_ip4], check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    (closed,) = data["exposure"]["closes"]
    assert (closed["port"], closed["proto"], closed["process"]) == (HTTP, "tcp", "python3")
    assert {"source": "world", "family": "ipv4"} in closed["from"]
    assert data["exposure"]["opens"] == []
    assert not our_namespaces()

    text = al.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", str(rules),
                            "--client", al.lab.cli_ip4], check=False, timeout=120)
    assert re.search(rf"closes  {HTTP}/tcp on 0\.0\.0\.0:{HTTP} \(python3, PID \d+\): world "
                     "over IPv4", text.stdout), text.stdout
    quiet = al.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", "--no-exposure",
                             "--json", str(rules), "--client", al.lab.cli_ip4], timeout=120)
    assert "exposure" not in json.loads(quiet.stdout)


@pytest.mark.parametrize("opening", ["-A INPUT -p tcp --sport 80 -j ACCEPT",
                                     "-A INPUT -d {srv} -j ACCEPT"])
def test_check_says_a_source_port_or_destination_rule_opens_a_service(
        audit_lab: AuditLab, opening: str) -> None:
    """The Exposure section runs the audit's engine (issue 29 point 2): a change that lets in
    anyone sending from port 80, or anything to one of the host's addresses, opens the
    service, and a real connection from the world confirms it once the change is live."""
    al = audit_lab
    al.start(HTTP, ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(HTTP)])
    closed = with_rule(BASELINE_V4, f"-A INPUT -p tcp --dport {HTTP} -j DROP")
    al.lab.srv_exec(["iptables-restore"], input=closed)
    assert not al.world_reaches("tcp", HTTP)
    rule = opening.format(srv=f"{al.lab.srv_ip4}/32")
    rules = al.fw.write("opens.rules", BASELINE_V4.replace(
        "COMMIT\n", f"{rule}\n-A INPUT -p tcp --dport {HTTP} -j DROP\nCOMMIT\n", 1))
    result = al.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", "--json",
                              str(rules), "--client", al.lab.cli_ip4], check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    opened = {(x["port"], x["proto"]): x["from"] for x in json.loads(result.stdout)
              ["exposure"]["opens"]}
    assert {"source": "world", "family": "ipv4"} in opened[(HTTP, "tcp")], result.stdout
    al.lab.srv_exec(["iptables-restore"], input=rules.read_text())
    if "--sport" in rule:   # the truth: a connection from the world's port 80 gets in
        probe = PROBE.replace("sock.bind((src, 0))", "sock.bind((src, 80))")
        reached = al.lab.cli_exec(["python3", "-c", probe, "tcp", WORLD4, al.lab.srv_ip4,
                                   str(HTTP)], check=False, timeout=30).returncode == 0
    else:
        reached = al.world_reaches("tcp", HTTP)
    assert reached


def test_check_shows_a_forward_the_change_adds_or_takes_away(audit_lab: AuditLab) -> None:
    """The Exposure section compares the forwards too (issue 29): a change that adds a DNAT of
    port 8090 to another host says it opens that forward, and a real connection from the
    world confirms it once the change is live; taking the nat rule away closes it."""
    al, lab = audit_lab, audit_lab.lab
    web = lab.cli_popen(["python3", "-m", "http.server", "--bind", lab.cli_ip4, "9000"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 15
        while ":9000 " not in lab.cli_exec(["ss", "-Hlnt"]).stdout:
            assert web.poll() is None and time.monotonic() < end, "the web server is not up"
            time.sleep(0.1)
        lab.srv_exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        assert not al.world_reaches("tcp", 8090)
        nat = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
               ":POSTROUTING ACCEPT [0:0]\n{rules}COMMIT\n")
        forward = nat.format(rules=f"-A PREROUTING -p tcp --dport 8090 -j DNAT "
                                   f"--to-destination {lab.cli_ip4}:9000\n"
                                   f"-A POSTROUTING -d {lab.cli_ip4}/32 -p tcp --dport 9000 "
                                   "-j MASQUERADE\n")
        rules = al.fw.write("forward.rules", BASELINE_V4 + forward)

        def check(path: Path) -> tuple[dict[str, Any], str]:
            argv = ["env", "-u", "SSH_CONNECTION", FWSAFE, "check", str(path), "--client",
                    lab.cli_ip4]
            data = lab.srv_exec([*argv[:5], "--json", *argv[5:]], check=False, timeout=120)
            text = lab.srv_exec(argv, check=False, timeout=120)
            assert data.returncode == text.returncode == 0, data.stderr + text.stderr
            exposure: dict[str, Any] = json.loads(data.stdout)["exposure"]
            return exposure, text.stdout

        exposure, text = check(rules)
        (opened,) = exposure["forwards"]["opens"]
        assert (opened["entry"], opened["address"], opened["port"], opened["exposed"]) == \
            ("8090/tcp", lab.cli_ip4, 9000, True), exposure
        assert exposure["forwards"]["closes"] == []
        assert f"opens   forward 8090/tcp -> {lab.cli_ip4}:9000 (PREROUTING): whoever is " \
               "routed here" in text, text
        lab.srv_exec(["iptables-restore"], input=rules.read_text())
        assert al.world_reaches("tcp", 8090)          # the truth: the world is forwarded

        exposure, text = check(al.fw.write("no-forward.rules",
                                           BASELINE_V4 + nat.format(rules="")))
        (closed,) = exposure["forwards"]["closes"]
        assert (closed["entry"], closed["exposed"]) == ("8090/tcp", False), exposure
        assert exposure["forwards"]["opens"] == []
        assert f"closes  forward 8090/tcp -> {lab.cli_ip4}:9000 (PREROUTING): no longer " \
               "forwarded" in text, text
        assert not our_namespaces()
    finally:
        web.kill()
        web.wait(timeout=10)


def test_apply_shows_what_the_change_closes_before_it_is_live(audit_lab: AuditLab) -> None:
    al = audit_lab
    al.start(HTTP, ["python3", "-m", "http.server", "--bind", "0.0.0.0", str(HTTP)])
    assert al.world_reaches("tcp", HTTP)
    rules = al.fw.write("drop-web.rules",
                        with_rule(BASELINE_V4, f"-A INPUT -p tcp --dport {HTTP} -j DROP"))
    result = al.lab.srv_exec(["env", "-u", "SSH_CONNECTION", f"FWSAFE_STATE_DIR={al.fw.state_dir}",
                              FWSAFE, "apply", "--exposure", "--detach", "--timeout", "30",
                              str(rules)],
                             check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"closes  {HTTP}/tcp on 0\.0\.0\.0:{HTTP} \(python3, PID \d+\): world",
                     result.stderr), result.stderr
    assert not al.world_reaches("tcp", HTTP)          # and so it is, once live
    assert al.lab.ssh("fwsafe confirm").returncode == 0
    assert not our_namespaces()


def test_docker_published_ports_are_found(docker_lab: NeighbourLab) -> None:
    nb = docker_lab
    config = nb.write("audit.toml", 'expected_open = ["22/tcp"]\n')
    nb.docker.network_create("n1")
    nb.docker.run_httpd("web1", "n1", 8085)
    result = nb.fw("audit", "--json", "--config", str(config), timeout=180)
    data = json.loads(result.stdout)
    published = [f for f in data["findings"] if f["kind"] == "docker-published"]
    assert result.returncode == 1, result.stderr
    assert len(published) == 1 and published[0]["severity"] == "high", data["findings"]
    assert "Docker publishes 8085/tcp on every address (IPv4)" in published[0]["what"]
    assert "past every INPUT rule" in published[0]["what"]
    # dockerd holds the port too (without its userland proxy); the packets go to the container
    held = [x for x in data["listeners"] if x["port"] == 8085]
    assert all(x["exposed"] is None and "Docker publishes this port" in x["not_checked"]
               for x in held), held
    expected = nb.write("docker.toml", 'expected_open = ["22/tcp", "8085/tcp"]\n')
    again = nb.fw("audit", "--json", "--config", str(expected), timeout=180)
    assert "docker-published" not in kinds(json.loads(again.stdout))

