"""Issue 27: what the guard knows right after the change when nothing else committed since the
snapshot (fwsafe.guard.applying: change_commits, change_stamp, snapshot_touched). The revert
from the snapshot with the real kernel: tests/lab/test_revert_snapshot.py."""

from __future__ import annotations

import pytest

from fwsafe.backends.iptables import IptablesLayer
from fwsafe.core.revert import undone_already
from fwsafe.core.transaction import Record
from fwsafe.guard.applying import change_commits, change_stamp, snapshot_touched

TWO = (b"*filter\n:INPUT ACCEPT [0:0]\n:NEW - [0:0]\n-A INPUT -j NEW\nCOMMIT\n"
       b"*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
BEFORE = b"*filter\n:INPUT ACCEPT [0:0]\n:OLD - [0:0]\n-A INPUT -j OLD\nCOMMIT\n" \
         b"*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"


def record(**kw: object) -> Record:
    base: dict[str, object] = {"id": "t", "state": "pending", "created": 0.0, "timeout_s": 60.0,
                               "backend": "rules", "layers": ["ipv4"]}
    return Record(**{**base, **kw})  # type: ignore[arg-type]


def test_one_commit_per_table_block_of_each_iptables_file() -> None:
    assert change_commits(record(), {"ipv4": TWO}) == 2
    assert change_commits(record(layers=["ipv4", "ipv6"]), {"ipv4": TWO, "ipv6": TWO}) == 4
    twice = TWO + b"*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
    assert change_commits(record(), {"ipv4": twice}) == 3          # restored as written
    assert change_commits(record(options={"partial": True}), {"ipv4": twice}) == 2  # composed


def test_nothing_is_known_for_a_command_legacy_tables_or_files() -> None:
    assert change_commits(record(run=["ufw", "allow", "22"]), {}) is None
    assert change_commits(record(layers=["ipv4-legacy"]), {"ipv4-legacy": TWO}) is None
    assert change_commits(record(layers=["ufw"]), {"ufw": b""}) is None


NFT = (b"table inet fw {\n\tset blocked { type ipv4_addr; elements = { 10.0.0.1 } }\n}\n"
       b"add element inet f2b banned { 10.9.9.9 } # fail2ban's\n")


def test_an_nft_file_is_one_commit_when_each_statement_names_its_table() -> None:
    """One `nft -f` is one transaction (one commit), with the hatch in it or not, and beside
    an iptables file's commits; what it touches is the tables its statements name."""
    assert change_commits(record(layers=["nft"]), {"nft": NFT}) == 1
    assert change_commits(record(layers=["ipv4", "nft"]), {"ipv4": TWO, "nft": NFT}) == 3
    assert snapshot_touched(record(layers=["nft"]), {"nft": NFT}, {"nft": b""}) == {
        "nft": ["inet f2b", "inet fw"]}
    for unknown in (b"flush ruleset\n" + NFT, b'include "/etc/x.nft"\n',
                    b"define T = fw\nadd rule inet $T input drop\n", b"table inet x {\n"):
        assert change_commits(record(layers=["nft"]), {"nft": unknown}) is None


def test_a_snapshot_not_taken_at_the_stamp_before_the_load_gives_none() -> None:
    assert change_stamp(record(before_stamp=None), {"ipv4": TWO}, "b/1/5") is None
    assert change_stamp(record(before_stamp="b/1/4"), {"ipv4": TWO}, "b/1/5") is None


def test_what_the_revert_from_the_snapshot_puts_back() -> None:
    touched = snapshot_touched(record(), {"ipv4": TWO}, {"ipv4": BEFORE})["ipv4"]
    # every chain of each table the change loaded, the snapshot's, the change's and the
    # table's built-in ones; not mangle
    assert touched == sorted(["filter/", "filter/INPUT", "filter/FORWARD", "filter/OUTPUT",
                              "filter/NEW", "filter/OLD", "nat/", "nat/PREROUTING", "nat/INPUT",
                              "nat/OUTPUT", "nat/POSTROUTING"])


def test_a_table_created_with_undeclared_builtin_chains_is_not_taken_as_undone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`*raw` / `-A PREROUTING ... -j DROP` / `COMMIT` loads (built-in chains need no
    declaration): what a revert from the snapshot touches names PREROUTING, so a retried
    revert does not find "every touched unit as in the snapshot" while the DROP is live (the
    review's finding: touched was only `raw/`, which no unit compares)."""
    before = b"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    change = b"*raw\n-A PREROUTING -p tcp --dport 22 -j DROP\nCOMMIT\n"
    live = before + (b"*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                     b"-A PREROUTING -p tcp -m tcp --dport 22 -j DROP\nCOMMIT\n")
    touched = snapshot_touched(record(), {"ipv4": change}, {"ipv4": before})
    assert {"raw/PREROUTING", "raw/OUTPUT", "raw/"} <= set(touched["ipv4"])
    # a rule in a user chain of the kernel's, by iptables-restore's long option: named too
    spelled = b"*mangle\n--append KEEP -j MARK --set-mark 1\nCOMMIT\n"
    assert "mangle/KEEP" in snapshot_touched(record(), {"ipv4": spelled}, {"ipv4": before})["ipv4"]
    monkeypatch.setattr(IptablesLayer, "capture", lambda _self, *_a, **_k: live)
    assert not undone_already(touched, {"ipv4": before})
    monkeypatch.setattr(IptablesLayer, "capture", lambda _self, *_a, **_k: before)
    assert undone_already(touched, {"ipv4": before})


def test_a_revert_found_finished_is_recorded_with_its_proofs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's next attempt and recover take up a revert that ended before it could say so
    by one path (fwsafe.core.revert.finished_revert): the record says who, the note, each
    layer's proof and the access proof, as after any revert (the guard once set only
    `reverted_by`)."""
    from pathlib import Path

    from fwsafe.core.revert import ALREADY_UNDONE, finished_revert, record_revert

    touched = snapshot_touched(record(), {"ipv4": TWO}, {"ipv4": BEFORE})
    asked: list[object] = []

    def access(known: object) -> tuple[bool | None, str]:
        asked.append(known)
        return True, "the SSH clients get in (kernel verdict)"

    monkeypatch.setattr(IptablesLayer, "capture", lambda _self, *_a, **_k: BEFORE + TWO)
    assert finished_revert(touched, {"ipv4": BEFORE}, access, lambda _m: None) is None
    assert not asked                                     # not undone: the revert runs as usual
    monkeypatch.setattr(IptablesLayer, "capture", lambda _self, *_a, **_k: BEFORE)
    said: list[str] = []
    result = finished_revert(touched, {"ipv4": BEFORE}, access, said.append)
    assert result is not None and len(asked) == 1
    done = record()
    record_revert(done, result, "guard")
    assert done.reverted_by == "guard" and done.revert_notes == [ALREADY_UNDONE]
    assert set(done.revert_proofs) == {"ipv4", "access"} and done.revert_verified is True
    assert said[-1] == "the SSH clients get in (kernel verdict)"
    unknown = finished_revert(touched, {"ipv4": BEFORE}, None, said.append)
    assert unknown is not None and unknown.access is None and not unknown.verified
    # both callers use it; neither builds the result itself
    fwsafe = Path(__file__).resolve().parents[2] / "fwsafe"
    for caller in ("guard/process.py", "core/recover.py"):
        text = (fwsafe / caller).read_text()
        assert "finished_revert(" in text and "ALREADY_UNDONE" not in text, caller
