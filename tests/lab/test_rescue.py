"""Rescue mode, boot recovery, persist-on-confirm and the history, with a real sshd and real
netfilter in network namespaces.

The server namespace lives in a private mount namespace whose /etc is an overlay with private
copies of /etc/iptables, /etc/nftables.conf and ufw's files (fwsafe.lab private_boot_files), so
what fwsafe writes at confirm never reaches this machine's own files; a check around every
test proves that. The rescue itself runs on copies of the server's root, as a rescue system
would see its disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fwsafe.lab import Lab, create_lab, require_lab_capable
from fwsafe.ondisk.boot import boot_file_content
from fwsafe.ondisk.ufw_files import capture_ufw_files
from tests.bins import FWSAFE
from tests.conftest import IN_CI, FwLab
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_NEW_SSH, GOOD

pytestmark = pytest.mark.lab

_INDEX = itertools.count(60)

OTHER = GOOD.replace("--dport 443", "--dport 8443")
HOST_FILES = ("/etc/nftables.conf", "/etc/default/ufw", "/etc/iptables", "/etc/ufw",
              "/etc/fwsafe")


def _host_fingerprint() -> dict[str, str]:
    """This machine's own firewall files: they must never change."""
    out = {}
    for top in HOST_FILES:
        paths = [Path(top)]
        if os.path.isdir(top):
            paths = sorted(p for p in Path(top).rglob("*") if p.is_file())
        for p in paths:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "absent" if not os.path.lexists(p) else "other"
    return out


@pytest.fixture(autouse=True)
def _host_untouched() -> Iterator[None]:
    before = _host_fingerprint()
    yield
    assert _host_fingerprint() == before, "this machine's own firewall files changed"


def _capable() -> None:
    reason = require_lab_capable()
    if reason:
        if IN_CI:
            pytest.fail(f"lab tests must run in CI, but: {reason}")
        pytest.skip(reason)


class RescueLab(FwLab):
    """A lab whose server keeps its boot files in private copies (netfilter-persistent style:
    /etc/iptables/rules.v4 and rules.v6 hold the baseline), with ufw installed but disabled."""

    def fw(self, *args: str, check: bool = False, timeout: float = 60) -> Any:
        return self.lab.srv_exec(["env", f"FWSAFE_STATE_DIR={self.state_dir}",
                                  "FWSAFE_GUARD_MODE=setsid", FWSAFE, *args],
                                 check=check, timeout=timeout)

    @property
    def rules_v4(self) -> Path:
        assert self.lab.iptables_dir is not None
        return self.lab.iptables_dir / "rules.v4"

    def boot_files(self) -> dict[str, bytes]:
        """The server's boot files now: rules.v4/v6, nftables.conf, ufw's files."""
        assert self.lab.iptables_dir and self.lab.nftables_conf
        return {
            "rules.v4": self.rules_v4.read_bytes(),
            "rules.v6": (self.lab.iptables_dir / "rules.v6").read_bytes(),
            "nftables.conf": self.lab.nftables_conf.read_bytes(),
            "ufw": capture_ufw_files(self.view()),
        }

    def view(self) -> Path:
        """The server's root as its own processes see it (private /etc included)."""
        pid = self.lab.mount_ns_pid
        assert pid is not None
        return Path(f"/proc/{pid}/root")

    def copy_root(self, dest: Path) -> Path:
        """What a rescue system finds on the server's disk: its /etc firewall files and
        /var/lib/fwsafe."""
        assert self.lab.iptables_dir and self.lab.nftables_conf and self.lab.ufw_dir
        assert self.lab.default_ufw
        (dest / "etc/default").mkdir(parents=True)
        shutil.copytree(self.lab.iptables_dir, dest / "etc/iptables", symlinks=True)
        shutil.copy2(self.lab.nftables_conf, dest / "etc/nftables.conf")
        shutil.copytree(self.lab.ufw_dir, dest / "etc/ufw", symlinks=True)
        shutil.copy2(self.lab.default_ufw, dest / "etc/default/ufw")
        shutil.copytree(self.state_dir, dest / "var/lib/fwsafe", symlinks=True,
                        ignore=shutil.ignore_patterns("guard.sock", "lock"))
        return dest

    def apply_and_confirm(self, rules_text: str, name: str) -> str:
        rules = self.write(name, rules_text)
        armed = self.lab.ssh(f"fwsafe apply --detach --json --timeout 30 {rules}")
        assert armed.returncode == 0, armed.stderr
        tx_id = json.loads(armed.stdout)["id"]
        confirm = self.lab.ssh(f"fwsafe confirm {tx_id}")  # a NEW ssh session
        assert confirm.returncode == 0, confirm.stderr
        return str(tx_id)


@pytest.fixture
def rlab() -> Iterator[RescueLab]:
    _capable()
    lab = create_lab(f"fwr{os.getpid()}"[:14], next(_INDEX) % 240 + 10, private_boot_files=True)
    try:
        lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
        lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)
        assert lab.iptables_dir is not None and lab.ufw_dir is not None
        (lab.iptables_dir / "rules.v4").write_text(BASELINE_V4)
        (lab.iptables_dir / "rules.v6").write_text(BASELINE_V6)
        (lab.ufw_dir / "ufw.conf").write_text("ENABLED=no\nLOGLEVEL=low\n")
        lab.start_sshd(env={"FWSAFE_STATE_DIR": str(lab.workdir / "state"),
                            "FWSAFE_GUARD_MODE": "setsid"})
        yield RescueLab(lab)
    finally:
        lab.close()


@pytest.fixture
def fresh() -> Iterator[Lab]:
    """A second, fresh server (no rules) to load rescued boot files into."""
    _capable()
    lab = create_lab(f"fwq{os.getpid()}"[:14], next(_INDEX) % 240 + 10)
    try:
        lab.start_sshd()
        yield lab
    finally:
        lab.close()


def _boots_with_ssh(lab: Lab, root: Path) -> bool:
    """Load ROOT's boot files into `lab` as the server's boot would (nftables.conf, then
    rules.v4/v6 as netfilter-persistent does); True if a NEW ssh login works."""
    lab.srv_exec(["nft", "flush", "ruleset"])
    conf = root / "etc/nftables.conf"
    if conf.exists():
        lab.srv_exec(["nft", "-f", "-"], input=conf.read_text())
    lab.srv_exec(["iptables-restore"], input=(root / "etc/iptables/rules.v4").read_text())
    lab.srv_exec(["ip6tables-restore"], input=(root / "etc/iptables/rules.v6").read_text())
    return lab.new_login_ok() and lab.new_login_ok(ipv6=True)


def _rescue(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FWSAFE, "rescue", *args], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


def test_confirmed_state_survives_a_bad_hand_change_through_rescue(
        rlab: RescueLab, fresh: Lab, tmp_path: Path) -> None:
    # 1. a change confirmed through fwsafe; the boot files follow only on confirm
    rules = rlab.write("good.rules", GOOD)
    armed = rlab.lab.ssh(f"fwsafe apply --detach --json --timeout 30 {rules}")
    assert armed.returncode == 0, armed.stderr
    tx_id = json.loads(armed.stdout)["id"]
    assert rlab.rules_v4.read_text() == BASELINE_V4, "written before the confirm"
    assert rlab.lab.ssh(f"fwsafe confirm {tx_id}").returncode == 0
    events = [e for e in rlab.status()["events"] if e["event"] in ("history", "persist-failed")]
    assert events and events[-1]["event"] == "history", events
    assert "/etc/iptables/rules.v4" in events[-1]["detail"]
    assert "--dport 443" in rlab.rules_v4.read_text()
    confirmed = rlab.boot_files()

    # 2. a bad change by hand, outside fwsafe, saved to the boot files
    rlab.lab.srv_exec(["iptables", "-I", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"])
    rlab.lab.srv_exec(["sh", "-c", "iptables-save > /etc/iptables/rules.v4"])
    denied = rlab.lab.srv_exec(["ufw", "deny", "22/tcp"])
    assert "Rule" in denied.stdout, denied.stdout
    assert not rlab.lab.new_connection_ok(timeout=0.5)
    broken = rlab.boot_files()
    assert broken["rules.v4"] != confirmed["rules.v4"] and broken["ufw"] != confirmed["ufw"]

    # the bad boot files lock SSH out of a freshly booted server
    bad_root = rlab.copy_root(tmp_path / "bad")
    assert not _boots_with_ssh(fresh, bad_root)

    # 3. rescue --last-good on a copy of the disk: back to the confirmed files
    root = rlab.copy_root(tmp_path / "mnt")
    result = _rescue("--root", str(root), "--last-good", "--yes")
    assert result.returncode == 0, result.stderr
    assert "=== replace /etc/iptables/rules.v4" in result.stdout and "umount" in result.stdout
    assert (root / "etc/iptables/rules.v4").read_bytes() == confirmed["rules.v4"]
    assert (root / "etc/iptables/rules.v6").read_bytes() == confirmed["rules.v6"]
    assert (root / "etc/nftables.conf").read_bytes() == confirmed["nftables.conf"]
    assert capture_ufw_files(root) == confirmed["ufw"]
    assert (root / "etc/iptables/rules.v4.fwsafe-bak").read_bytes() == broken["rules.v4"]
    assert _boots_with_ssh(fresh, root)

    # 4. the same with --disable-firewall
    off = rlab.copy_root(tmp_path / "off")
    result = _rescue("--root", str(off), "--disable-firewall", "--yes")
    assert result.returncode == 0, result.stderr
    assert "ENABLED=no" in (off / "etc/ufw/ufw.conf").read_text()
    assert _boots_with_ssh(fresh, off)

    # 5. the zipapp, with nothing but a bare python3
    pyz = tmp_path / "fwsafe.pyz"
    built = subprocess.run([sys.executable, "-m", "fwsafe.rescue", "--build-zipapp", str(pyz)],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    zroot = rlab.copy_root(tmp_path / "zip")
    result = subprocess.run(["/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                             else sys.executable, "-I", str(pyz), "rescue", "--root",
                             str(zroot), "--last-good", "--yes"],
                            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (zroot / "etc/iptables/rules.v4").read_bytes() == confirmed["rules.v4"]
    assert capture_ufw_files(zroot) == confirmed["ufw"]
    assert _boots_with_ssh(fresh, zroot)

    # 6. a damaged or missing state dir: a clear error, nothing changed
    for case in ("missing", "damaged"):
        droot = rlab.copy_root(tmp_path / case)
        state = droot / "var/lib/fwsafe"
        if case == "missing":
            shutil.rmtree(state)
        else:
            for entry in (state / "history").iterdir():
                if entry.is_dir():
                    (entry / "ipv4.rules").write_text("*filter\nCOMMIT\n")
        before = {p: p.read_bytes() for p in droot.rglob("*") if p.is_file()}
        result = _rescue("--root", str(droot), "--last-good", "--yes")
        assert result.returncode == 3, (case, result.stdout, result.stderr)
        assert "state directory" in result.stderr or "damaged" in result.stderr
        assert {p: p.read_bytes() for p in droot.rglob("*") if p.is_file()} == before


def _kill_guard_and_backstop(rlab: RescueLab, armed: dict[str, Any]) -> None:
    """Both ways back gone at once (say, one OOM kill of both): what is left is `recover` by
    hand, or at boot. The backstop first, so that it cannot revert (processes we started)."""
    backstop = rlab.status()["backstop"]
    assert backstop["kind"] == "watcher"
    os.kill(armed["guard_pid"], signal.SIGSTOP)   # so that it cannot start a new backstop
    os.kill(int(backstop["pid"]), signal.SIGKILL)
    os.kill(armed["guard_pid"], signal.SIGKILL)


def test_guard_killed_then_recover_restores_the_old_rules(rlab: RescueLab) -> None:
    before = rlab.lab.ruleset()
    boot_before = rlab.boot_files()
    rules = rlab.write("drop-new.rules", DROP_NEW_SSH)
    armed = json.loads(rlab.fw("apply", "--detach", "--json", "--timeout", "60",
                               str(rules)).stdout)
    assert not rlab.lab.new_connection_ok(timeout=0.5)
    assert rlab.boot_files() == boot_before            # nothing persisted while pending
    _kill_guard_and_backstop(rlab, armed)
    deadline = time.monotonic() + 10
    while rlab.status()["guard_alive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rlab.status()["guard_alive"] is False
    recovered = rlab.fw("recover", "--json")
    assert recovered.returncode == 0, recovered.stderr
    assert json.loads(recovered.stdout)["recovered"] is True
    assert rlab.lab.ruleset() == before
    assert rlab.lab.new_login_ok()
    assert rlab.boot_files() == boot_before
    nothing = rlab.fw("recover")
    assert nothing.returncode == 0 and "nothing to recover" in nothing.stdout


def test_history_and_rollback_round_trip(rlab: RescueLab) -> None:
    first = rlab.apply_and_confirm(GOOD, "good.rules")
    second = rlab.apply_and_confirm(OTHER, "other.rules")
    listed = json.loads(rlab.fw("history", "--json").stdout)["entries"]
    assert [e["kind"] for e in listed] == ["baseline", "confirmed", "confirmed"]
    assert [e["tx"] for e in listed[1:]] == [first, second]
    assert listed[2]["changed"] == ["ipv4"] and "ipv4 +1 -1 lines" in listed[2]["summary"]
    a, b = listed[1]["id"], listed[2]["id"]
    shown = json.loads(rlab.fw("show", a, "--json").stdout)
    assert "--dport 443" in shown["content"]["ipv4"]["ipv4"]
    diff = rlab.fw("history-diff", a, b)
    assert diff.returncode == 0
    assert "--dport 443 -j ACCEPT" in diff.stdout and "+-A INPUT -p tcp -m tcp --dport 8443" in diff.stdout
    live = rlab.fw("history-diff", b)
    assert "no differences" in live.stdout, live.stdout

    armed = rlab.lab.ssh(f"fwsafe rollback {a} --detach --json --timeout 30")
    assert armed.returncode == 0, armed.stderr
    data = json.loads(armed.stdout)
    assert data["state"] == "pending" and data["confirm_command"].startswith("fwsafe confirm")
    assert "--dport 8443" in rlab.rules_v4.read_text()  # the boot files wait for the confirm
    assert rlab.lab.ssh(f"fwsafe confirm {data['id']}").returncode == 0
    assert "--dport 443 " in rlab.lab.srv_exec(["iptables-save"]).stdout
    assert "no differences" in rlab.fw("history-diff", a).stdout
    after = json.loads(rlab.fw("history", "--json").stdout)["entries"]
    assert len(after) == 3 and after[-1]["id"] == a       # the same entry, newest again
    assert after[-1]["confirmations"] == 2
    assert rlab.rules_v4.read_bytes() == boot_file_content(
        "ipv4", rlab.lab.srv_exec(["iptables-save"]).stdout.encode(), a)
    same = rlab.fw("rollback", a)
    assert same.returncode == 0 and "nothing to do" in same.stdout


def test_confirm_after_the_guard_is_gone_also_records_and_persists(rlab: RescueLab) -> None:
    rules = rlab.write("good.rules", GOOD)
    armed = json.loads(rlab.fw("apply", "--detach", "--json", "--timeout", "60",
                               str(rules)).stdout)
    _kill_guard_and_backstop(rlab, armed)
    deadline = time.monotonic() + 10
    while rlab.status()["guard_alive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rlab.rules_v4.read_text() == BASELINE_V4
    confirmed = rlab.fw("confirm", "--json")
    assert confirmed.returncode == 0, confirmed.stderr
    events = rlab.status()["events"]
    assert events[-1]["event"] == "history", events[-1]
    assert "guard was gone" in rlab.status()["reason"]
    assert "--dport 443" in rlab.rules_v4.read_text()
    entries = json.loads(rlab.fw("history", "--json").stdout)["entries"]
    assert entries[-1]["tx"] == armed["id"]
