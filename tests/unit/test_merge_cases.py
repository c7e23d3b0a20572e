"""Issue 22's merge cases, each as the user saw it: the change's own rules must be gone after a
revert whatever others did meanwhile, and what others did must stay."""

from __future__ import annotations

from fwsafe.backends.iptables import three_way_undo
from fwsafe.backends.iptsave import parse_ruleset
from fwsafe.backends.nftables import merge_block, parse_block, set_parts
from fwsafe.core.merge import delta_left, merge_sequences, target_count

X = "-A INPUT -p tcp --dport 22 -j DROP"          # the change's rule


def test_case1_others_reappend_one_of_their_rules() -> None:
    """`iptables -D` then `-A` by another program moved its rule after the change's."""
    assert merge_sequences(["B"], ["B", X], [X, "B"]) == ["B"]
    assert merge_sequences(["A", "B", "C"], ["A", X, "B", "C"], ["A", X, "C", "B"]) \
        == ["A", "C", "B"]


def test_case8_reorder_then_others_delete() -> None:
    assert merge_sequences(["b", "a"], ["a", "b"], []) == []
    assert merge_sequences(["b", "a"], ["a", "b"], ["a"]) == ["a"]
    assert merge_sequences(["b", "a"], ["a", "b"], ["a", "b", "c"]) == ["b", "a", "c"]


def test_a_moved_rule_with_no_anchor_left_stays_where_it_is() -> None:
    """The change reversed the chain and added a rule; others deleted the moved rule's
    neighbours and appended their own. Found by a random search (the order property failed
    once in CI's 2,000 examples): the second revert put b1 after o2, the first before it."""
    before, after = ["b0", "b1", "b2"], ["b2", "b1", "b0", "c1"]
    first = merge_sequences(before, after, ["b1", "c1", "o2"])
    assert first == ["b1", "o2"]
    assert merge_sequences(before, after, first) == first
    before, after = ["b0", "b1", "b2"], ["b2", "b0", "b1", "c0"]
    first = merge_sequences(before, after, ["b2", "c0", "o1"])
    assert first == ["b2", "o1"] and merge_sequences(before, after, first) == first


def test_removed_rules_come_back_before_their_successor() -> None:
    """Bans before RETURN: a re-created fail2ban chain gets the old bans above its RETURN."""
    assert merge_sequences(["ban1", "ban2", "RET"], [], ["RET"]) == ["ban1", "ban2", "RET"]
    assert merge_sequences(["ban1", "ban2", "RET"], [], ["ban3", "RET"]) \
        == ["ban3", "ban1", "ban2", "RET"]


def test_no_duplicate_of_a_rule_others_re_added() -> None:
    assert merge_sequences(["J", "A"], ["A"], ["J", "A"]) == ["J", "A"]
    assert merge_sequences(["A", "J"], ["A"], ["J", "A"]) == ["J", "A"]   # theirs to place


def test_reverting_a_reverted_state_changes_nothing() -> None:
    """The second revert used to put back the change's removals again (duplicates)."""
    before, after = ["A", "B", "C"], ["A", X, "C"]
    once = merge_sequences(before, after, ["Q", "A", X, "C"])
    assert once == ["Q", "A", "B", "C"]
    assert merge_sequences(before, after, once) == once
    assert merge_sequences(before, after, before) == before
    assert merge_sequences(["a"], ["a", "a"], ["a"]) == ["a"]    # a duplicate the change added


def test_target_count_rules() -> None:
    assert target_count(0, 1, 1) == 0        # the change's addition goes
    assert target_count(0, 1, 2) == 1        # others added the same: theirs stays
    assert target_count(1, 2, 1) == 1        # already reverted: nothing changes
    assert target_count(1, 0, 0) == 1        # the change's removal comes back
    assert target_count(1, 0, 1) == 1        # others re-added it: no duplicate
    assert target_count(2, 1, 0) == 1        # others deleted the one left: not resurrected


HEAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
JUMP = "-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd"
BAN = "-A f2b-sshd -s 10.0.0.{} -j REJECT --reject-with icmp-port-unreachable"
RETURN = "-A f2b-sshd -j RETURN"


def _merge(before: str, after: str, live: str) -> str:
    old, new, now = (parse_ruleset(t).get("filter") for t in (before, after, live))
    return three_way_undo("filter", old, new, now).text()


def _table(*lines: str, chain: bool = True) -> str:
    return HEAD + (":f2b-sshd - [0:0]\n" if chain else "") + "".join(
        f"{line}\n" for line in lines) + "COMMIT\n"


def test_case7_fail2ban_recreates_its_chain_in_the_window() -> None:
    """A forced change deleted f2b-sshd; fail2ban re-created it (jump at the top of INPUT,
    an empty chain with RETURN) before the revert: one jump, old bans above RETURN."""
    accept = "-A INPUT -p tcp --dport 22 -j ACCEPT"
    before = _table(JUMP, accept, BAN.format("50/32"), BAN.format("51/32"), RETURN)
    after = _table(X, chain=False)
    live = _table(JUMP, X, BAN.format("52/32"), RETURN)
    got = _merge(before, after, live)
    assert got == parse_ruleset(_table(JUMP, accept, BAN.format("52/32"), BAN.format("50/32"),
                                       BAN.format("51/32"), RETURN))["filter"].text()
    assert got.count("-j f2b-sshd") == 1


def test_case8_chain_deleted_by_its_owner_is_not_an_orphan() -> None:
    """The change edited f2b-sshd; fail2ban then stopped (chain and jump gone): no orphan
    chain holding a stale ban and no RETURN."""
    before = _table(JUMP, BAN.format("50/32"), RETURN)
    after = _table(JUMP, RETURN)
    live = _table(chain=False)
    got = _merge(before, after, live)
    assert "f2b-sshd" not in got


NFT_SET = """table inet blocker {
\tset blk {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { %s }
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tip saddr @blk tcp dport 22 drop
\t}
}"""


def test_case3_nft_set_elements_merged_one_by_one() -> None:
    """The change adds the client's address to a set used by a drop rule; another program
    adds one meanwhile. Short list: one `elements` line, the change's element gone; wrapped
    list: no syntax error, so no fall back that loses the other program's element."""
    short = merge_block(NFT_SET % "10.0.0.1", NFT_SET % "10.0.0.1, 10.0.0.9",
                        NFT_SET % "10.0.0.1, 10.0.0.5, 10.0.0.9")
    assert short == NFT_SET % "10.0.0.1, 10.0.0.5"
    wrapped = ",\n\t\t\t     ".join(f"10.0.1.{i}, 10.0.1.{i + 1}" for i in range(1, 20, 2))
    live = wrapped.replace("10.0.1.1, ", "10.0.0.9, 10.0.1.1, 10.0.2.7, ")
    got = merge_block(NFT_SET % wrapped, NFT_SET % ("10.0.0.9, " + wrapped), NFT_SET % live)
    assert got is not None
    assert set_parts(parse_block(got)[2]["\tset blk {"])[1] == (
        ["10.0.1.1", "10.0.2.7"] + [f"10.0.1.{i}" for i in range(2, 21)])


def test_delta_proof_on_the_kernel_state() -> None:
    """The revert's first proof (delta_left), independent of the merge's prediction."""
    before, after = {"c": ["A", "B"]}, {"c": ["A", X]}
    assert delta_left(before, after, {"c": ["A", X, "D"]}, {"c": ["A", "B", "D"]}) == []
    left = delta_left(before, after, {"c": ["A", X]}, {"c": [X, "A"]})
    assert left == ["c: `-A INPUT -p tcp --dport 22 -j DROP` (added by the change) is still there",
                    "c: `B` (removed by the change) is not back"]
    # others added the same rule meanwhile: one copy is theirs
    assert delta_left(before, after, {"c": ["A", X, X]}, {"c": ["A", "B", X]}) == []
    # others deleted the chain the change edited: nothing to bring back
    assert delta_left(before, after, {}, {}) == []
