"""Issue 27: the nft layer's revert from the snapshot (one `nft -f` is one nf_tables commit):
asked right after the change, while nf_tables' generation shows that nothing but the change
committed since the snapshot, the touched tables are loaded back as in the snapshot without
reading the ruleset, and still verified by the kernel (the access proof); a table the change
created is gone. When another writer (fail2ban-like: an element added to the set in its own
nft transaction) committed after the change, the three-way merge is taken and keeps that
element. Real kernel, nft and sshd."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from fwsafe.backends.nftables import canonical_block, set_parts, split_tables
from tests.bins import FWSAFE
from tests.conftest import FwLab

pytestmark = pytest.mark.lab

SNAPSHOT_WAY = "its tables go back as in the snapshot, nothing read"
EXTRA = "table inet extra {\n\tchain out {\n\t\ttype filter hook output priority 0;\n\t}\n}\n"


def ruleset(changed: bool) -> str:
    """fail2ban-like: a set of 2000 blocked sources dropped on port 22; the change replaces one
    element (10.50.0.1 -> 10.99.0.1) and creates a table of its own."""
    elements = [f"10.50.{i // 250}.{i % 250 + 1}" for i in range(2000)]
    if changed:
        elements[0] = "10.99.0.1"
    text = ("table inet fw\ndelete table inet fw\ntable inet fw {\n\tset blocked {\n"
            f"\t\ttype ipv4_addr\n\t\telements = {{ {', '.join(elements)} }}\n\t}}\n"
            "\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n"
            "\t\tip saddr @blocked tcp dport 22 drop\n\t}\n}\n")
    return text + (EXTRA if changed else "")


def native(fw: FwLab) -> dict[str, str | None]:
    listed = fw.lab.srv_exec(["nft", "-s", "list", "ruleset"]).stdout
    return {k: canonical_block(v) for k, v in split_tables(listed).items()
            if k in ("inet fw", "inet extra")}


def elements(fw: FwLab) -> set[str]:
    block = split_tables(fw.lab.srv_exec(["nft", "list", "set", "inet", "fw", "blocked"]).stdout)
    body = block["inet fw"].splitlines()[2:-2]
    return set(set_parts(body)[1])


def apply_change(fw: FwLab) -> tuple[list[str], str]:
    lab = fw.lab
    env = ["env", f"FWSAFE_STATE_DIR={fw.state_dir}",
           f"SSH_CONNECTION={lab.cli_ip4} 50022 {lab.srv_ip4} 22"]
    change = fw.write("change.nft", ruleset(True))
    applied = lab.srv_exec([*env, FWSAFE, "apply", "--detach", "--json", "--force", "--timeout",
                            "60", str(change)], check=False, timeout=120)
    assert applied.returncode == 0, applied.stderr
    return env, json.loads(applied.stdout)["id"]


def finish(fw: FwLab, env: list[str], tx: str) -> tuple[dict[str, Any], str]:
    reverted = fw.lab.srv_exec([*env, FWSAFE, "revert"], check=False, timeout=120)
    assert reverted.returncode == 4, reverted.stderr
    log = (fw.state_dir / "tx" / tx / "guard.log").read_text()
    print(log)
    info = fw.status()
    assert info["state"] == "reverted" and info["revert_verified"] is True, info
    assert info["revert_proofs"]["nft"] == "the change's delta is gone from the kernel's state"
    assert info["revert_proofs"]["access"].startswith("access: a NEW SSH connection gets in")
    assert not info.get("revert_notes"), info["revert_notes"]
    assert fw.lab.new_login_ok()
    return info, log


def test_an_immediate_nft_revert_goes_back_from_the_snapshot_verified(fwlab: FwLab) -> None:
    fwlab.lab.srv_exec(["nft", "-f", "-"], input=ruleset(False))
    before = native(fwlab)
    env, tx = apply_change(fwlab)
    assert "10.99.0.1" in elements(fwlab) and "inet extra" in native(fwlab)
    _info, log = finish(fwlab, env, tx)
    assert SNAPSHOT_WAY in log
    assert native(fwlab) == before, "the nft tables are not the ones from before the change"


def test_another_nft_writer_after_the_change_takes_the_merge_and_stays(fwlab: FwLab) -> None:
    fwlab.lab.srv_exec(["nft", "-f", "-"], input=ruleset(False))
    env, tx = apply_change(fwlab)
    log_path = fwlab.state_dir / "tx" / tx / "guard.log"
    deadline = time.monotonic() + 30     # the guard's capture after the change, then the other
    while "touched:" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "touched:" in log_path.read_text()
    fwlab.lab.srv_exec(["nft", "add", "element", "inet", "fw", "blocked", "{", "10.8.8.8", "}"])
    _info, log = finish(fwlab, env, tx)
    assert SNAPSHOT_WAY not in log
    now = elements(fwlab)
    assert "10.8.8.8" in now, "the other writer's element is gone"
    assert "10.99.0.1" not in now and "10.50.0.1" in now and len(now) == 2001
    assert "inet extra" not in native(fwlab), "the change's table stayed"
