"""What the round trip of fwsafe.backends.fidelity compares, and which tables a change can
write (fwsafe.control.refusals.touchable_tables); the round trip itself runs in the lab
(tests/lab/test_revert_proven.py, case 5)."""

from __future__ import annotations

import pytest

from fwsafe.backends.fidelity import blocks
from fwsafe.control.refusals import touchable_tables
from fwsafe.core.change import Change

LIVE = """table ip filter {
\tset blk {
\t\ttype ipv4_addr
\t\telements = { 10.9.9.9 }
\t}

\tchain INPUT {
\t\ttype filter hook input priority filter; policy accept;
\t\tip saddr @blk drop
\t\ttcp dport 22  counter accept
\t}

\tchain f2b-sshd {
\t}
}
"""

ROUND_TRIP = """table ip filter {
\tchain INPUT {
\t\ttype filter hook input priority filter; policy accept;
\t\tcounter drop
\t\ttcp dport 22 counter accept
\t}

\tchain FORWARD {
\t\ttype filter hook forward priority filter; policy accept;
\t}

\tchain f2b-sshd {
\t}
}
"""


def test_blocks_by_name_with_rules_in_order_and_whitespace_collapsed() -> None:
    live = blocks(LIVE)
    assert live == {
        "set blk {": ("type ipv4_addr", "elements = { 10.9.9.9 }"),
        "chain INPUT {": ("type filter hook input priority filter; policy accept;",
                          "ip saddr @blk drop", "tcp dport 22 counter accept"),
        "chain f2b-sshd {": (),
    }


def test_an_empty_accepting_base_chain_is_left_out_a_lossy_rule_is_not() -> None:
    trip = blocks(ROUND_TRIP)
    assert "chain FORWARD {" not in trip   # iptables-nft creates built-in chains when used
    assert trip != blocks(LIVE)
    fixed = ROUND_TRIP.replace("counter drop", "ip saddr @blk drop")
    assert blocks(fixed) != blocks(LIVE)   # the set is still missing
    assert blocks(LIVE.replace("\tset blk {\n\t\ttype ipv4_addr\n\t\telements = { 10.9.9.9 }\n"
                               "\t}\n\n", "")) == blocks(fixed)


def test_a_dropping_empty_base_chain_counts() -> None:
    text = ("table ip filter {\n\tchain OUTPUT {\n\t\ttype filter hook output priority filter; "
            "policy drop;\n\t}\n}\n")
    assert blocks(text) == {"chain OUTPUT {": (
        "type filter hook output priority filter; policy drop;",)}


def test_the_tables_a_change_can_write() -> None:
    ipt = Change(layers={"ipv4": b"*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"})
    assert touchable_tables(ipt, "ipv4") == {"nat"}
    assert touchable_tables(ipt, "ipv6") == set()
    assert touchable_tables(Change(run=["ufw", "allow", "80"]), "ipv6") is None
    assert touchable_tables(Change(layers={"ufw": b""}), "ipv4") is None
    nft = Change(layers={"nft": b"table inet x {\n}\n"})
    assert touchable_tables(nft, "ipv4") == set()
    assert touchable_tables(Change(layers={"nft": b"flush   ruleset\n"}), "ipv4") is None


def test_a_host_that_changes_nf_tables_at_every_reading_is_not_called_lossy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Readings taken at different moments would tell another program's changes for losses:
    after 5 tries the test says it could not be made (the apply is refused as "cannot tell"),
    never "lossy". The tools are stubbed: a unit test touches no firewall."""
    from fwsafe.backends import fidelity

    counter = iter(range(1000))
    monkeypatch.setattr(fidelity.nflist, "kernel_tables", lambda: [("ip", "filter")])
    monkeypatch.setattr(fidelity.nflist, "generation", lambda: next(counter))
    monkeypatch.setattr(fidelity, "_save", lambda name: b"*filter\nCOMMIT\n")
    monkeypatch.setattr(fidelity, "_list", lambda prefix, family, table: {str(next(counter)): ()})
    monkeypatch.setattr(fidelity, "_live_digests", lambda family: {})
    monkeypatch.setattr(fidelity, "_round_trip",
                        lambda name, text, tables, live: {t: {"other": ()} for t in tables})
    with pytest.raises(fidelity.FidelityError, match="could not be compared"):
        fidelity.lossy_tables("ipv4", ["filter"])


def test_a_rule_s_digest_leaves_out_only_the_counter_s_values() -> None:
    """nflist.digests compares two copies of the same rules: a counter's packets and bytes
    differ between them and are cut out; every other expression's data stays compared."""
    import struct

    from fwsafe.backends import nflist

    def attr(kind: int, payload: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)

    def expr(name: bytes, data: bytes) -> bytes:
        return attr(1, attr(1, name + b"\0") + attr(0x8002, data))

    def counter(packets: int) -> bytes:
        return expr(b"counter", attr(1, struct.pack(">Q", packets * 60)) +
                    attr(2, struct.pack(">Q", packets)))

    verdict = expr(b"immediate", attr(1, b"\x00\x00\x00\x00"))
    other = expr(b"immediate", attr(1, b"\x00\x00\x00\x01"))
    assert nflist._expressions(counter(0) + verdict) == nflist._expressions(counter(7) + verdict)
    assert nflist._expressions(counter(0) + verdict) != nflist._expressions(counter(0) + other)
    assert nflist._expressions(verdict) != nflist._expressions(counter(0) + verdict)
