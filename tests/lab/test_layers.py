"""ufw, nftables, and the scoped revert that keeps what others added during the window."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from tests.conftest import FwLab

PYTHON = sys.executable

pytestmark = pytest.mark.lab

NFT_DROP_SSH = """\
table inet fwtest {
	chain input {
		type filter hook input priority filter - 10; policy accept;
		tcp dport 22 drop
	}
}
"""
DOCKER_LIKE_NFT = """\
table ip docker_like {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 172.17.0.0/16 masquerade
	}
}
"""
INPUT_ONLY_CHANGE = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LOGDROP - [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP
-A LOGDROP -j DROP
COMMIT
"""


def _ufw(fw: FwLab, *args: str) -> str:
    return str(fw.lab.srv_exec(["ufw", *args]).stdout)


def test_ufw_deny_over_ssh_reverts_files_and_rules(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    _ufw(fw, "default", "allow", "incoming")
    _ufw(fw, "--force", "enable")
    files_before = fw.ufw_files()
    rules_before = fw.lab.ruleset()
    result = fw.lab.ssh("fwsafe apply --force --detach --json --timeout 4 -- ufw deny 22/tcp")
    assert result.returncode == 0, result.stderr
    assert "ufw: Rule added" in result.stderr
    assert not fw.lab.new_connection_ok(timeout=0.5), "ufw deny 22/tcp is not live"
    assert fw.ufw_files() != files_before
    touched = fw.status()["touched"]
    assert "/etc/ufw/user.rules" in touched["ufw"] and "ipv4" in touched
    assert fw.wait_state({"reverted"}, 10)["state"] == "reverted"
    assert fw.ufw_files() == files_before  # byte for byte: a reload or reboot is safe
    assert fw.lab.ruleset() == rules_before
    assert fw.lab.new_login_ok()
    assert "22/tcp" not in _ufw(fw, "status")


def test_ufw_enable_without_ssh_rule_reverts_to_disabled(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    files_before = fw.ufw_files()
    rules_before = fw.lab.ruleset()
    assert b"ENABLED=no" in files_before["ufw.conf"]
    result = fw.lab.ssh("fwsafe apply --force --timeout 4 --detach -- ufw enable")
    assert result.returncode == 0, result.stderr
    assert "--force" in result.stderr and "safety net" in result.stderr  # said, not hidden
    assert b"ENABLED=yes" in fw.ufw_files()["ufw.conf"]
    assert not fw.lab.new_connection_ok(timeout=0.5)
    assert fw.wait_state({"reverted"}, 10)["state"] == "reverted"
    assert b"ENABLED=no" in fw.ufw_files()["ufw.conf"]
    assert fw.ufw_files() == files_before
    assert fw.lab.ruleset() == rules_before
    assert fw.lab.new_login_ok()


def test_failing_ufw_command_changes_nothing(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    _ufw(fw, "--force", "enable")
    files_before = fw.ufw_files()
    rules_before = fw.lab.ruleset()
    result = fw.fw("apply", "--timeout", "30", "--", "ufw", "deny", "foo/bar")
    assert result.returncode == 3, result.stderr
    assert "ERROR: Bad port" in result.stderr
    assert fw.ufw_files() == files_before
    assert fw.lab.ruleset() == rules_before
    assert fw.status()["state"] == "rejected"


def test_nft_change_reverts_and_a_table_added_meanwhile_survives(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    change = fwlab.write("drop22.nft", NFT_DROP_SSH)
    result = fwlab.fw("apply", "--json", "--timeout", "4", str(change))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"] == ["nft"]
    assert not fwlab.lab.new_connection_ok(timeout=0.5)
    fwlab.lab.srv_exec(["nft", "-f", "-"], input=DOCKER_LIKE_NFT)  # "Docker" during the window
    assert fwlab.wait_state({"reverted"}, 10)["state"] == "reverted"
    live = fwlab.lab.srv_exec(["nft", "list", "ruleset"]).stdout
    assert "table inet fwtest" not in live
    assert "table ip docker_like" in live and "masquerade" in live
    assert fwlab.lab.new_login_ok()
    fwlab.lab.srv_exec(["nft", "delete", "table", "ip", "docker_like"])
    assert fwlab.lab.ruleset() == before


def test_nft_change_to_existing_table_is_put_back_exactly(fwlab: FwLab) -> None:
    fwlab.lab.srv_exec(["nft", "-f", "-"], input=NFT_DROP_SSH.replace("tcp dport 22 drop",
                                                                       "tcp dport 8080 drop"))
    before = fwlab.lab.ruleset()
    change = fwlab.write("more.nft", "flush table inet fwtest\n" + NFT_DROP_SSH)
    assert fwlab.fw("apply", "--timeout", "3", str(change)).returncode == 0
    assert "dport 22 drop" in fwlab.lab.srv_exec(["nft", "list", "table", "inet", "fwtest"]).stdout
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before


def test_flush_ruleset_nft_file_restores_iptables_tables_too(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    change = fwlab.write("flush.nft", "flush ruleset\n" + NFT_DROP_SSH)
    assert fwlab.fw("apply", "--timeout", "3", str(change)).returncode == 0
    assert "LOGDROP" not in fwlab.lab.srv_exec(["iptables-save"]).stdout
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before


def test_malformed_nft_changes_nothing(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    bad = fwlab.write("bad.nft", "table inet x {\n\tchain c {\n\t\ttcp dprt 22 drop\n\t}\n}\n")
    result = fwlab.fw("apply", "--timeout", "30", str(bad))
    assert result.returncode == 3
    assert re.search(r"bad\.nft:3: `tcp dprt 22 drop`: syntax error", result.stderr), result.stderr
    assert fwlab.lab.ruleset() == before


def test_iptables_revert_keeps_docker_chains_added_meanwhile(fwlab: FwLab) -> None:
    srv = fwlab.lab.srv_exec
    input_before = [ln for ln in srv(["iptables-save"]).stdout.splitlines()
                    if ln.startswith("-A INPUT")]
    change = fwlab.write("input-only.rules", INPUT_ONLY_CHANGE)
    assert fwlab.fw("apply", "--timeout", "4", str(change)).returncode == 0
    # Docker starts during the window: its chain, a FORWARD jump to it, a MASQUERADE rule.
    srv(["iptables", "-N", "DOCKER"])
    srv(["iptables", "-A", "DOCKER", "-d", "172.17.0.2/32", "-p", "tcp", "--dport", "80",
         "-j", "ACCEPT"])
    srv(["iptables", "-A", "FORWARD", "-o", "docker0", "-j", "DOCKER"])
    srv(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "!", "-o",
         "docker0", "-j", "MASQUERADE"])
    assert fwlab.wait_state({"reverted"}, 10)["state"] == "reverted"
    after = srv(["iptables-save"]).stdout
    assert [ln for ln in after.splitlines() if ln.startswith("-A INPUT")] == input_before
    assert "-A FORWARD -o docker0 -j DOCKER" in after
    assert "-A DOCKER -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j ACCEPT" in after
    assert "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE" in after
    assert fwlab.lab.new_login_ok()


ROUND_TRIP_V4 = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SSH-GUARD - [0:0]
:WEB - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j SSH-GUARD
-A INPUT -p tcp -m multiport --dports 80,443 -m comment --comment "web traffic" -j WEB
-A INPUT -p icmp -m icmp --icmp-type 8 -m limit --limit 10/sec --limit-burst 20 -j ACCEPT
-A INPUT -m set --match-set fwsafe-allow src -j ACCEPT
-A SSH-GUARD -m recent --set --name ssh --mask 255.255.255.255 --rsource
-A SSH-GUARD -j ACCEPT
-A WEB -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 80
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 22 -j TOS --set-tos 0x10/0x3f
COMMIT
"""
ROUND_TRIP_V6 = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:V6-IN - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -s fd00::/8 -p tcp -m tcp --dport 22 -m comment --comment "ula ssh" -j V6-IN
-A V6-IN -j ACCEPT
COMMIT
"""


@pytest.mark.parametrize("direction", ["complex-to-simple", "simple-to-complex"])
def test_snapshot_round_trip_of_rich_rulesets(fwlab: FwLab, direction: str) -> None:
    if shutil.which("ipset") is None:
        pytest.fail("ipset is not installed (scripts/setup.sh installs it)")
    srv = fwlab.lab.srv_exec
    srv(["ipset", "create", "fwsafe-allow", "hash:net"])
    srv(["ipset", "add", "fwsafe-allow", "10.231.0.0/16"])
    complex_v4 = fwlab.write("complex.rules", ROUND_TRIP_V4)
    complex_v6 = fwlab.write("complex.rules6", ROUND_TRIP_V6)
    if direction == "complex-to-simple":
        srv(["iptables-restore", str(complex_v4)])
        srv(["ip6tables-restore", str(complex_v6)])
        before = fwlab.lab.ruleset()
        simple = fwlab.write("simple.rules", INPUT_ONLY_CHANGE)
        args = [str(simple), "--rules6", str(fwlab.write("s6", "*filter\n:INPUT ACCEPT [0:0]\n"
                                                                "COMMIT\n"))]
    else:
        before = fwlab.lab.ruleset()
        args = [str(complex_v4), "--rules6", str(complex_v6)]
    assert fwlab.fw("apply", "--timeout", "3", *args).returncode == 0
    assert fwlab.lab.ruleset() != before
    assert fwlab.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fwlab.lab.ruleset() == before


def test_status_layers_warns_about_legacy_and_nft_tables(fwlab: FwLab) -> None:
    result = fwlab.fw("status", "--layers", "--json")
    assert result.returncode == 0, result.stderr
    layers = {entry["layer"]: entry for entry in json.loads(result.stdout)["layers"]}
    assert layers["ipv4"]["in_use"] and layers["ipv6"]["in_use"]
    assert not json.loads(result.stdout)["warnings"]
    fwlab.lab.srv_exec(["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "25", "-j",
                        "DROP"])
    text = fwlab.fw("status", "--layers").stdout
    assert re.search(r"legacy.*nf_tables|both", text), text
    data = json.loads(fwlab.fw("status", "--layers", "--json").stdout)
    assert data["warnings"] and {e["layer"]: e for e in data["layers"]}["ipv4-legacy"]["in_use"]


def test_diff_of_rules_and_nft_files_changes_nothing(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    change = fwlab.write("input-only.rules", INPUT_ONLY_CHANGE)
    result = fwlab.fw("diff", "--json", str(change))
    assert result.returncode == 0, result.stderr
    units = {(u["layer"], u["unit"]): u for u in json.loads(result.stdout)["units"]}
    assert set(units) == {("ipv4", "filter/INPUT")}
    assert "+-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP" in \
        units[("ipv4", "filter/INPUT")]["diff"]
    text = fwlab.fw("diff", str(fwlab.write("t.nft", NFT_DROP_SSH))).stdout
    assert "nft  inet fwtest  (added)" in text and "\x1b[" not in text  # plain in a pipe
    assert fwlab.lab.ruleset() == before
    assert fwlab.status()["state"] == "none"


def test_diff_of_a_ufw_command_runs_on_a_copy(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    _ufw(fw, "default", "allow", "incoming")
    _ufw(fw, "--force", "enable")
    files_before = fw.ufw_files()
    rules_before = fw.lab.ruleset()
    result = fw.fw("diff", "--json", "--", "ufw", "deny", "22/tcp")
    assert result.returncode == 0, result.stderr
    units = {(u["layer"], u["unit"]): u for u in json.loads(result.stdout)["units"]}
    assert ("ufw", "/etc/ufw/user.rules") in units
    assert "22" in units[("ufw", "/etc/ufw/user.rules")]["diff"]
    assert ("ipv4", "filter/ufw-user-input") in units
    assert fw.ufw_files() == files_before
    assert fw.lab.ruleset() == rules_before
    assert "22/tcp" not in _ufw(fw, "status")


@pytest.mark.parametrize("name", ["web-server.rules", "web-server.nft", "lockout-new-ssh.rules"])
def test_example_rule_files_are_valid(fwlab: FwLab, name: str) -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "rules" / name
    result = fwlab.fw("diff", "--json", str(example))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"]


def test_example_ipv6_rule_file_is_valid(fwlab: FwLab) -> None:
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "rules" / "web-server.rules6"
    result = fwlab.fw("diff", "--json", "--rules6", str(example))
    assert result.returncode == 0, result.stderr


def test_rollback_puts_ufw_files_and_rules_back_together(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    _ufw(fw, "default", "allow", "incoming")
    _ufw(fw, "--force", "enable")
    assert fw.lab.ssh("fwsafe ufw --detach --timeout 30 allow 8080/tcp").returncode == 0
    assert fw.lab.ssh("fwsafe confirm").returncode == 0  # known-good, in the history
    good_files, good_rules = fw.ufw_files(), fw.lab.ruleset()
    _ufw(fw, "deny", "22/tcp")  # by hand, outside fwsafe: the incident
    assert not fw.lab.new_connection_ok(timeout=0.5)
    result = fw.fw("rollback", "last", "--detach", "--timeout", "30", "--json")
    assert result.returncode == 0, result.stderr
    assert fw.lab.new_login_ok()
    assert fw.ufw_files() == good_files  # `ufw reload` or a reboot keeps the good state
    assert fw.lab.ruleset() == good_rules
    assert fw.lab.ssh("fwsafe confirm").returncode == 0


def test_check_of_a_ufw_command_matches_reality(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    _ufw(fw, "default", "allow", "incoming")
    _ufw(fw, "--force", "enable")
    files_before, rules_before = fw.ufw_files(), fw.lab.ruleset()
    client = fw.lab.cli_ip4
    harmless = fw.fw("check", "--client", client, "--json", "--", "ufw", "allow", "8080/tcp")
    assert harmless.returncode == 0, harmless.stderr
    bad = fw.fw("check", "--client", client, "--json", "--", "ufw", "deny", "22/tcp")
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["lockout"] is True
    assert fw.ufw_files() == files_before and fw.lab.ruleset() == rules_before  # only a copy
    # Reality agrees: applied for real (forced), a new SSH connection does not get in.
    assert fw.fw("apply", "--force", "--detach", "--timeout", "3", "--", "ufw", "deny",
                 "22/tcp").returncode == 0
    assert not fw.lab.new_connection_ok(timeout=0.5)
    assert fw.wait_state({"reverted"}, 8)["state"] == "reverted"
    assert fw.ufw_files() == files_before and fw.lab.ruleset() == rules_before


# --------------------------------------------------------------------------------------------
# The snapshot is the state right before the guard starts (nf_tables' generation decides what
# must be read again); the kernel's own answers to the netlink questions
# --------------------------------------------------------------------------------------------
_BAN_DURING_CHECK = r"""
import json, subprocess, sys
from fwsafe.control.flow import ApplyFlow, ApplyOptions
from fwsafe.steps import apply_steps
from fwsafe.core.change import change_from_files
from fwsafe.core.statedir import StateDir
from fwsafe.core import snapshot

def ban(change):   # what fail2ban does while the lockout check runs
    subprocess.run(["iptables", "-I", "INPUT", "-s", "192.0.2.77/32", "-j", "REJECT"], check=True)

state = StateDir(sys.argv[1])
options = ApplyOptions(timeout_s=3600, check=False, boot_hook=False, before_apply=ban,
                       **apply_steps())
record = ApplyFlow(state).run(change_from_files([sys.argv[2]], None, "auto"), options)
print(json.dumps({"id": record.id,
                  "before": snapshot.load(state, record.id, snapshot.BEFORE, ["ipv4"])["ipv4"].decode()}))
"""


def test_a_ban_while_checking_is_in_the_snapshot_and_comes_back(fwlab: FwLab) -> None:
    """fail2ban bans an address after the layers were first read but before the guard starts:
    nf_tables' generation moved on, so the snapshot is read again and holds the ban; the
    change deletes it (a whole file), and the revert brings it back."""
    rules = fwlab.write("input-only.rules", INPUT_ONLY_CHANGE.replace(
        "-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP\n", ""))
    result = fwlab.lab.srv_exec([PYTHON, "-c", _BAN_DURING_CHECK, str(fwlab.state_dir),
                                 str(rules)], check=False)
    assert result.returncode == 0, result.stderr
    armed = json.loads(result.stdout)
    assert "-A INPUT -s 192.0.2.77/32 -j REJECT" in armed["before"]
    assert "192.0.2.77" not in fwlab.lab.srv_exec(["iptables-save"]).stdout
    assert fwlab.fw("revert").returncode == 4
    assert "-A INPUT -s 192.0.2.77/32 -j REJECT" in fwlab.lab.srv_exec(["iptables-save"]).stdout


def test_netlink_tables_and_generation_match_nft(fwlab: FwLab) -> None:
    probe = ("import json; from fwsafe.backends import nflist; "
             "print(json.dumps([nflist.generation(), nflist.kernel_tables()]))")
    gen, tables = json.loads(fwlab.lab.srv_exec([PYTHON, "-c", probe]).stdout)
    listed = json.loads(fwlab.lab.srv_exec(["nft", "-j", "list", "tables"]).stdout)["nftables"]
    assert tables == [[t["table"]["family"], t["table"]["name"]] for t in listed if "table" in t]
    fwlab.lab.srv_exec(["nft", "add", "table", "netdev", "fwgen"])
    try:
        gen2, tables2 = json.loads(fwlab.lab.srv_exec([PYTHON, "-c", probe]).stdout)
        assert gen2 > gen and ["netdev", "fwgen"] in tables2
        gen3, _ = json.loads(fwlab.lab.srv_exec([PYTHON, "-c", probe]).stdout)
        assert gen3 == gen2          # reading changes nothing
    finally:
        fwlab.lab.srv_exec(["nft", "delete", "table", "netdev", "fwgen"])


RICH_NFT = """\
table inet fwrich {
	set allowed {
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 192.0.2.1, 198.51.100.0-198.51.100.20 }
	}
	set seen {
		type ipv6_addr
		size 65535
		flags dynamic,timeout
		timeout 1h
	}
	map ports {
		type inet_service : verdict
		elements = { 22 : accept, 80 : jump web }
	}
	counter ssh_hits {
	}
	quota big {
		over 10000 mbytes
	}
	chain input {
		type filter hook input priority filter - 5; policy accept;
		ct state established,related counter accept comment "keep sessions"
		ip saddr @allowed tcp dport vmap @ports
		meta l4proto ipv6-icmp limit rate 10/second burst 20 packets accept
		tcp dport 22 counter name "ssh_hits" accept
		ip6 saddr fd00::/8 tcp dport { 22, 443, 8000-8080 } log prefix "v6 " level info accept
		udp dport 53 quota name "big" drop
	}
	chain web {
		tcp flags & (syn | ack) == syn meta mark set 0x10 accept
		reject with tcp reset
	}
}
table ip fw_other {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 172.17.0.0/16 oifname != "lo" masquerade
	}
}
"""


def test_nft_listing_in_process_is_the_same_as_nft(fwlab: FwLab) -> None:
    """`fwsafe apply`/`check` list native tables through libnftables in their own process;
    the text must be `nft -s list table`'s, byte for byte, or the merge would see changes
    nobody made. A name nft's scanner does not take unquoted goes to `nft` itself."""
    fwlab.lab.srv_exec(["nft", "-f", str(fwlab.write("rich.nft", RICH_NFT))])
    fwlab.lab.srv_exec(["nft", "add", "table", "netdev", "fw-odd.name/1"])
    probe = ("import json, sys; from fwsafe.backends import libnft; libnft.enable(); "
             "print(json.dumps({n: (libnft.list_table(*n.split(' ')) or b'').decode() "
             "for n in sys.argv[1:]}))")
    names = ["inet fwrich", "ip fw_other", "netdev fw-odd.name/1", "inet fwnosuch"]
    try:
        listed = json.loads(fwlab.lab.srv_exec([PYTHON, "-c", probe, *names]).stdout)
        for name in names[:3]:
            nft = fwlab.lab.srv_exec(["nft", "-s", "list", "table", *name.split(" ")]).stdout
            assert listed[name] == nft, name
        assert "quota big" in listed["inet fwrich"] and "@ports" in listed["inet fwrich"]
        assert listed["inet fwnosuch"] == ""          # an error: the caller runs nft instead
        capture = ("from fwsafe.backends import layer_for, libnft; libnft.enable(); "
                   "import sys; sys.stdout.write(layer_for('nft').capture().decode())")
        through_library = fwlab.lab.srv_exec([PYTHON, "-c", capture]).stdout
        through_nft = fwlab.lab.srv_exec([PYTHON, "-c", capture.replace("enable()",
                                                                       "enable(False)")]).stdout
        assert through_library == through_nft and "table inet fwrich {" in through_library
    finally:
        for table in ("inet fwrich", "ip fw_other", "netdev fw-odd.name/1"):
            fwlab.lab.srv_exec(["nft", "delete", "table", *table.split(" ")], check=False)
