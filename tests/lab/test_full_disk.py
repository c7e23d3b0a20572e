"""The way back needs no disk (issue 30, items 1 and 2): the state directory is a small tmpfs
(mounted in a private mount namespace of the lab's server, gone with it) filled while a lockout
change is pending. The guard's backstop still reverts when the guard is killed; a living guard
reverts, `status` tells the truth from its memory, the waiting client exits 4 (never 5); the
record is written once space returns; a disk full from the start is a clear refusal (exit 3,
nothing changed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fwsafe.lab import Lab, create_lab
from tests.bins import FWSAFE
from tests.conftest import require_capable
from tests.crashmatrix import ssh_back
from tests.lab.test_apply_guard import _read_until
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_NEW_SSH

pytestmark = pytest.mark.lab

@dataclass
class DiskLab:
    lab: Lab
    state: str
    config: str

    def fw(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.lab.srv_exec(["env", f"FWSAFE_STATE_DIR={self.state}",
                                  f"FWSAFE_CONFIG={self.config}", FWSAFE, *args],
                                 check=False, timeout=timeout)

    def sh(self, script: str) -> str:
        return self.lab.srv_exec(["sh", "-c", script], check=False).stdout

    def fill(self) -> None:
        self.sh(f"dd if=/dev/zero of={self.state}/filler bs=64k 2>/dev/null; sync")
        assert "100%" in self.sh(f"df {self.state}"), self.sh(f"df {self.state}")

    def free(self) -> None:
        self.sh(f"rm -f {self.state}/filler")

    def status(self) -> dict[str, object]:
        result = self.fw("status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, object] = json.loads(result.stdout)
        return data

    def on_disk(self, tx_id: str) -> str:
        return str(json.loads(self.sh(f"cat {self.state}/tx/{tx_id}/record.json"))["state"])

    def wait_ssh(self, limit: float) -> float | None:
        return ssh_back(self.lab, limit)

    def guard_killed_on_a_full_disk(self) -> tuple[dict[str, object], float, float | None]:
        """A lockout pending; the disk filled; its guard SIGKILLed (this test's). Returns the
        status before, when the guard was killed, and when SSH came back (None: not in 10 s)."""
        rules = self.lab.workdir / "d.rules"
        rules.write_text(DROP_NEW_SSH)
        result = self.fw("apply", "--detach", "--json", "--force", "--no-check",
                         "--timeout", "30", str(rules))
        assert result.returncode == 0, result.stderr
        info = self.status()
        self.fill()
        killed = time.time()
        os.kill(int(str(info["guard_pid"])), signal.SIGKILL)
        return info, killed, self.wait_ssh(10)


@pytest.fixture
def disklab() -> Iterator[DiskLab]:
    """A lab whose server side has a private mount namespace (the lab's own, with private
    ufw files): a 4 MiB tmpfs is mounted on the state directory there only, so fwsafe, its
    guard and the SSH sessions see it, and it goes with the lab."""
    require_capable()
    lab = create_lab(f"fwd{os.getpid() % 100000}", 240, private_ufw=True)
    try:
        lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
        lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)
        state = lab.workdir / "state"
        state.mkdir(mode=0o700)
        lab.srv_exec(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "fwsafe-test-state",
                      str(state)])
        config = lab.workdir / "fwsafe.toml"
        config.write_text(f'stuck_grace = 1\nhatch_grace = 30\nadmin_sources = ["{lab.cli_ip4}"]\n')
        lab.start_sshd(env={"FWSAFE_STATE_DIR": str(state), "FWSAFE_CONFIG": str(config)})
        yield DiskLab(lab, str(state), str(config))
    finally:
        lab.close()


def test_a_disk_full_from_the_start_is_a_clear_refusal(disklab: DiskLab) -> None:
    before = disklab.lab.ruleset()
    disklab.fill()
    rules = disklab.lab.workdir / "d.rules"
    rules.write_text(DROP_NEW_SSH)
    result = disklab.fw("apply", "--detach", "--json", "--force", "--no-check", str(rules))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "No space left on device" in result.stderr and "nothing was changed" in result.stderr
    assert "bug" not in result.stderr
    assert disklab.lab.ruleset() == before
    disklab.free()
    assert disklab.status()["state"] == "none"


def test_a_full_disk_and_a_killed_guard_the_backstop_reverts(disklab: DiskLab) -> None:
    before = disklab.lab.ruleset()
    rules = disklab.lab.workdir / "d.rules"
    info, killed, back = disklab.guard_killed_on_a_full_disk()
    assert back is not None, "SSH did not come back: the backstop did not revert"
    print(f"\nfull disk + guard SIGKILLed: SSH back {back - killed:.2f} s after the kill")
    shown = disklab.status()
    # the take-over's own view, from its memory (the disk refused the record): never "pending"
    assert shown["state"] == "reverted" and shown["unsaved"] is True, shown
    assert shown["reverted_by"] == "backstop" and shown["taken_over"], shown
    assert disklab.on_disk(str(info["id"])) == "pending"   # the disk took nothing
    disklab.free()
    end = time.monotonic() + 20
    while disklab.on_disk(str(info["id"])) != "reverted" and time.monotonic() < end:
        time.sleep(0.2)
    done = disklab.status()
    assert done["state"] == "reverted" and done["reverted_by"] == "backstop", done
    assert disklab.lab.ruleset() == before
    again = disklab.fw("apply", "--detach", "--json", "--no-check", "--timeout", "30",
                       str(rules))
    assert again.returncode == 0, again.stderr
    assert disklab.fw("revert").returncode == 4


def test_a_full_disk_with_the_guard_alive_the_client_is_told_the_truth(disklab: DiskLab) -> None:
    before = disklab.lab.ruleset()
    rules = disklab.lab.workdir / "d.rules"
    rules.write_text(DROP_NEW_SSH)
    session = disklab.lab.ssh_popen(f"fwsafe apply --force --no-check --timeout 4 {rules}",
                                    tty=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
    out = _read_until(session, r"left", 30)
    info = disklab.status()
    disklab.fill()
    out += _read_until(session, r"reverted", 20)
    assert session.wait(timeout=20) == 4, out   # the waiting client: reverted, never 5
    assert "NOT reverted" not in out
    shown = disklab.status()
    assert shown["state"] == "reverted" and shown["unsaved"] is True, shown
    assert disklab.on_disk(str(info["id"])) == "pending"
    assert re.search(r"cannot write the record", disklab.fw("status").stdout)
    assert disklab.lab.ruleset() == before and disklab.lab.new_connection_ok(timeout=1)
    disklab.free()
    end = time.monotonic() + 10
    while disklab.on_disk(str(info["id"])) != "reverted" and time.monotonic() < end:
        time.sleep(0.2)
    assert disklab.on_disk(str(info["id"])) == "reverted"


def test_confirm_on_a_full_disk_with_a_killed_guard_answers_at_once(disklab: DiskLab) -> None:
    """`fwsafe confirm` after the guard was killed on a full disk: the backstop reverted (it
    keeps the record in memory); confirm answers at once with the truth, never hangs."""
    before = disklab.lab.ruleset()
    assert disklab.guard_killed_on_a_full_disk()[2] is not None, "the backstop did not revert"
    asked = time.monotonic()
    confirmed = disklab.fw("confirm", timeout=30)
    took = time.monotonic() - asked
    print(f"\nconfirm on a full disk, guard killed: exit {confirmed.returncode} in {took:.2f} s")
    assert took < 5, f"confirm took {took:.1f} s"
    assert confirmed.returncode == 4, confirmed.stdout + confirmed.stderr
    assert disklab.lab.ruleset() == before
    disklab.free()
