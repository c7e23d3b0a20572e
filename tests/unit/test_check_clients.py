"""fwsafe check: which clients and which port are protected by default, and the report."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

from fwsafe.check.clients import (
    default_clients_and_port,
    default_sessions,
    normalize_address,
    parse_clients,
    parse_proc_net_tcp,
    parse_ssh_connection,
    sshd_ports,
)
from fwsafe.check.predict import CheckReport, Verdict, predict
from fwsafe.errors import UsageError

# /proc/net/tcp: 10.231.10.1:22 <- 10.231.10.2:51234 (established), a listener, an outgoing
# connection to somebody else's port 22, and 127.0.0.1:2222 <- 127.0.0.1:40000.
PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 010AE70A:0016 020AE70A:C822 01 00000000:00000000 02:0007A3FC 00000000     0        0 2 4
   2: 010AE70A:9C40 050AE70A:0016 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:08AE 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4 1
"""

def test_ssh_connection_gives_client_and_port() -> None:
    env = {"SSH_CONNECTION": "10.231.10.2 51234 10.231.10.1 2222"}
    assert default_clients_and_port(env) == (["10.231.10.2"], 2222)
    session = parse_ssh_connection("fd00:231:10::2 50000 fd00:231:10::1 22")
    assert session is not None and session.client == "fd00:231:10::2"
    assert session.server == "fd00:231:10::1" and session.server_port == 22
    mapped = parse_ssh_connection("::ffff:192.0.2.7 1 ::ffff:192.0.2.1 22")
    assert mapped is not None and mapped.client == "192.0.2.7"
    for bad in ("", "garbage", "1.2.3.4 x 5.6.7.8 22", "a b c d"):
        assert parse_ssh_connection(bad) is None


def test_proc_net_tcp_established_sessions() -> None:
    sessions = parse_proc_net_tcp(PROC_TCP)
    assert [(s.client, s.client_port, s.server, s.server_port) for s in sessions] == [
        ("10.231.10.2", 51234, "10.231.10.1", 22),
        ("10.231.10.5", 22, "10.231.10.1", 40000),
        ("127.0.0.1", 40000, "127.0.0.1", 2222),
    ]


def test_proc_net_tcp6_addresses() -> None:
    # built from real addresses: four 32-bit words, each in the kernel's (little-endian) order
    def hexaddr(address: str) -> str:
        raw = ipaddress.ip_address(address).packed
        return "".join(f"{struct.unpack('<I', raw[i:i + 4])[0]:08X}" for i in range(0, 16, 4))

    text = ("  sl  local_address remote_address st\n"
            f"   0: {hexaddr('fd00:231:10::1')}:0016 {hexaddr('fd00:231:10::2')}:C350 01 0\n"
            f"   1: {hexaddr('::ffff:192.168.0.1')}:0016 {hexaddr('::ffff:192.168.0.9')}:D431 01 0\n")
    sessions = parse_proc_net_tcp(text)
    assert [(s.client, s.server) for s in sessions] == [
        ("fd00:231:10::2", "fd00:231:10::1"), ("192.168.0.9", "192.168.0.1")]


def test_outside_ssh_the_sessions_to_sshd_port(tmp_path: Path) -> None:
    proc = tmp_path / "net"
    proc.mkdir()
    (proc / "tcp").write_text(PROC_TCP)
    config = tmp_path / "sshd_config"
    config.write_text("# defaults\n")
    assert default_clients_and_port({}, sshd_config=str(config), proc_net=str(proc)) == (
        ["10.231.10.2"], 22)
    config.write_text("Port 2222\n")
    assert default_clients_and_port({}, sshd_config=str(config), proc_net=str(proc)) == (
        ["127.0.0.1"], 2222)
    config.write_text("Port 2200\n")
    assert default_clients_and_port({}, sshd_config=str(config), proc_net=str(proc)) == ([], 2200)
    sessions, port = default_sessions({}, sshd_config=str(config), proc_net=str(tmp_path / "x"))
    assert sessions == [] and port == 2200
    # --port given: the sessions to that port, sshd's own ports not looked up
    sessions, port = default_sessions({}, sshd_config=str(tmp_path / "missing"),
                                      proc_net=str(proc), port=2222)
    assert [s.client for s in sessions] == ["127.0.0.1"] and port == 2222


def test_sshd_config_ports(tmp_path: Path) -> None:
    main = tmp_path / "sshd_config"
    conf_d = tmp_path / "sshd_config.d"
    conf_d.mkdir()
    (conf_d / "10-port.conf").write_text("Port 2022\n")
    main.write_text(f"Include {conf_d}/*.conf\nPort=22\n#Port 9\n")
    assert sshd_ports(str(main)) == [2022, 22]
    main.write_text("ListenAddress 10.0.0.1:2222\nListenAddress [fd00::1]:2223\nPort 22\n")
    assert sshd_ports(str(main)) == [2222, 2223]
    main.write_text("ListenAddress 10.0.0.1\nListenAddress 10.0.0.2:2222\nPort 2200\n")
    assert sshd_ports(str(main)) == [2222, 2200]
    main.write_text("Port 22\nMatch User git\n  Port 9999\n")
    assert sshd_ports(str(main)) == [22]
    assert sshd_ports(str(tmp_path / "missing")) == [22]


def test_client_option_parsing() -> None:
    assert parse_clients(["10.0.0.2,fd00::2", " 10.0.0.2", "[fd00::3]"]) == [
        "10.0.0.2", "fd00::2", "fd00::3"]
    assert normalize_address("FD00:0::2") == "fd00::2"
    with pytest.raises(UsageError, match="not an IP address"):
        parse_clients(["10.0.0.300"])


def test_predict_refuses_bad_arguments_before_anything() -> None:
    with pytest.raises(UsageError, match="layers"):
        predict({"ipv5": (b"", "x")}, clients=["10.0.0.2"], port=22)
    with pytest.raises(UsageError, match="--client"):
        predict({"ipv4": (b"*filter\nCOMMIT\n", "x")}, clients=[], port=22)
    with pytest.raises(UsageError, match="port"):
        predict({"ipv4": (b"*filter\nCOMMIT\n", "x")}, clients=["10.0.0.2"], port=0)


def test_report_json_and_text() -> None:
    report = CheckReport(
        verdicts=[
            Verdict("new tcp 10.0.0.2 -> :22 (ipv4)", False, "r.rules:6: `-A INPUT -j DROP`",
                    "a new connection to 10.0.0.1:22 fails (timed out)"),
            Verdict("established tcp 10.0.0.2 -> :22 (ipv4)", True, None, "still carries data"),
            Verdict("tcp ? -> :22 (ipv6)", None, None, "not checked: no IPv6 client known"),
        ],
        not_checked=["r.rules:9: `-A INPUT -m limit ...`: limit: a rate limit"],
        lockout=True, clients=["10.0.0.2"], port=22, layers={"ipv4": "r.rules"})
    data = json.loads(json.dumps(report.to_json()))
    assert data["lockout"] is True and data["ok"] is False and data["exit_code"] == 1
    assert data["kind"] == "LockoutPredicted" and "r.rules:6" in data["error"]
    assert "10.0.0.2" in data["error"] and ":22" in data["error"]
    assert data["verdicts"][2]["ok"] is None and data["unknown"] == 1
    assert data["not_checked"] == report.not_checked
    assert any("rate limits" in item for item in data["limits"])
    text = report.describe()
    lines = text.splitlines()
    assert lines[0] == "Result: LOCKOUT predicted: do not apply this as it is."
    assert "LOCKOUT      new tcp 10.0.0.2 -> :22 (ipv4)" in lines[2]
    assert "culprit: r.rules:6" in lines[3] and "not checked  tcp ? -> :22 (ipv6)" in text
    # The rate-limited rule met no packet of the management path: counted, not listed.
    assert "r.rules:9" not in text
    assert lines[-1] == "Left out (-v): 1 unreproducible rule, none able to change the verdict"
    verbose = report.describe(verbose=True)
    assert "r.rules:9" in verbose and "cannot change these verdicts" in verbose
    assert "a new connection to 10.0.0.1:22 fails (timed out)" in verbose
    assert "Left out" not in verbose
    report.lockout = False
    report.verdicts = report.verdicts[1:]
    open_text = report.describe()
    assert open_text.startswith("Result: the management path stays open for the clients "
                                "checked; IPv6: no client known")
    assert "could NOT be checked" not in open_text
    # A path that met a rule the sandbox cannot reproduce, and which could decide its fate:
    # the verdict says so, and the rule is listed once, with its file and line.
    report.verdicts[0] = Verdict("established tcp 10.0.0.2 -> :22 (ipv4)", None, None,
                                 "carries data; but NOT checked: ...",
                                 unverified=[report.not_checked[0]])
    report.verdicts.append(Verdict("new tcp 10.0.0.2 -> :22 (ipv4)", None, None, "...",
                                   unverified=[report.not_checked[0]]))
    unknown = report.describe()
    assert unknown.startswith("Result: no lockout found, but 2 paths could NOT be checked")
    assert unknown.count("r.rules:9") == 1 and "NOT checked, and it could matter" in unknown
    assert "Left out" not in unknown
    assert report.to_json()["not_checked_matters"] == report.not_checked
    assert "exit_code" in report.to_json() and "kind" not in report.to_json()
