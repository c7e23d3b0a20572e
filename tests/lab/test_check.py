"""`fwsafe check` in the namespace lab: every prediction is compared with what really happens to
a NEW ssh connection once the same rules are applied (and reverted by the guard)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bins import FWSAFE
from tests.conftest import FwLab, our_namespaces
from tests.rulesets import BASELINE_V4, BASELINE_V6

pytestmark = pytest.mark.lab

HEAD = "*filter\n:INPUT {inp} [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
DROP_ALL = HEAD.format(inp="DROP") + "-A INPUT -i lo -j ACCEPT\nCOMMIT\n"
DROP_NEW_SSH = HEAD.format(inp="ACCEPT") + (
    "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    "-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP\nCOMMIT\n")
DROP_ON_ETH0 = HEAD.format(inp="ACCEPT") + "-A INPUT -i eth0 -p tcp --dport 22 -j DROP\nCOMMIT\n"
DROP_ON_ETH1 = HEAD.format(inp="ACCEPT") + "-A INPUT -i eth1 -p tcp --dport 22 -j DROP\nCOMMIT\n"
ONLY_OTHER = HEAD.format(inp="DROP") + (
    "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    "-A INPUT -s 192.0.2.99/32 -p tcp --dport 22 -j ACCEPT\nCOMMIT\n")
CLIENT_SUBNET = HEAD.format(inp="DROP") + (
    "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    "-A INPUT -s {subnet} -p tcp --dport 22 -j ACCEPT\nCOMMIT\n")
DROP_SSH_V6 = HEAD.format(inp="ACCEPT") + "-A INPUT -p tcp -m tcp --dport 22 -j DROP\nCOMMIT\n"
ALLOW_ALL = HEAD.format(inp="ACCEPT") + "COMMIT\n"
RATE_LIMITED = HEAD.format(inp="DROP") + (
    "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    "-A INPUT -p icmp -m limit --limit 5/sec -j ACCEPT\n"
    "-A INPUT -p tcp --dport 22 -m hashlimit --hashlimit-upto 3/min --hashlimit-mode srcip "
    "--hashlimit-name ssh -j ACCEPT\nCOMMIT\n")

NFT_DROP_22 = """\
table inet fwcheck {
  chain input {
    type filter hook input priority 0; policy accept;
    ct state established,related accept
    tcp dport 22 drop
  }
}
"""
NFT_SUBNET_ONLY = """\
flush ruleset
table inet fwcheck {
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "lo" accept
    ip saddr {subnet} tcp dport 22 accept
    ip6 saddr {subnet6} tcp dport 22 accept
  }
}
"""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def check(fw: FwLab, *args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """`fwsafe check --json ARGS` in the server namespace, outside any SSH session; the live
    ruleset must be the same afterwards."""
    before = fw.lab.ruleset()
    result = fw.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", "--json", *args],
                             check=False, timeout=timeout)
    assert fw.lab.ruleset() == before, "fwsafe check changed the live ruleset"
    assert not our_namespaces(), "the sandbox namespaces were left behind"
    data: dict[str, Any] = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, data, result.stderr


def verdict(data: dict[str, Any], kind: str, client: str) -> dict[str, Any]:
    for item in data["verdicts"]:
        if item["path"].startswith(f"{kind} tcp {client} -> "):
            found: dict[str, Any] = item
            return found
    raise AssertionError(f"no {kind} verdict for {client}: {data['verdicts']}")


def applied_new_connection_ok(fw: FwLab, rules: Path | None = None, *,
                              rules6: Path | None = None, ipv6: bool = False) -> bool:
    """Apply for real (the guard reverts after 3 s): does a NEW connection get through?"""
    before = fw.lab.ruleset()
    args = ["apply", "--force", "--detach", "--timeout", "3"]
    if rules is not None:
        args.append(str(rules))
    if rules6 is not None:
        args += ["--rules6", str(rules6)]
    result = fw.fw(*args)
    assert result.returncode == 0, result.stderr
    ok = fw.lab.new_connection_ok(ipv6=ipv6, timeout=1.0)
    assert fw.wait_state({"reverted"}, 12)["state"] == "reverted"
    assert fw.lab.ruleset() == before
    return ok


def subnet(address: str, prefix: int) -> str:
    import ipaddress

    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


# --------------------------------------------------------------------------------------------
# iptables (IPv4): prediction == reality
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,new_ok,established_ok,culprit", [
    ("drop-all", DROP_ALL, False, False, r"drop-all\.rules:2: `:INPUT DROP \[0:0\]` \(chain policy\)"),
    ("drop-new", DROP_NEW_SSH, False, True,
     r"drop-new\.rules:6: `-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP`"),
    ("drop-eth0", DROP_ON_ETH0, False, False,
     r"drop-eth0\.rules:5: `-A INPUT -i eth0 -p tcp --dport 22 -j DROP`"),
    ("only-other", ONLY_OTHER, False, True,
     r"only-other\.rules:2: `:INPUT DROP \[0:0\]` \(chain policy\)"),
    ("drop-eth1", DROP_ON_ETH1, True, True, None),
])
def test_prediction_matches_reality(fwlab: FwLab, name: str, text: str, new_ok: bool,
                                    established_ok: bool, culprit: str | None) -> None:
    rules = fwlab.write(f"{name}.rules", text)
    code, data, stderr = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    client = fwlab.lab.cli_ip4
    new = verdict(data, "new", client)
    established = verdict(data, "established", client)
    assert new["ok"] is new_ok, new
    assert established["ok"] is established_ok, established
    assert code == (0 if new_ok and established_ok else 1), stderr
    assert data["lockout"] is (code == 1)
    if culprit:
        assert re.search(culprit, new["culprit"]), new["culprit"]
        assert "kernel counter" in new["culprit"]
        assert client in data["error"] and ":22" in data["error"] and "drop" in data["error"].lower()
    else:
        assert new["culprit"] is None
    assert applied_new_connection_ok(fwlab, rules) is new_ok


def test_eth1_rule_is_reported_not_checked(fwlab: FwLab) -> None:
    rules = fwlab.write("eth1.rules", DROP_ON_ETH1)
    code, data, _ = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    assert code == 0
    assert any(re.match(r".*eth1\.rules:5: `-A INPUT -i eth1 .*interface eth1: not in the sandbox",
                        item) for item in data["not_checked"]), data["not_checked"]


def test_allow_from_the_client_subnet(fwlab: FwLab) -> None:
    rules = fwlab.write("subnet.rules", CLIENT_SUBNET.format(subnet=subnet(fwlab.lab.cli_ip4, 24)))
    code, data, stderr = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    assert code == 0, stderr
    assert verdict(data, "new", fwlab.lab.cli_ip4)["ok"] is True
    assert verdict(data, "established", fwlab.lab.cli_ip4)["ok"] is True
    assert not data["not_checked"] and data["ok"] is True
    assert applied_new_connection_ok(fwlab, rules) is True
    # the same text output for people
    text = fwlab.lab.srv_exec([FWSAFE, "check", str(rules), "--client", fwlab.lab.cli_ip4]).stdout
    assert f"ok           new tcp {fwlab.lab.cli_ip4} -> :22 (ipv4)" in text
    assert "not checked  tcp ? -> :22 (ipv6)" in text  # the lab has IPv6, no IPv6 client given


# --------------------------------------------------------------------------------------------
# IPv6
# --------------------------------------------------------------------------------------------
def test_ipv6_rules(fwlab: FwLab) -> None:
    rules6 = fwlab.write("drop22.rules6", DROP_SSH_V6)
    lab = fwlab.lab
    code, data, _ = check(fwlab, "--rules6", str(rules6), "--client", f"{lab.cli_ip4},{lab.cli_ip6}")
    assert code == 1
    assert verdict(data, "new", lab.cli_ip4)["ok"] is True      # IPv4 untouched
    v6 = verdict(data, "new", lab.cli_ip6)
    assert v6["ok"] is False and v6["path"].endswith("(ipv6)")
    assert re.search(r"drop22\.rules6:5: `-A INPUT -p tcp -m tcp --dport 22 -j DROP`", v6["culprit"])
    assert f"[{lab.srv_ip6}]:22" in v6["detail"]
    assert verdict(data, "established", lab.cli_ip6)["ok"] is False
    assert applied_new_connection_ok(fwlab, rules6=rules6, ipv6=True) is False
    assert applied_new_connection_ok(fwlab, rules6=rules6, ipv6=False) is True


def test_ipv6_not_checked_without_an_ipv6_client(fwlab: FwLab) -> None:
    rules6 = fwlab.write("drop22.rules6", DROP_SSH_V6)
    code, data, _ = check(fwlab, "--rules6", str(rules6), "--client", fwlab.lab.cli_ip4)
    assert code == 0  # nothing checked was lost, and the IPv6 path is not called safe
    v6 = [v for v in data["verdicts"] if v["path"].endswith("(ipv6)")]
    assert len(v6) == 1 and v6[0]["ok"] is None and "no IPv6 client" in v6[0]["detail"]
    assert data["unknown"] == 1


# --------------------------------------------------------------------------------------------
# nftables (applied with `nft -f` directly; the baseline is put back by hand)
# --------------------------------------------------------------------------------------------
def _apply_nft_and_probe(fw: FwLab, path: Path) -> bool:
    before = fw.lab.ruleset()
    fw.lab.srv_exec(["nft", "-f", str(path)])
    try:
        return fw.lab.new_connection_ok(timeout=1.0)
    finally:
        fw.lab.srv_exec(["nft", "flush", "ruleset"])
        fw.lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
        fw.lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)
        assert fw.lab.ruleset() == before


def test_nft_ruleset_drop(fwlab: FwLab) -> None:
    path = fwlab.write("drop22.nft", NFT_DROP_22)
    code, data, _ = check(fwlab, str(path), "--client", fwlab.lab.cli_ip4)
    assert code == 1 and data["layers"] == {"nft": str(path)}
    new = verdict(data, "new", fwlab.lab.cli_ip4)
    assert new["ok"] is False
    assert re.search(r"drop22\.nft:5: `tcp dport 22 drop` \(nft trace: verdict drop\)", new["culprit"])
    assert verdict(data, "established", fwlab.lab.cli_ip4)["ok"] is True
    assert _apply_nft_and_probe(fwlab, path) is False


def test_nft_ruleset_policy_and_subnet(fwlab: FwLab) -> None:
    lab = fwlab.lab
    allowed = NFT_SUBNET_ONLY.replace("{subnet}", subnet(lab.cli_ip4, 24)).replace(
        "{subnet6}", subnet(lab.cli_ip6, 64))
    path = fwlab.write("subnet.nft", allowed)
    code, data, stderr = check(fwlab, str(path), "--client", lab.cli_ip4)
    assert code == 0, stderr
    assert verdict(data, "new", lab.cli_ip4)["ok"] is True
    assert _apply_nft_and_probe(fwlab, path) is True
    # a client the ruleset does not allow (same subnet, so the lab can route to it)
    only_one = NFT_SUBNET_ONLY.replace("{subnet}", f"{lab.cli_ip4}/32").replace(
        "{subnet6}", f"{lab.cli_ip6}/128")
    path = fwlab.write("only-one.nft", only_one)
    outsider = lab.cli_ip4.rsplit(".", 1)[0] + ".77"
    code, data, _ = check(fwlab, "--backend", "nft", str(path), "--client", outsider)
    assert code == 1
    assert re.search(r"only-one\.nft:4: `type filter hook input priority 0; policy drop;` "
                     r"\(policy of chain input\)", verdict(data, "new", outsider)["culprit"])


# --------------------------------------------------------------------------------------------
# What the sandbox cannot reproduce, other layers, invalid rules
# --------------------------------------------------------------------------------------------
def test_rate_limit_is_not_called_safe(fwlab: FwLab) -> None:
    rules = fwlab.write("limited.rules", RATE_LIMITED)
    code, data, _ = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    assert code == 0
    new = verdict(data, "new", fwlab.lab.cli_ip4)
    assert new["ok"] is None and "NOT checked" in new["detail"] and "hashlimit" in new["detail"]
    # the established connection is accepted before the rate limit is ever met
    assert verdict(data, "established", fwlab.lab.cli_ip4)["ok"] is True
    lines = [item.split(": ", 1)[0] for item in data["not_checked"]]
    assert any(line.endswith("limited.rules:6") for line in lines), data["not_checked"]
    assert any(line.endswith("limited.rules:7") for line in lines), data["not_checked"]
    assert any("rate limits" in item for item in data["limits"])
    # Only the hashlimit decides the SSH packets' fate; the ICMP rate limit cannot.
    matters = [item.split(": ", 1)[0] for item in data["not_checked_matters"]]
    assert len(matters) == 1 and matters[0].endswith("limited.rules:7"), matters
    assert new["unverified"] == data["not_checked_matters"]
    text = fwlab.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", str(rules),
                               "--client", fwlab.lab.cli_ip4, "--no-exposure"]).stdout
    lines = text.splitlines()
    assert lines[0] == "Result: no lockout found, but 1 path could NOT be checked (see below).", text
    assert any("limited.rules:7" in line and "hashlimit" in line for line in lines), text
    assert not any("limited.rules:6" in line for line in lines), text
    assert lines[-1].startswith("Left out (-v): 1 unreproducible rule, none able"), text


# Rules the sandbox cannot reproduce on the SSH packets' way, that cannot decide their fate:
# a rate-limited LOG, and a rate-limited jump into a chain that only logs.
LOGGED_SSH = HEAD.format(inp="DROP") + (
    ":logdeny - [0:0]\n"
    "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    "-A INPUT -p tcp --dport 22 -m limit --limit 3/min -j LOG --log-prefix \"ssh \"\n"
    "-A INPUT -m limit --limit 3/min -j logdeny\n"
    "-A INPUT -p tcp --dport 22 -j ACCEPT\n"
    "-A logdeny -m limit --limit 3/min -j RETURN\n"
    "-A logdeny -j LOG\nCOMMIT\n")


def test_logging_rules_the_sandbox_cannot_reproduce_leave_the_verdict(fwlab: FwLab) -> None:
    rules = fwlab.write("logged.rules", LOGGED_SSH)
    code, data, stderr = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    assert code == 0, stderr
    assert verdict(data, "new", fwlab.lab.cli_ip4)["ok"] is True, data["verdicts"]
    assert data["not_checked_matters"] == [] and len(data["not_checked"]) == 3
    assert applied_new_connection_ok(fwlab, rules) is True


def test_current_legacy_rules_stay_in_force(fwlab: FwLab) -> None:
    """A layer the candidate does not replace (iptables-legacy here) is copied too."""
    if subprocess.run(["which", "iptables-legacy"], capture_output=True).returncode != 0:
        pytest.skip("iptables-legacy is not installed")
    lab = fwlab.lab
    lab.srv_exec(["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"])
    try:
        rules = fwlab.write("allow.rules", ALLOW_ALL)
        code, data, _ = check(fwlab, str(rules), "--client", lab.cli_ip4)
        assert code == 1
        new = verdict(data, "new", lab.cli_ip4)
        assert new["ok"] is False
        assert re.search(r"current iptables-legacy rules .*`-A INPUT -p tcp -m tcp --dport 22 -j "
                         r"DROP`", new["culprit"]), new["culprit"]
        assert applied_new_connection_ok(fwlab, rules) is False
    finally:
        lab.srv_exec(["iptables-legacy", "-F", "INPUT"])


@pytest.mark.parametrize("name,content,expect", [
    ("bad.rules", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --bogus 22 -j ACCEPT\nCOMMIT\n",
     r"bad\.rules:3: `-A INPUT -p tcp --bogus 22 -j ACCEPT`: .*unknown option"),
    ("bad2.rules", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j NOPE\nCOMMIT\n",
     r"bad2\.rules:3: .*NOPE"),
    ("bad.nft", "table inet fw {\n  chain input {\n    tcp dprt 22 accept\n  }\n}\n",
     r"bad\.nft:3: `tcp dprt 22 accept`"),
])
def test_malformed_rules_exit_3(fwlab: FwLab, name: str, content: str, expect: str) -> None:
    path = fwlab.write(name, content)
    code, data, stderr = check(fwlab, str(path), "--client", fwlab.lab.cli_ip4)
    assert code == 3, stderr
    assert data["ok"] is False and data["kind"] == "InvalidRulesError"
    assert re.search(expect, stderr.splitlines()[0]), stderr


# --------------------------------------------------------------------------------------------
# Defaults: the SSH session's client, the established sessions, none at all
# --------------------------------------------------------------------------------------------
def test_inside_ssh_the_session_client_is_checked(fwlab: FwLab) -> None:
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    before = fwlab.lab.ruleset()
    result = fwlab.lab.ssh(f"fwsafe check --json {rules}", timeout=60)
    assert fwlab.lab.ruleset() == before
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["clients"] == [fwlab.lab.cli_ip4] and data["port"] == 22
    new = verdict(data, "new", fwlab.lab.cli_ip4)
    assert new["ok"] is False and fwlab.lab.srv_ip4 in new["detail"]
    assert fwlab.lab.cli_ip4 in data["error"]
    text = fwlab.lab.ssh(f"fwsafe check {rules}", timeout=60)
    assert text.returncode == 1
    assert f"LOCKOUT      new tcp {fwlab.lab.cli_ip4} -> :22 (ipv4)" in text.stdout
    # the culprit within the report's first lines; the error line does not repeat it
    assert "drop-new.rules:6" in "\n".join(text.stdout.splitlines()[:5]), text.stdout
    assert "lockout predicted on port 22" in text.stderr
    assert not our_namespaces()


def test_outside_ssh_the_established_sessions_are_checked(fwlab: FwLab) -> None:
    rules = fwlab.write("drop-all.rules", DROP_ALL)
    nobody = fwlab.lab.srv_exec(["env", "-u", "SSH_CONNECTION", FWSAFE, "check", str(rules)],
                                check=False)
    assert nobody.returncode == 2 and "--client" in nobody.stderr
    session = fwlab.lab.ssh_popen("sleep 30", tty=False, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            code, data, _ = check(fwlab, str(rules))
            if data.get("clients"):
                break
            time.sleep(0.2)
        assert code == 1 and data["clients"] == [fwlab.lab.cli_ip4]
    finally:
        session.kill()
        session.wait()


def test_sigterm_and_sigint_remove_the_sandbox(fwlab: FwLab) -> None:
    rules = fwlab.write("drop-all.rules", DROP_ALL)
    before = fwlab.lab.ruleset()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # as from a terminal: a suite started in the background of a shell inherits SIGINT
        # ignored, and an ignored signal stays ignored across exec (a handled one does not)
        inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = fwlab.lab.srv_popen([FWSAFE, "check", "--timeout", "30", str(rules),
                                        "--client", fwlab.lab.cli_ip4], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
        finally:
            signal.signal(signal.SIGINT, inherited)
        end = time.monotonic() + 20
        while not our_namespaces(proc.pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert our_namespaces(proc.pid), "the sandbox never appeared"
        time.sleep(1.0)  # inside a 30 s connection attempt
        os.kill(proc.pid, sig)  # `ip netns exec` execs: this PID is fwsafe itself
        _, err = proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert not our_namespaces(proc.pid), err
        assert fwlab.lab.ruleset() == before


def test_a_killed_check_leaves_nothing_the_next_one_does_not_remove(fwlab: FwLab,
                                                                    tmp_path: Path) -> None:
    """SIGKILL: nothing can tear down; the next check removes the namespaces, and there is no
    file or directory of it anywhere (its trace table went through a file of a directory in
    /tmp, left behind by every check killed so)."""
    rules = fwlab.write("drop-all.rules", DROP_ALL)
    before = fwlab.lab.ruleset()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = fwlab.lab.srv_popen(["env", f"TMPDIR={tmp}", FWSAFE, "check", "--timeout", "30",
                                str(rules), "--client", fwlab.lab.cli_ip4],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.monotonic() + 20
    while not our_namespaces(proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert our_namespaces(proc.pid), "the sandbox never appeared"
    time.sleep(1.0)  # the trace is up: inside a 30 s connection attempt
    os.kill(proc.pid, signal.SIGKILL)   # `ip netns exec` and env exec: this PID is fwsafe
    proc.communicate(timeout=30)
    assert our_namespaces(proc.pid)   # the control: nothing tore it down
    code, _, stderr = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    assert code == 1, stderr
    assert not our_namespaces(proc.pid)
    assert sorted(p.name for p in tmp.iterdir()) == []
    assert fwlab.lab.ruleset() == before


# --------------------------------------------------------------------------------------------
# Large rulesets: the sandbox leaves out the rules no packet of its own can match
# --------------------------------------------------------------------------------------------
def _many(count: int, template: str) -> str:
    return "\n".join(template.format(a=i // 250, b=i % 250 + 1) for i in range(count))


def test_large_ruleset_culprit_keeps_its_line(fwlab: FwLab) -> None:
    """3000 per-address rules the sandbox leaves out, then the client's own address among them
    and a DROP on port 22 below: the kernel's verdict and the culprit's file line are the same as
    with every rule loaded, and only a few rules reach the sandbox."""
    client = fwlab.lab.cli_ip4
    text = (HEAD.format(inp="ACCEPT")
            + "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
            + _many(3000, "-A INPUT -s 198.18.{a}.{b}/32 -p tcp -m tcp --dport 22 -j ACCEPT")
            + f"\n-A INPUT -s {client}/32 -p tcp -m tcp --dport 22 -j LOG\n"
            + _many(1000, "-A INPUT -d 198.19.{a}.{b}/32 -j DROP")
            + "\n-A INPUT -p tcp -m tcp --dport 22 -j DROP\nCOMMIT\n")
    rules = fwlab.write("big.rules", text)
    drop_line = len(text.splitlines()) - 1
    code, data, stderr = check(fwlab, str(rules), "--client", client)
    assert code == 1, stderr
    new = verdict(data, "new", client)
    assert new["ok"] is False
    assert re.search(rf"big\.rules:{drop_line}: `-A INPUT -p tcp -m tcp --dport 22 -j DROP`",
                     new["culprit"]), new["culprit"]
    assert verdict(data, "established", client)["ok"] is True
    # 2999 + 999 left out: one rule of each shape stays, and the client's own rule
    assert data["sandbox"]["rules_left_out"] >= 3990, data["sandbox"]
    assert applied_new_connection_ok(fwlab, rules) is False


def test_large_ruleset_rule_for_the_client_still_decides(fwlab: FwLab) -> None:
    """A DROP for the client's own address hidden among thousands of others is found."""
    client = fwlab.lab.cli_ip4
    text = (HEAD.format(inp="ACCEPT")
            + _many(2000, "-A INPUT -s 198.18.{a}.{b}/32 -p tcp -m tcp --dport 22 -j DROP")
            + f"\n-A INPUT -s {client}/32 -p tcp -m tcp --dport 22 -j DROP\nCOMMIT\n")
    rules = fwlab.write("hidden.rules", text)
    code, data, _ = check(fwlab, str(rules), "--client", client)
    assert code == 1
    assert re.search(r"hidden\.rules:2005: `-A INPUT -s .*-j DROP`",
                     verdict(data, "new", client)["culprit"])
    assert applied_new_connection_ok(fwlab, rules) is False


def test_large_nft_ruleset_culprit_keeps_its_line(fwlab: FwLab) -> None:
    client = fwlab.lab.cli_ip4
    rules = _many(3000, "    ip saddr 198.18.{a}.{b} tcp dport 22 accept")
    text = ("table inet fwcheck {\n  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            "    ct state established,related accept\n" + rules
            + f"\n    ip saddr {client} tcp dport 22 drop\n  }}\n}}\n")
    path = fwlab.write("big.nft", text)
    code, data, stderr = check(fwlab, str(path), "--client", client)
    assert code == 1, stderr
    assert re.search(rf"big\.nft:3005: `ip saddr {re.escape(client)} tcp dport 22 drop` "
                     r"\(nft trace: verdict drop\)", verdict(data, "new", client)["culprit"])
    assert data["sandbox"]["rules_left_out"] >= 2990
    assert _apply_nft_and_probe(fwlab, path) is False


def test_missing_chain_jump_among_left_out_rules_is_refused(fwlab: FwLab) -> None:
    """A rule the sandbox could leave out still reaches the kernel once per shape: its jump to
    a chain that does not exist is refused (exit 3), as the real load would be."""
    text = (HEAD.format(inp="ACCEPT")
            + _many(500, "-A INPUT -s 198.18.{a}.{b}/32 -j ACCEPT")
            + "\n-A INPUT -s 198.18.9.9/32 -j NOSUCHCHAIN\nCOMMIT\n")
    rules = fwlab.write("nochain.rules", text)
    code, _, stderr = check(fwlab, str(rules), "--client", fwlab.lab.cli_ip4)
    assert code == 3, stderr
    assert "nochain.rules:505" in stderr and "NOSUCHCHAIN" in stderr


def test_a_sandbox_whose_owner_was_killed_goes_with_the_next_check() -> None:
    """A check SIGKILLed with its sandbox up cannot remove it: the next sandbox removes the
    namespaces whose owner PID is gone (never a live owner's)."""
    from fwsafe.check.sandbox import CHECK_PREFIX, Sandbox

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = os.getpid()
    names = [f"{CHECK_PREFIX}{dead.pid}s", f"{CHECK_PREFIX}{dead.pid}c",
             f"{CHECK_PREFIX}{alive}zzs"]
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        with Sandbox(f"{alive}t"):
            left = set(os.listdir("/run/netns"))
        assert names[0] not in left and names[1] not in left
        assert names[2] in left  # its owner (this test) is alive
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
