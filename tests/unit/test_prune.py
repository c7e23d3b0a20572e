"""fwsafe.check.prune: which rules the sandbox may leave out, and that lines keep their
numbers."""

from __future__ import annotations

from fwsafe.check.prune import AddressSet, prune_iptables, prune_nft, rewrites_addresses

SANDBOX = AddressSet.of(["10.0.0.1", "10.0.0.2", "192.168.5.9/24", "fd00::1", "fd00::2"])


def kept(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def ipt(*rules: str) -> str:
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", *rules, "COMMIT", ""])


def test_address_set_meets() -> None:
    assert SANDBOX.meets("10.0.0.1", 4)
    assert SANDBOX.meets("10.0.0.0/8", 4)             # a network that holds a client
    assert SANDBOX.meets("192.168.5.200/32", 4)       # inside a host subnet given whole
    assert not SANDBOX.meets("198.51.100.7/32", 4)
    assert SANDBOX.meets("198.51.100.7,10.0.0.2", 4)  # any element of a list
    assert SANDBOX.meets("example.org", 4)            # unreadable: keep
    assert SANDBOX.meets("127.0.0.1", 4) and SANDBOX.meets("fe80::1", 6)
    assert not SANDBOX.meets("2001:db8::1/128", 6)
    assert SANDBOX.meets("fd00::/64", 6)
    assert SANDBOX.meets("10.0.0.1", 6)               # the wrong family: keep


def test_iptables_leaves_out_one_shape_and_keeps_lines() -> None:
    text = ipt("-A INPUT -s 198.51.100.1/32 -p tcp --dport 22 -j DROP",
               "-A INPUT -s 198.51.100.2/32 -p tcp --dport 22 -j DROP",
               "-A INPUT -s 198.51.100.3/32 -p tcp --dport 22 -j ACCEPT",   # another shape
               "-A INPUT -s 10.0.0.1/32 -p tcp --dport 22 -j DROP",        # the client
               "-A INPUT ! -s 198.51.100.4/32 -j DROP",                    # negated
               '-A INPUT -s 198.51.100.5/32 -m comment --comment "x" -j DROP',  # quoted
               "-A INPUT -d 203.0.113.9/32 -j DROP",
               "-A INPUT -d 203.0.113.10/32 -j DROP",
               "[5:300] -A INPUT -s 198.51.100.6/32 -p tcp --dport 22 -j DROP")  # counters
    pruned = prune_iptables(text, SANDBOX, 4)
    assert len(pruned.text.split("\n")) == len(text.split("\n"))
    assert pruned.left_out == 3
    lines = pruned.text.split("\n")
    assert lines[3] == "" and lines[9] == "" and lines[10] == ""
    assert "198.51.100.1/32" in lines[2] and "198.51.100.3/32" in lines[4]
    assert "-d 203.0.113.9/32" in lines[8]


def test_iptables_positional_table_is_left_alone() -> None:
    text = ipt("-A INPUT -s 198.51.100.1/32 -j DROP", "-A INPUT -s 198.51.100.2/32 -j DROP",
               "-I INPUT 1 -s 198.51.100.3/32 -j DROP")
    assert prune_iptables(text, SANDBOX, 4).left_out == 0


def test_both_address_options_must_be_possible() -> None:
    text = ipt("-A INPUT -s 10.0.0.2/32 -d 198.51.100.1/32 -j DROP",
               "-A INPUT -s 10.0.0.2/32 -d 198.51.100.2/32 -j DROP")
    assert prune_iptables(text, SANDBOX, 4).left_out == 1


def test_nft_rules() -> None:
    text = "\n".join([
        "table inet t {",
        "\tset s {",
        "\t\ttype ipv4_addr",
        "\t\telements = { 198.51.100.1 }",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority 0; policy accept;",
        "\t\tip saddr 198.51.100.1 tcp dport 22 drop",
        "\t\tip saddr 198.51.100.2 tcp dport 22 drop",
        "\t\tip saddr 10.0.0.1 tcp dport 22 drop",
        "\t\tip saddr != 198.51.100.3 drop",
        "\t\tip saddr { 198.51.100.4, 198.51.100.5 } drop",
        "\t\tip saddr @s drop",
        '\t\tiifname "eth0" ip saddr 198.51.100.6 tcp dport 22 drop',
        "\t\tip6 daddr 2001:db8::1 drop",
        "\t\tip6 daddr 2001:db8::2 drop",
        "\t\tip saddr 198.51.100.7 tcp dport 22 drop",
        "\t}",
        "}",
        ""])
    pruned = prune_nft(text, SANDBOX)
    lines = pruned.text.split("\n")
    assert len(lines) == len(text.split("\n"))
    assert pruned.left_out == 3
    assert lines[8] == "" and lines[15] == "" and lines[16] == ""
    assert lines[3] == text.split("\n")[3]          # sets are not chains
    assert kept(pruned.text)[-2:] == ["\t}", "}"]


def test_address_rewrites_switch_pruning_off() -> None:
    assert rewrites_addresses(["-A PREROUTING -p tcp -j DNAT --to-destination 10.9.9.9:22"])
    assert rewrites_addresses(["\t\ttcp dport 22 dnat ip to 10.9.9.9"])
    assert not rewrites_addresses(["-A POSTROUTING -j MASQUERADE --to-ports 1024-2000",
                                   "\t\tmasquerade"])


def test_warm_analyses_ahead_and_pruning_gives_the_same() -> None:
    from fwsafe.check import prune

    text = ipt(*(f"-A INPUT -s 198.51.{i // 250}.{i % 250 + 1}/32 -j DROP" for i in range(300)))
    cold = prune_iptables(text, SANDBOX, 4)
    prune._CACHE.clear()
    prune.warm({"ipv4": (text.encode(), "x.rules")})
    assert any(key[2] == text for key in prune._CACHE)
    assert prune_iptables(text, SANDBOX, 4) == cold and cold.left_out == 299


def test_overlap_by_bisection_agrees_with_every_pair() -> None:
    """AddressSet merges its spans and bisects: the same answers as comparing every pair."""
    import ipaddress
    import random

    rng = random.Random(15)
    for _ in range(200):
        nets = [ipaddress.ip_network(f"10.{rng.randrange(4)}.{rng.randrange(256)}.0/"
                                     f"{rng.choice((16, 22, 24, 30, 32))}", strict=False)
                for _ in range(rng.randrange(1, 8))]
        found = AddressSet(nets)
        spans = [(int(n.network_address), int(n.broadcast_address)) for n in nets]
        for _ in range(50):
            ranges = tuple(sorted((lo, lo + rng.choice((0, 255, 4095)))
                                  for lo in (int(ipaddress.ip_address("10.0.0.0"))
                                             + rng.randrange(4 << 16) for _ in range(2))))
            naive = any(first <= hi and lo <= last for first, last in ranges for lo, hi in spans)
            assert found.overlaps(4, ranges) is naive
            assert found.may_match(((4, ranges), None)) is naive
    assert AddressSet([]).overlaps(6, ((0, 1 << 100),)) is False



def test_nft_one_address_shortcut_agrees_with_the_full_analysis(monkeypatch) -> None:
    """`ip saddr A/N REST` with no other address in REST is read by one regular expression;
    every line reads the same as through the general analysis."""
    import re

    from fwsafe.check import prune

    rules = [
        "ip saddr 198.51.100.1 tcp dport 22 drop",
        "ip saddr 10.0.0.0/8 tcp dport 22 accept",
        "ip daddr 198.51.100.9 counter drop",
        "ip saddr 198.51.100.1 ip daddr 10.0.0.1 drop",
        "ip saddr 198.51.100.1 ip6 daddr fd00::9 drop",
        "ip saddr 300.1.1.1 drop",
        "ip saddr 10.1.2.3/33 drop",
        "ip saddr 10.1.2.3/24 drop",
        "ip saddr 10.1.2.3 tcp dport { 22, 80 } drop",
        "ip saddr 10.1.2.3 meta mark 0x1 jump other",
        "ip saddr 198.51.100.1,198.51.100.2 drop",
        "tcp dport 22 ip saddr 198.51.100.1 drop",
    ]
    lines = ["table ip t {", "\tchain c {", *(f"\t\t{r}" for r in rules), "\t}", "}", ""]
    fast = prune._nft_rules(lines)
    monkeypatch.setattr(prune, "_NFT_SIMPLE_LINE", re.compile(r"(?!)"))
    assert prune._nft_rules(lines) == fast
    assert [r.line - 2 for r in fast] == [0, 1, 2, 3, 4, 7, 9, 10, 11]   # {...}: never
