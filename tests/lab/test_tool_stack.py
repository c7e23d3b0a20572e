"""iptables-nft overflows its stack reading tables of many chains (fwsafe.tool_stack): found at
200,000 kube-proxy rules (80,000 chains), where `iptables-save` died of SIGSEGV under the usual
8 MiB once the chains were loaded back in the order it prints them, and `fwsafe check` said
"cannot read the current IPv4 rules". The same overflow, scaled down: 4,000 chains under a
256 KiB limit. fwsafe (its CLI, and the guard it starts) raises the limit for the tools it
runs: check, apply and revert work where a plain iptables-save crashes."""

from __future__ import annotations

import json
import signal

import pytest

from bench.shapes import kube
from tests.bins import FWSAFE
from tests.conftest import FwLab

pytestmark = pytest.mark.lab

SMALL_STACK_KIB = 256
UNDER_SMALL_STACK = f'ulimit -S -s {SMALL_STACK_KIB} && exec "$@"'   # the soft limit


def _small_stack(fw: FwLab, *argv: str) -> tuple[int, str, str]:
    result = fw.lab.srv_exec(["bash", "-c", UNDER_SMALL_STACK, "bash", "env",
                              f"FWSAFE_STATE_DIR={fw.state_dir}", *argv],
                             check=False, timeout=300)
    return result.returncode, result.stdout, result.stderr


def test_fwsafe_reads_checks_applies_and_reverts_where_iptables_save_overflows(
        fwlab: FwLab) -> None:
    a = fwlab.write("kube-a.rules", kube(10000, 0))   # 4,000 nat chains
    b = fwlab.write("kube-b.rules", kube(10000, 1))
    fwlab.lab.srv_exec(["iptables-restore", str(a)])
    before = fwlab.lab.srv_exec(["iptables-save"]).stdout
    # the control: this iptables overflows at this size and limit (else the test proves nothing)
    code, _, _ = _small_stack(fwlab, "iptables-save")
    assert code in (128 + signal.SIGSEGV, -signal.SIGSEGV), \
        f"iptables-save did not overflow under {SMALL_STACK_KIB} KiB (exit {code})"

    code, out, err = _small_stack(fwlab, FWSAFE, "check", str(b), "--client",
                                  fwlab.lab.cli_ip4, "--port", "22", "--json")
    assert code in (0, 1), err
    report = json.loads(out)
    new = [v for v in report["verdicts"] if v["path"].startswith(f"new tcp {fwlab.lab.cli_ip4} ")]
    assert new and new[0]["ok"] is True, report["verdicts"]   # checked, and SSH stays open

    # as from the lab's SSH client: the lockout check and the revert's access proof for it
    ssh = f"SSH_CONNECTION={fwlab.lab.cli_ip4} 50022 {fwlab.lab.srv_ip4} 22"
    code, out, err = _small_stack(fwlab, ssh, FWSAFE, "apply", "--detach", "--json", "--force",
                                  "--timeout", "120", str(b))
    assert code == 0, err
    assert fwlab.status()["state"] == "pending"
    code, _, err = _small_stack(fwlab, ssh, FWSAFE, "revert")
    assert code == 4, err
    done = fwlab.status()
    assert done["state"] == "reverted" and done["revert_verified"] is True, json.dumps(done)[:3000]
    strip = [line for line in fwlab.lab.srv_exec(["iptables-save"]).stdout.splitlines()
             if not line.startswith("#")]
    assert strip == [line for line in before.splitlines() if not line.startswith("#")]


def test_a_hard_limit_too_low_is_said_as_such(fwlab: FwLab) -> None:
    """The hard limit below what the tools need (fwsafe never passes it): the check refuses
    with what happened and where to look, not with "iptables-save failed:" and nothing."""
    a = fwlab.write("kube-a.rules", kube(10000, 0))
    fwlab.lab.srv_exec(["iptables-restore", str(a)])
    result = fwlab.lab.srv_exec(
        ["bash", "-c", f'ulimit -s {SMALL_STACK_KIB} && exec "$@"', "bash", "env",
         f"FWSAFE_STATE_DIR={fwlab.state_dir}", FWSAFE, "check", str(a), "--client",
         fwlab.lab.cli_ip4, "--port", "22"], check=False, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot read the current IPv4 rules: iptables-save failed: killed by SIGSEGV" \
        in result.stderr, result.stderr
    assert "ulimit -Hs" in result.stderr, result.stderr
