"""`check` and `diff` of a command never change the live host, and `apply` snapshots before a
command's first run (issue 24, item 0; fwsafe/check/isolation.py).

Every kind of command (iptables, ip6tables, nft, ufw, a script calling them and writing files,
a client of a daemon) is checked and diffed in a lab whose files are private; afterwards the
live ruleset, ufw's files, the boot files and a marker outside every copy are byte-identical,
and a stand-in daemon (a unix socket under /run whose every connection adds a DROP rule to the
live firewall) was never reached. A command that reaches a daemon is refused by both (exit 3,
"cannot be tried on a copy"); `apply` of it runs it once, under the guard, after the snapshot.
The same with the real fail2ban (its socket, under /tmp), and with firewall-cmd and the real
firewalld on its system D-Bus in the systemd lab.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.bins import FWSAFE
from tests.conftest import FwLab, NeighbourLab

DAEMON = """\
import os, socket, subprocess, sys
path, hits = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    # what a firewall daemon does when asked: change the live firewall, then answer
    subprocess.run(["iptables", "-w", "-I", "INPUT", "-p", "tcp", "--dport", "7777",
                    "-j", "DROP"], check=True)
    with open(hits, "a") as out:
        out.write("hit\\n")
    conn.sendall(b"ok\\n")
    conn.close()
"""

CLIENT = """\
import socket, sys
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
sys.exit(0 if conn.recv(16) == b"ok\\n" else 1)
"""

SCRIPT = """\
#!/bin/sh
set -e
iptables -w -A INPUT -p tcp --dport 7001 -j DROP
ip6tables -w -A INPUT -p tcp --dport 7001 -j DROP
nft add table inet fwsbtest
nft add chain inet fwsbtest input '{ type filter hook input priority 0; }'
nft add rule inet fwsbtest input tcp dport 7002 drop
ufw deny 7003/tcp
iptables-save > /etc/iptables/rules.v4
echo written > /etc/fwsafe-sandbox-marker
echo written > "$1"
"""


class StandIn:
    """A daemon in the lab's server namespace, on a socket under the real /run."""

    def __init__(self, fw: FwLab) -> None:
        self.dir = Path(f"/run/fwsafe-test-{os.getpid()}-{fw.lab.prefix}")
        self.sock = self.dir / "fwd.sock"
        self.hits = fw.lab.workdir / "daemon.hits"
        self.client = fw.write("client.py", CLIENT)
        daemon = fw.write("daemon.py", DAEMON)
        self.dir.mkdir(mode=0o700)
        self.proc = fw.lab.srv_popen([sys.executable, str(daemon), str(self.sock),
                                      str(self.hits)], stdout=-1)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"

    def count(self) -> int:
        return len(self.hits.read_text().splitlines()) if self.hits.exists() else 0

    def command(self) -> list[str]:
        return [sys.executable, str(self.client), str(self.sock)]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def standin(fwlab_ufw: FwLab) -> Iterator[StandIn]:
    daemon = StandIn(fwlab_ufw)
    try:
        yield daemon
    finally:
        daemon.close()


def live_host(fw: FwLab, marker: Path) -> dict[str, Any]:
    """Everything check/diff must leave as it is: the ruleset, ufw's files, the boot files,
    a file in the lab's /etc and one outside every copy."""
    lab = fw.lab
    assert lab.iptables_dir is not None
    return {
        "ruleset": lab.ruleset(),
        "ufw": fw.ufw_files(),
        "boot": {p.name: p.read_bytes() for p in sorted(lab.iptables_dir.iterdir())},
        "etc marker": lab.srv_exec(["cat", "/etc/fwsafe-sandbox-marker"], check=False).stdout,
        "marker": marker.exists(),
    }


def check_and_diff(fw: FwLab, command: list[str]) -> tuple[Any, Any]:
    check = fw.lab.srv_exec(["env", "-u", "SSH_CONNECTION", f"FWSAFE_STATE_DIR={fw.state_dir}",
                             FWSAFE, "check", "--json", "--no-exposure", "--client",
                             fw.lab.cli_ip4, "--", *command], check=False, timeout=120)
    diff = fw.fw("diff", "--json", "--", *command, timeout=120)
    return check, diff


KINDS = {
    "iptables": (["iptables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "7001", "-j", "DROP"],
                 ["7001"]),
    "ip6tables": (["ip6tables", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "7001", "-j",
                   "DROP"], ["7001"]),
    "nft": (["nft", "add table inet fwsbtest; add chain inet fwsbtest input { type filter hook "
             "input priority 0; }; add rule inet fwsbtest input tcp dport 7002 drop"],
            ["fwsbtest", "7002"]),
    "ufw": (["ufw", "deny", "7003/tcp"], ["7003"]),
    "script": (["sh", "SCRIPT", "MARKER"], ["7001", "fwsbtest", "7002", "7003"]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_check_and_diff_leave_the_live_host_untouched(fwlab_ufw: FwLab, standin: StandIn,
                                                      kind: str) -> None:
    fw = fwlab_ufw
    fw.lab.srv_exec(["ufw", "default", "allow", "incoming"])
    fw.lab.srv_exec(["ufw", "--force", "enable"])
    marker = fw.lab.workdir / "outside-every-copy"
    script = fw.write("change.sh", SCRIPT)
    command, expected = KINDS[kind]
    command = [str(script) if a == "SCRIPT" else str(marker) if a == "MARKER" else a
               for a in command]
    before = live_host(fw, marker)
    check, diff = check_and_diff(fw, command)
    assert live_host(fw, marker) == before
    assert standin.count() == 0
    assert fw.lab.new_connection_ok(timeout=2.0)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["lockout"] is False
    assert diff.returncode == 0, diff.stderr
    units = json.loads(diff.stdout)["units"]
    text = json.dumps(units)
    for needle in expected:   # the command did run, in the sandbox
        assert needle in text, (needle, units)
    if kind == "script":   # its files were written, on copies
        names = {(u["layer"], u["unit"]) for u in units}
        assert ("ufw", "/etc/ufw/user.rules") in names
        assert ("ipv6", "filter/INPUT") in names


def test_a_daemon_client_is_not_simulated(fwlab_ufw: FwLab, standin: StandIn) -> None:
    """The stand-in's client reaches a live daemon: check and diff refuse it (exit 3), and the
    daemon never hears of it."""
    fw = fwlab_ufw
    marker = fw.lab.workdir / "outside-every-copy"
    before = live_host(fw, marker)
    check, diff = check_and_diff(fw, standin.command())
    assert live_host(fw, marker) == before
    assert standin.count() == 0
    for result in (check, diff):
        assert result.returncode == 3, result.stderr
        assert "cannot be tried on a copy" in result.stderr
        assert str(standin.sock) in result.stderr
        assert "it was not run on the live host" in result.stderr
    # the stand-in works: run live (in the lab), it changes the firewall
    fw.lab.srv_exec(standin.command())
    assert standin.count() == 1
    assert "--dport 7777 -j DROP" in fw.lab.srv_exec(["iptables", "-S", "INPUT"]).stdout


def test_apply_snapshots_before_the_first_run(fwlab: FwLab) -> None:
    """`apply` of a command that cannot be simulated: the lockout check says it was not
    checked, the snapshot is taken before the command runs, the guard runs it once, and the
    revert brings the state from before it back."""
    fw = fwlab
    daemon = StandIn(fw)
    try:
        before = fw.lab.ruleset()
        argv = " ".join([FWSAFE, "apply", "--detach", "--json", "--timeout", "60", "--",
                         *daemon.command()])
        result = fw.lab.ssh(argv, timeout=120)   # in SSH: a client to check for is known
        assert result.returncode == 0, result.stderr
        assert daemon.count() == 1, "the command ran more than once (or never)"
        info = fw.status()
        assert info["state"] == "pending"
        tx = fw.state_dir / "tx" / info["id"]
        record = json.loads((tx / "record.json").read_text())
        assert "lockout NOT checked" in record["options"]["check"]["summary"]
        assert str(daemon.sock) in record["options"]["check"]["summary"]
        assert "7777" not in (tx / "before.ipv4").read_text()
        assert "--dport 7777 -j DROP" in fw.lab.srv_exec(["iptables", "-S", "INPUT"]).stdout
        assert fw.fw("revert").returncode == 4
        deadline = time.monotonic() + 10
        while fw.lab.ruleset() != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fw.lab.ruleset() == before
        assert daemon.count() == 1
    finally:
        daemon.close()


def test_fail2ban_client_is_not_simulated(f2b_lab: NeighbourLab) -> None:
    """The real fail2ban (its socket in the lab's directory under /tmp): a ban asked through
    check or diff is refused, and fail2ban bans nobody."""
    nb = f2b_lab
    command = ["/usr/bin/fail2ban-client", "-c", str(nb.f2b.conf), "-s", str(nb.f2b.sock),
               "set", nb.f2b.jail, "banip", "203.0.113.9"]
    before = nb.lab.ruleset()
    check, diff = check_and_diff(nb, command)
    assert nb.lab.ruleset() == before
    assert nb.f2b.banned() == []
    for result in (check, diff):
        assert result.returncode == 3, result.stderr
        assert "cannot be tried on a copy" in result.stderr
        assert "fail2ban" in result.stderr

