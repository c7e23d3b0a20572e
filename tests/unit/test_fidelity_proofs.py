"""The fidelity test's memory: the file it lives in (fwsafe.core.fidelity_proofs), the key
(the table's digest with the identity of the iptables tools: fwsafe.backends.fidelity
.tools_identity) and what lossy_tables does with it. The kernel's side (nf_tables' generation,
the digests, the round trip in a scratch namespace) is stubbed as in test_fidelity.py: a unit
test touches no firewall; the lab proves it with the real kernel
(tests/lab/test_fidelity_proven.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fwsafe.backends import FidelityProofs, ProofKey, fidelity
from fwsafe.core.fidelity_proofs import (
    MAX_PROOFS,
    PROOFS_FILE,
    PROOFS_FORMAT,
    read_proofs,
    remember_proofs,
)
from fwsafe.core.statedir import StateDir


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    tmp_path.chmod(0o700)
    found = StateDir(tmp_path / "state")
    found.ensure()
    return found


def key(n: int) -> ProofKey:
    return ("ip", "filter", f"{n:064x}", "1:2:3:4 1:2:3:4")


def test_remembered_proofs_read_back_newest_last_in_a_private_file(state: StateDir) -> None:
    assert read_proofs(state) == []
    remember_proofs(state, [key(1), key(2)])
    remember_proofs(state, [key(3), key(1)])   # proven again: the newest again
    assert read_proofs(state) == [key(2), key(3), key(1)]
    path = state.root / PROOFS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_bytes())["format"] == PROOFS_FORMAT


def test_only_the_newest_proofs_are_kept(state: StateDir) -> None:
    remember_proofs(state, [key(n) for n in range(50)])
    remember_proofs(state, [key(n) for n in range(50, 100)])
    assert read_proofs(state) == [key(n) for n in range(100 - MAX_PROOFS, 100)]


@pytest.mark.parametrize("content", [
    b"", b"{", b"\xff\xfe", b"[]", b"null",
    json.dumps({"format": PROOFS_FORMAT + 1, "proven": [list(key(1))]}).encode(),
    json.dumps({"proven": [list(key(1))]}).encode(),
    json.dumps({"format": PROOFS_FORMAT, "proven": {"a": 1}}).encode(),
    json.dumps({"format": PROOFS_FORMAT, "proven": [["ip", "filter", "ab"]]}).encode(),
    json.dumps({"format": PROOFS_FORMAT, "proven": [["ip", "filter", "", "t"]]}).encode(),
    json.dumps({"format": PROOFS_FORMAT, "proven": [["ip", "filter", 7, "t"]]}).encode(),
    json.dumps({"format": PROOFS_FORMAT, "proven": [list(key(1)), "x"]}).encode(),
])
def test_a_damaged_or_foreign_file_reads_as_empty_and_is_replaced(state: StateDir,
                                                                   content: bytes) -> None:
    path = state.root / PROOFS_FILE
    path.write_bytes(content)
    assert read_proofs(state) == []
    remember_proofs(state, [key(2)])
    assert read_proofs(state) == [key(2)]


def test_a_symlink_or_a_directory_is_never_read_and_a_symlink_never_written_through(
        state: StateDir, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"format": PROOFS_FORMAT, "proven": [list(key(1))]}))
    path = state.root / PROOFS_FILE
    path.symlink_to(elsewhere)
    assert read_proofs(state) == []
    remember_proofs(state, [key(2)])
    assert not path.is_symlink() and read_proofs(state) == [key(2)]
    assert json.loads(elsewhere.read_text())["proven"] == [list(key(1))]
    path.unlink()
    path.mkdir()
    assert read_proofs(state) == []
    remember_proofs(state, [key(3)])     # cannot replace a directory: left, no error
    assert read_proofs(state) == []


def test_an_unreadable_file_reads_as_empty(state: StateDir) -> None:
    path = state.root / PROOFS_FILE
    path.write_bytes(b"x" * 100_000)    # too large to be ours
    assert read_proofs(state) == []


# -- the key and lossy_tables ---------------------------------------------------------------

def fake_tools(directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    for tool in ("iptables-save", "iptables-restore"):
        path = directory / tool
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)


class Kernel:
    """nf_tables as the stubs show it: one generation, these digests, a round trip whose
    scratch digests are the live ones (counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, text: bytes,
                 digests: dict[str, str]) -> None:
        self.trips: list[list[str]] = []
        self.digests = digests
        monkeypatch.setattr(fidelity.nflist, "kernel_tables",
                            lambda: [("ip", t) for t in digests])
        monkeypatch.setattr(fidelity.nflist, "generation", lambda: 7)
        monkeypatch.setattr(fidelity, "_save", lambda name: text)
        monkeypatch.setattr(fidelity, "_live_digests", lambda family: dict(self.digests))
        monkeypatch.setattr(fidelity, "_round_trip", self.round_trip)

    def round_trip(self, name: str, text: bytes, tables: list[str], sums: object
                   ) -> dict[str, None]:
        self.trips.append(list(tables))
        return {t: None for t in tables}


TEXT = b"*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bin"
    fake_tools(directory)
    monkeypatch.setenv("PATH", str(directory))
    return directory


def test_a_table_proven_with_the_same_tools_is_not_tried_again(
        monkeypatch: pytest.MonkeyPatch, tools: Path) -> None:
    kernel = Kernel(monkeypatch, TEXT, {"filter": "d1", "nat": "d2"})
    first = FidelityProofs()
    assert fidelity.lossy_tables("ipv4", ["filter", "nat"], proofs=first) == []
    assert kernel.trips == [["filter", "nat"]] and first.skipped == []
    identity = fidelity.tools_identity("ipv4")
    assert identity is not None
    assert sorted(first.found) == [("ip", "filter", "d1", identity), ("ip", "nat", "d2", identity)]

    again = FidelityProofs(known=frozenset(first.found))
    assert fidelity.lossy_tables("ipv4", ["filter", "nat"], proofs=again) == []
    assert kernel.trips == [["filter", "nat"]], "a proven table was round-tripped again"
    assert again.skipped == ["ip filter", "ip nat"] and again.found == []

    kernel.digests["nat"] = "d3"            # nat changed since: it alone is tried
    changed = FidelityProofs(known=frozenset(first.found))
    assert fidelity.lossy_tables("ipv4", ["filter", "nat"], proofs=changed) == []
    assert kernel.trips[-1] == ["nat"]
    assert changed.skipped == ["ip filter"] and changed.found == [("ip", "nat", "d3", identity)]


def test_a_changed_tool_proves_nothing_it_did_not_prove(
        monkeypatch: pytest.MonkeyPatch, tools: Path) -> None:
    kernel = Kernel(monkeypatch, TEXT, {"filter": "d1"})
    first = FidelityProofs()
    fidelity.lossy_tables("ipv4", ["filter"], proofs=first)
    before = fidelity.tools_identity("ipv4")
    path = tools / "iptables-restore"      # upgraded: same path, another file
    path.unlink()
    path.write_text("#!/bin/sh\n# 1.8.10\n")
    path.chmod(0o755)
    assert fidelity.tools_identity("ipv4") != before
    upgraded = FidelityProofs(known=frozenset(first.found))
    fidelity.lossy_tables("ipv4", ["filter"], proofs=upgraded)
    assert len(kernel.trips) == 2 and upgraded.skipped == []
    os.utime(tools / "iptables-save", ns=(1, 1))      # touched: another identity again
    assert fidelity.tools_identity("ipv4") not in (before, upgraded.found[0][3])


def test_an_unknown_generation_proves_nothing(
        monkeypatch: pytest.MonkeyPatch, tools: Path) -> None:
    kernel = Kernel(monkeypatch, TEXT, {"filter": "d1"})
    monkeypatch.setattr(fidelity.nflist, "generation", lambda: None)
    unknown = FidelityProofs()
    fidelity.lossy_tables("ipv4", ["filter"], proofs=unknown)
    assert unknown.found == [] and len(kernel.trips) == 1


@pytest.mark.parametrize("line", [
    b"-A INPUT -m set --match-set blk src -j DROP",
    b"-A INPUT -p tcp -j SET --add-set seen src",
    b"-A INPUT -p tcp -j SET --del-set seen src",
])
def test_a_text_naming_ipsets_is_never_proven_nor_skipped(
        monkeypatch: pytest.MonkeyPatch, tools: Path, line: bytes) -> None:
    text = TEXT.replace(b"COMMIT", line + b"\nCOMMIT")
    kernel = Kernel(monkeypatch, text, {"filter": "d1"})
    proofs = FidelityProofs()
    fidelity.lossy_tables("ipv4", ["filter"], proofs=proofs)
    assert proofs.found == []
    identity = fidelity.tools_identity("ipv4")
    assert identity is not None
    known = FidelityProofs(known=frozenset({("ip", "filter", "d1", identity)}))
    fidelity.lossy_tables("ipv4", ["filter"], proofs=known)
    assert known.skipped == [] and len(kernel.trips) == 2
