"""Issue 27: the fidelity test's memory (fwsafe.core.fidelity_proofs). With the real kernel,
tools and `fwsafe` in a lab: the first apply round-trips ip filter and remembers its digest;
after a revert the host is back in that state, and the same apply again skips the round trip
(its record says so) and still succeeds; a native nft rule written into ip filter changes the
digest, so the round trip runs again and the apply is refused (exit 3, nothing changed),
exactly as without the memory."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fwsafe.core.fidelity_proofs import PROOFS_FILE
from fwsafe.lab import normalize_save
from tests import neighbours
from tests.conftest import FwLab
from tests.lab.test_revert_proven import run_apply

pytestmark = pytest.mark.lab

SKIPPED = "iptables-save round trip skipped for ip filter"
CHANGE_RULE = "-A INPUT -p tcp --dport 8080 -j DROP"


def live(fw: FwLab) -> str:
    return normalize_save(fw.lab.srv_exec(["iptables-save"]).stdout)


def notes(fw: FwLab, tx_id: str) -> list[str]:
    record = json.loads((fw.state_dir / "tx" / tx_id / "record.json").read_text())
    found: list[str] = record["notes"]
    print(f"\nnotes of {tx_id}: {found}")
    return found


def proven(fw: FwLab) -> list[list[str]]:
    entries: list[list[str]] = json.loads((fw.state_dir / PROOFS_FILE).read_text())["proven"]
    return entries


def apply_and_revert(fw: FwLab, change: str) -> dict[str, Any]:
    result = run_apply(fw, change, timeout=60)
    assert result.returncode == 0, result.stderr
    armed: dict[str, Any] = json.loads(result.stdout)
    assert "--dport 8080 -j DROP" in live(fw)
    reverted = fw.fw("revert")      # exit 4: the change was reverted
    assert reverted.returncode == 4 and "back in force" in reverted.stderr, reverted.stderr
    assert fw.status()["state"] == "reverted"
    return armed


def test_a_proven_table_is_not_round_tripped_again_until_its_digest_changes(
        fwlab: FwLab) -> None:
    before = live(fwlab)
    change = neighbours.with_rule(before, CHANGE_RULE)

    first = apply_and_revert(fwlab, change)
    assert not any(SKIPPED in note for note in notes(fwlab, first["id"]))
    remembered = proven(fwlab)
    assert [entry[:2] for entry in remembered] == [["ip", "filter"]], remembered
    assert live(fwlab) == before

    second = apply_and_revert(fwlab, change)
    assert any(SKIPPED in note for note in notes(fwlab, second["id"]))
    assert proven(fwlab) == remembered
    assert live(fwlab) == before

    fwlab.lab.srv_exec(["nft", "add", "rule", "ip", "filter", "INPUT", "ip", "saddr",
                        "192.0.2.1", "drop"])
    lossy = live(fwlab)
    native = fwlab.lab.srv_exec(["nft", "-s", "list", "table", "ip", "filter"]).stdout
    result = run_apply(fwlab, change, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "table ip filter holds what iptables-nft cannot show" in result.stderr
    assert live(fwlab) == lossy
    assert fwlab.lab.srv_exec(["nft", "-s", "list", "table", "ip", "filter"]).stdout == native
    assert fwlab.status()["id"] == second["id"]     # no transaction started
    assert proven(fwlab) == remembered
