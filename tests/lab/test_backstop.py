"""No single point of failure: when the guard dies, the backstop reverts; after a reboot,
recovery puts the old state back without merging against an empty kernel."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.bins import FWSAFE
from tests.conftest import FwLab
from tests.rulesets import DROP_NEW_SSH, GOOD

pytestmark = pytest.mark.lab


def _pending(fw: FwLab, rules: str, timeout: int = 60) -> dict[str, object]:
    path = fw.write("change.rules", rules)
    result = fw.fw("apply", "--detach", "--json", "--force", "--no-check",
                   "--timeout", str(timeout), str(path))
    assert result.returncode == 0, result.stderr
    info = fw.status()
    assert info["state"] == "pending"
    return info


def _wait_ssh(fw: FwLab, limit_s: float) -> float | None:
    """Seconds until a NEW TCP connection to sshd gets its banner, None if never."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if fw.lab.new_connection_ok(timeout=0.3):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def test_guard_killed_during_a_lockout_backstop_reverts_within_2s(fwlab: FwLab) -> None:
    before = fwlab.lab.ruleset()
    info = _pending(fwlab, DROP_NEW_SSH)
    backstop = info["backstop"]
    assert isinstance(backstop, dict) and backstop["kind"] == "watcher"
    assert not fwlab.lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    os.kill(int(str(info["guard_pid"])), signal.SIGKILL)   # the guard we started, by PID
    back = _wait_ssh(fwlab, 10)
    assert back is not None, "SSH never came back after the guard was killed"
    print(f"\nguard SIGKILL -> SSH answers: {back:.2f} s (setsid mode, watcher backstop)")
    assert back < 2.0
    done = fwlab.wait_state({"reverted", "revert-failed"}, 10)
    assert done["state"] == "reverted"
    assert done["reverted_by"] == "backstop"
    assert "guard" in done["reason"] and "died" in done["reason"]
    assert fwlab.lab.ruleset() == before


def test_backstop_watcher_is_restarted_by_the_guard(fwlab: FwLab) -> None:
    info = _pending(fwlab, DROP_NEW_SSH)
    first = int(info["backstop"]["pid"])  # type: ignore[index]
    os.kill(first, signal.SIGKILL)   # started by the guard we started
    deadline = time.monotonic() + 5
    second = first
    while time.monotonic() < deadline and second == first:
        time.sleep(0.1)
        second = int(fwlab.status()["backstop"]["pid"])
    assert second != first, "the guard did not start a new backstop"
    assert fwlab.status()["state"] == "pending"
    os.kill(int(str(info["guard_pid"])), signal.SIGKILL)
    assert _wait_ssh(fwlab, 5) is not None
    assert fwlab.wait_state({"reverted"}, 10)["reverted_by"] == "backstop"


def test_confirmed_change_stays_when_the_guard_ends(fwlab: FwLab) -> None:
    info = _pending(fwlab, GOOD)
    watcher = int(info["backstop"]["pid"])  # type: ignore[index]
    assert fwlab.lab.ssh("fwsafe confirm").returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{watcher}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{watcher}"), "the backstop outlived the transaction"
    assert fwlab.status()["state"] == "confirmed"


def test_reboot_on_an_empty_kernel_recovers_and_next_apply_works(fwlab: FwLab) -> None:
    info = _pending(fwlab, DROP_NEW_SSH)
    os.kill(int(str(info["guard_pid"])), signal.SIGSTOP)  # it must not start a new backstop
    os.kill(int(info["backstop"]["pid"]), signal.SIGKILL)  # type: ignore[index]
    os.kill(int(str(info["guard_pid"])), signal.SIGKILL)
    # A reboot as the kernel sees it: every process gone, no rules at all.
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            fwlab.lab.srv_exec([tool, "-t", table, "-F"], check=False)
            fwlab.lab.srv_exec([tool, "-t", table, "-X"], check=False)
        fwlab.lab.srv_exec([tool, "-P", "INPUT", "ACCEPT"], check=False)
    fwlab.lab.srv_exec(["nft", "flush", "ruleset"], check=False)
    # The boot id decides (an empty kernel on the same boot is not a reboot): the record is
    # made to say that the change was applied in an earlier boot.
    record = fwlab.state_dir / "tx" / str(fwlab.status()["id"]) / "record.json"
    record.write_text(json.dumps({**json.loads(record.read_text()),
                                  "boot_id": "00000000-0000-4000-8000-000000000000"}))
    result = fwlab.fw("recover", "--json")
    assert result.returncode == 0, result.stderr
    info = fwlab.status()
    assert info["state"] == "reverted" and info["reverted_by"] == "boot"
    assert "reboot" in info["reason"]
    assert fwlab.lab.new_connection_ok(timeout=1)
    again = fwlab.fw("apply", "--detach", "--json", "--no-check", "--timeout", "30",
                     str(fwlab.write("good.rules", GOOD)))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["state"] == "pending"
    assert fwlab.lab.ssh("fwsafe confirm").returncode == 0


def test_revert_keeps_trying_while_the_tool_refuses_then_succeeds(fwlab: FwLab) -> None:
    """The revert never gives up while the change may be live: each level is tried, then the
    round again with backoff; `status` shows the attempts; once the tool works, it reverts."""
    fakebin = fwlab.lab.workdir / "fakebin"
    fakebin.mkdir()
    marker = fwlab.lab.workdir / "refuse-restore"
    wrapper = fakebin / "iptables-restore"
    # Fault injection in the tool only (the revert loop is what is under test): while the
    # marker exists, iptables-restore refuses as a broken kernel or tool would.
    wrapper.write_text(f"#!/bin/sh\nif [ -e {marker} ]; then echo 'iptables-restore: "
                       f"injected fault' >&2; exit 1; fi\nexec /usr/sbin/iptables-restore \"$@\"\n")
    wrapper.chmod(0o755)
    before = fwlab.lab.ruleset()
    rules = fwlab.write("drop-new.rules", DROP_NEW_SSH)
    result = fwlab.lab.srv_exec(
        ["env", f"PATH={fakebin}:/usr/sbin:/usr/bin:/sbin:/bin",
         f"FWSAFE_STATE_DIR={fwlab.state_dir}", FWSAFE, "apply", "--detach", "--json",
         "--force", "--no-check", "--timeout", "2", str(rules)], check=False)
    assert result.returncode == 0, result.stderr
    marker.touch()
    deadline = time.monotonic() + 20
    info = fwlab.status()
    while time.monotonic() < deadline and info.get("revert_attempts", 0) < 3:
        time.sleep(0.2)
        info = fwlab.status()
    assert info["state"] == "reverting", info
    assert info["revert_attempts"] >= 3
    assert "injected fault" in (info["revert_last_error"] or "")
    shown = fwlab.fw("status")
    assert re.search(r"reverting \(attempt \d+: .*injected fault", shown.stdout), shown.stdout
    assert not fwlab.lab.new_connection_ok(timeout=0.5), "the lockout should still be live"
    marker.unlink()
    assert _wait_ssh(fwlab, 10) is not None
    done = fwlab.wait_state({"reverted", "revert-failed"}, 10)
    assert done["state"] == "reverted" and done["reverted_by"] == "guard"
    assert fwlab.lab.ruleset() == before
    log = (fwlab.state_dir / "tx" / done["id"] / "guard.log").read_text()
    assert log.count("injected fault") >= 3
