"""The three-way merge behind the revert: undo the change's own delta, keep what others did."""

from __future__ import annotations

from fwsafe.backends.iptables import compose_partial, same_table, three_way_undo
from fwsafe.backends.iptsave import parse_ruleset
from fwsafe.backends.nftables import compose_partial as compose_nft
from fwsafe.backends.nftables import merge_block
from fwsafe.core.merge import merge_sequences, merge_value
from fwsafe.core.neighbours import deleted_neighbours, owner_of_chain, refusal_message


def test_docstring_example() -> None:
    assert merge_sequences("ABC", "AXC", "AXCD") == list("ABCD")


def test_fast_paths() -> None:
    assert merge_sequences("AB", "AXB", "AXB") == list("AB")        # nobody else acted
    assert merge_sequences("AB", "AB", "ZAB") == list("ZAB")        # the change did nothing


def test_added_rule_goes_even_when_others_moved_around_it() -> None:
    assert merge_sequences("ABC", "ABXC", "QABXCR") == list("QABCR")


def test_removed_rule_comes_back_after_its_predecessor() -> None:
    # the change removed B; others inserted Q at the top and R after C
    assert merge_sequences("ABC", "AC", "QACR") == list("QABCR")


def test_removed_rule_at_the_top_comes_back_before_its_successor() -> None:
    assert merge_sequences("ABC", "BC", "QBC") == list("QABC")


def test_rule_removed_by_others_stays_removed() -> None:
    # the change added X; fail2ban removed its jump J meanwhile: J is not brought back
    assert merge_sequences("JAB", "JXAB", "XAB") == list("AB")


def test_replaced_run_comes_back_where_the_changes_lines_stood() -> None:
    assert merge_sequences("ABCD", "AXYD", "AXYDE") == list("ABCDE")


def test_everything_replaced_with_others_appending() -> None:
    assert merge_sequences("AB", "XY", "XYD") == list("ABD")


def test_change_lines_gone_from_live_still_brings_back_the_old_ones() -> None:
    # the change replaced B by X; someone else deleted X already: B comes back after A
    assert merge_sequences("ABC", "AXC", "AC") == list("ABC")


def test_duplicates_are_matched_by_position() -> None:
    assert merge_sequences(["a", "a"], ["a", "a", "a"], ["a", "a", "a", "z"]) == ["a", "a", "z"]


def test_empty_live() -> None:
    assert merge_sequences("AB", "AX", "") == ["B"]


def test_merge_value() -> None:
    assert merge_value("ACCEPT", "DROP", "DROP") == "ACCEPT"     # the change's edit undone
    assert merge_value("ACCEPT", "DROP", "REJECT") == "REJECT"   # someone else's edit wins
    assert merge_value("ACCEPT", "ACCEPT", "DROP") == "DROP"


BEFORE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A INPUT -p tcp --dport 22 -j ACCEPT
-A f2b-sshd -s 10.0.0.50/32 -j REJECT --reject-with icmp-port-unreachable
-A f2b-sshd -j RETURN
COMMIT
"""


def _filter(text: str) -> str:
    return parse_ruleset(text)["filter"].text()


def _merge(before: str, after: str, live: str) -> str:
    old, new, now = (parse_ruleset(t).get("filter") for t in (before, after, live))
    return three_way_undo("filter", old, new, now).text()


def test_fail2ban_stopped_during_the_window() -> None:
    """The revert of INPUT used to fail with `Chain 'f2b-sshd' does not exist`."""
    after = BEFORE.replace("-A INPUT -p tcp --dport 22 -j ACCEPT",
                           "-A INPUT -p tcp --dport 22 -j DROP")
    live = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j DROP
COMMIT
"""
    assert _merge(BEFORE, after, live) == _filter("""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
""")


def test_fail2ban_ban_during_the_window_survives() -> None:
    after = BEFORE.replace("COMMIT", "-A INPUT -p tcp --dport 8080 -j DROP\nCOMMIT")
    ban = "-A f2b-sshd -s 10.0.0.51/32 -j REJECT --reject-with icmp-port-unreachable\n"
    live = after.replace("-A f2b-sshd -s 10.0.0.50", ban + "-A f2b-sshd -s 10.0.0.50")
    assert _merge(BEFORE, after, live) == _filter(BEFORE.replace(
        "-A f2b-sshd -s 10.0.0.50", ban + "-A f2b-sshd -s 10.0.0.50"))


def test_chain_the_change_deleted_comes_back_with_its_jump() -> None:
    after = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
"""
    assert _merge(BEFORE, after, after) == _filter(BEFORE)


def test_docker_networks_added_and_removed_during_a_forward_change() -> None:
    before = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
-A FORWARD -o br-old -j DOCKER
-A FORWARD -o br-old -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i br-old ! -o br-old -j ACCEPT
COMMIT
"""
    after = before.replace("COMMIT", "-A FORWARD -s 192.0.2.0/24 -j DROP\nCOMMIT")
    live = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
-A FORWARD -o br-new -j DOCKER
-A FORWARD -o br-new -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i br-new ! -o br-new -j ACCEPT
-A FORWARD -s 192.0.2.0/24 -j DROP
-A DOCKER -d 172.18.0.2/32 ! -i br-new -o br-new -p tcp -m tcp --dport 80 -j ACCEPT
COMMIT
"""
    merged = _merge(before, after, live)
    assert "br-old" not in merged                  # the removed network does not come back
    assert [ln for ln in merged.splitlines() if "br-new" in ln] == [
        ln for ln in live.splitlines() if "br-new" in ln]   # the new one keeps every rule
    assert "192.0.2.0/24" not in merged            # the change's own rule is gone


def test_policy_and_created_chain_undone() -> None:
    after = BEFORE.replace(":INPUT ACCEPT", ":INPUT DROP").replace(
        "COMMIT", ":NEW - [0:0]\n-A NEW -j ACCEPT\n-A INPUT -j NEW\nCOMMIT")
    # parse order: declarations after rules are still chains
    after = after.replace(":NEW - [0:0]\n", "").replace(":f2b-sshd - [0:0]",
                                                          ":f2b-sshd - [0:0]\n:NEW - [0:0]")
    assert _merge(BEFORE, after, after) == _filter(BEFORE)


def test_kept_jump_pulls_in_its_chain() -> None:
    """A rule kept from live that jumps to a chain the merge would drop keeps that chain."""
    after = BEFORE.replace("COMMIT", ":X - [0:0]\nCOMMIT").replace(":X - [0:0]\n", "")
    after = after.replace(":f2b-sshd - [0:0]", ":f2b-sshd - [0:0]\n:X - [0:0]")
    live = after.replace("-A INPUT -p tcp --dport 22 -j ACCEPT",
                         "-A INPUT -p tcp --dport 22 -j ACCEPT\n-A INPUT -p udp -j X")
    merged = parse_ruleset(_merge(BEFORE, after, live))["filter"]
    assert "X" in merged.chains and "-A INPUT -p udp -j X" in merged.chains["INPUT"].rules


def test_same_table_treats_missing_as_empty() -> None:
    empty = parse_ruleset("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")["raw"]
    assert same_table(None, empty) and same_table(empty, None)


def test_compose_partial_replaces_only_named_chains() -> None:
    partial = "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    composed = parse_ruleset(compose_partial(BEFORE.encode(), partial.encode()).decode())["filter"]
    assert composed.chains["INPUT"].policy == "DROP"
    assert composed.chains["INPUT"].rules == ["-A INPUT -p tcp --dport 22 -j ACCEPT"]
    assert composed.chains["f2b-sshd"].rules == parse_ruleset(BEFORE)["filter"].chains[
        "f2b-sshd"].rules


def test_compose_partial_counts_chains_that_only_get_rules() -> None:
    partial = "*filter\n-A INPUT -p tcp --dport 80 -j ACCEPT\nCOMMIT\n"
    composed = parse_ruleset(compose_partial(BEFORE.encode(), partial.encode()).decode())["filter"]
    assert composed.chains["INPUT"].policy == "ACCEPT"
    assert composed.chains["INPUT"].rules == ["-A INPUT -p tcp --dport 80 -j ACCEPT"]
    assert "f2b-sshd" in composed.chains


NFT_BEFORE = """table inet fw {
\tset blocked {
\t\ttype ipv4_addr
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport 22 accept
\t}
}"""


def test_nft_block_merge() -> None:
    after = NFT_BEFORE.replace("\t\ttcp dport 22 accept", "\t\ttcp dport 22 drop")
    live = after.replace("\t\ttcp dport 22 drop", "\t\ttcp dport 22 drop\n\t\tudp dport 53 accept")
    merged = merge_block(NFT_BEFORE, after, live)
    assert merged == NFT_BEFORE.replace("\t\ttcp dport 22 accept",
                                        "\t\ttcp dport 22 accept\n\t\tudp dport 53 accept")
    assert merge_block(None, NFT_BEFORE, NFT_BEFORE) is None   # created by the change: gone
    assert merge_block(NFT_BEFORE, None, None) == NFT_BEFORE   # deleted by it: back


def test_nft_compose_partial() -> None:
    out = compose_nft(b"table inet fw {\n}\n").decode()
    assert out.startswith("add table inet fw\ndelete table inet fw\n")


def test_neighbours_are_named() -> None:
    assert owner_of_chain("f2b-sshd") == "fail2ban"
    assert owner_of_chain("DOCKER-USER") == "Docker"
    assert owner_of_chain("KUBE-SERVICES") == "kube-proxy / Kubernetes"
    assert owner_of_chain("INPUT") is None
    stale = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    found = deleted_neighbours({"ipv4": stale.encode()}, {"ipv4": BEFORE.encode()}, False)
    assert [n.unit for n in found] == ["filter/f2b-sshd"]
    assert "fail2ban" in refusal_message(found) and "f2b-sshd" in refusal_message(found)
    assert deleted_neighbours({"ipv4": stale.encode()}, {"ipv4": BEFORE.encode()}, True) == []
    # a file that declares the chain keeps it
    assert deleted_neighbours({"ipv4": BEFORE.encode()}, {"ipv4": BEFORE.encode()}, False) == []


def test_nft_flush_ruleset_deletes_neighbours_tables() -> None:
    live = {"nft": b"table inet f2b-table {\n}\n", "ipv4": BEFORE.encode()}
    found = deleted_neighbours({"nft": b"flush ruleset\ntable inet fw {\n}\n"}, live, False)
    assert {n.unit for n in found} == {"inet f2b-table", "filter/f2b-sshd"}
