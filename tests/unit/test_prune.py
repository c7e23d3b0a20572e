"""fwsafe.check.prune: which rules the sandbox may leave out, and that lines keep their
numbers."""

from __future__ import annotations

from fwsafe.check import prune, prune_ports
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


# -- issue 27: the shapes real hosts have -----------------------------------------------------
CLIENT, SERVER = "10.0.0.1", "10.0.0.2"


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.split("\n") if needle in line]


def test_blocklist_with_varied_ports_is_pruned_but_the_clients_rule_kept() -> None:
    """Ports, targets' options and comments vary per rule: they are not part of the shape."""
    from bench.shapes import blocklist

    text = blocklist(3000, 0).replace(
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
        f'-A INPUT -s {CLIENT}/32 -p tcp -m tcp --dport 22 -m comment --comment "x" -j DROP\n'
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT")
    addresses = prune.sandbox_addresses([CLIENT, SERVER], [(text, 4)], [])
    assert addresses is not None
    pruned = prune_iptables(text, addresses, 4)
    assert _lines_with(pruned.text, f"-s {CLIENT}/32")           # the verdict-changing rule
    assert len(_lines_with(pruned.text, "-A INPUT")) <= 8           # a few shapes, not 3000
    assert pruned.left_out >= 2990


def _kube_with_ssh_service(pod: str) -> str:
    """bench's kube shape, plus a service on the server's own address and port 22 whose
    endpoint is `pod`: the client's SSH is translated away (a lockout)."""
    from bench.shapes import kube

    return kube(2000, 0).replace(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports",
        f"-A KUBE-SERVICES -d {SERVER}/32 -p tcp -m tcp --dport 22 -j KUBE-SVC-SSH\n"
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports").replace(
        ":KUBE-NODEPORTS - [0:0]",
        ":KUBE-NODEPORTS - [0:0]\n:KUBE-SVC-SSH - [0:0]\n:KUBE-SEP-SSH - [0:0]").replace(
        "-A KUBE-MARK-MASQ -j MARK",
        "-A KUBE-SVC-SSH -m statistic --mode random --probability 0.5 -j KUBE-SEP-SSH\n"
        f"-A KUBE-SEP-SSH -s {pod}/32 -j KUBE-MARK-MASQ\n"
        f"-A KUBE-SEP-SSH -p tcp -m tcp -j DNAT --to-destination {pod}:2222\n"
        "-A KUBE-MARK-MASQ -j MARK")


def test_kube_proxy_services_are_pruned_by_reachability_but_a_service_on_the_path_kept() -> None:
    pod = "10.244.9.9"
    text = _kube_with_ssh_service(pod)
    addresses = prune.sandbox_addresses([CLIENT, SERVER], [(text, 4)], [])
    assert addresses is not None
    assert addresses.meets(pod, 4)                    # the reachable DNAT widens the set
    assert addresses.meets("10.200.0.1", 4)          # service 0 has a NodePort: reached
    assert not addresses.meets("10.200.0.4", 4)      # service 1 has none: not reached
    pruned = prune_iptables(text, addresses, 4)
    for needle in ("-j KUBE-SVC-SSH", "-A KUBE-SVC-SSH ", "-A KUBE-SEP-SSH -p tcp",
                   f"-A KUBE-SEP-SSH -s {pod}/32", "-j KUBE-NODEPORTS", "-j KUBE-SERVICES"):
        assert _lines_with(pruned.text, needle), needle
    loaded = [line for line in pruned.text.split("\n") if line.startswith("-A ")]
    assert len(loaded) < 400 and pruned.left_out > 1600   # NodePorts stay reachable
    declared = [line for line in pruned.text.split("\n") if line.startswith(":KUBE-S")]
    assert ":KUBE-SVC-SSH - [0:0]" in declared and ":KUBE-SEP-SSH - [0:0]" in declared
    assert len(declared) < 200                  # empty chains no kept rule jumps to: gone
    for line in loaded:                          # every jump still has its chain
        target = line.split(" -j ")[-1].split()[0]
        assert not target.startswith("KUBE-S") or f":{target} - [0:0]" in declared, line


def test_a_translation_reached_only_through_pruned_rules_does_not_widen() -> None:
    text = ipt("-A INPUT -d 198.51.100.1/32 -j DNAT --to-destination 203.0.113.5") \
        .replace("*filter", "*nat")
    addresses = prune.sandbox_addresses([CLIENT], [(text, 4)], [])
    assert addresses is not None and not addresses.meets("203.0.113.5", 4)
    wide = ipt("-A INPUT -p tcp -j DNAT --to-destination 203.0.113.5-203.0.113.6:22")
    addresses = prune.sandbox_addresses([CLIENT], [(wide, 4)], [])
    assert addresses is not None and addresses.meets("203.0.113.6", 4)


def test_unreadable_translations_and_nft_translations_switch_pruning_off() -> None:
    assert prune.sandbox_addresses([CLIENT], [(ipt("-A INPUT -j DNAT --to-destination x"), 4)],
                                   []) is None
    assert prune.sandbox_addresses(
        [CLIENT], [(ipt("-A INPUT -m comment --comment 'a' -j DNAT --to-destination 1.2.3.4"),
                    4)], []) is None
    assert prune.sandbox_addresses([CLIENT], [], ["\t\ttcp dport 22 dnat ip to 10.9.9.9"]) is None


def test_user_chains_reached_from_other_hooks_keep_a_rule_each() -> None:
    """A target valid in one hook may be refused in another: the shape carries the hooks."""
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":A - [0:0]", ":B - [0:0]", "-A INPUT -j A", "-A FORWARD -j B",
                      "-A A -s 198.51.100.1/32 -o eth9 -j DROP",
                      "-A A -s 198.51.100.2/32 -o eth9 -j DROP",
                      "-A B -s 198.51.100.3/32 -o eth9 -j DROP", "COMMIT", ""])
    pruned = prune_iptables(text, SANDBOX, 4)
    assert pruned.left_out == 1
    assert _lines_with(pruned.text, "-A B -s 198.51.100.3/32")


def test_unreachable_chain_rules_without_addresses_are_left_out_one_shape_kept() -> None:
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":S1 - [0:0]", ":S2 - [0:0]",
                      ":S3 - [0:0]", "-A INPUT -s 198.51.100.1/32 -j S1",
                      "-A INPUT -s 198.51.100.2/32 -j S2", f"-A INPUT -s {CLIENT}/32 -j S3",
                      "-A S1 -p tcp -j DROP", "-A S2 -p tcp -j DROP", "-A S3 -p tcp -j DROP",
                      "COMMIT", ""])
    pruned = prune_iptables(text, SANDBOX, 4)
    assert _lines_with(pruned.text, "-A S3 -p tcp -j DROP")        # reached by the client
    assert _lines_with(pruned.text, f"-s {CLIENT}/32 -j S3")
    assert pruned.left_out == 2    # S2's jump and S2's (or S1's) rule: one of each shape stays


def test_nft_blocklist_with_varied_ports_is_pruned_but_the_clients_rule_kept() -> None:
    rules = [f"\t\tip saddr 198.51.{i // 250}.{i % 250 + 1} tcp dport {80 + i % 9} drop"
             for i in range(2000)]
    rules.insert(700, f"\t\tip saddr {CLIENT} tcp dport 22 drop")
    text = "\n".join(["table inet t {", "\tchain input {",
                      "\t\ttype filter hook input priority 0; policy accept;", *rules,
                      "\t}", "}", ""])
    pruned = prune_nft(text, SANDBOX)
    assert _lines_with(pruned.text, f"ip saddr {CLIENT} tcp dport 22 drop")
    assert pruned.left_out == 1999


def test_undeclared_builtin_chain_counts_as_reached() -> None:
    """`-A INPUT` without `:INPUT ACCEPT` (a hand-written file): INPUT is still reached, and so
    is the chain it jumps to."""
    text = "\n".join(["*filter", ":MINE - [0:0]", "-A INPUT -j MINE",
                      "-A MINE -p tcp --dport 22 -j DROP", "-A MINE -p tcp --dport 23 -j DROP",
                      "COMMIT", ""])
    assert prune_iptables(text, SANDBOX, 4).left_out == 0


ON_ETH0 = AddressSet.of(["10.0.0.1", "10.0.0.2", "192.168.5.9/24"], ["lo", "eth0"])


def test_rules_on_interfaces_the_sandbox_lacks_are_left_out_one_shape_kept() -> None:
    """Docker's FORWARD and isolation rules name its bridges: no sandbox packet arrives on one
    or leaves by one, so only one rule of each shape is loaded."""
    text = ipt("-A INPUT -i br-0a1 -j DROP", "-A INPUT -i br-0a2 -j DROP",
               "-A INPUT -o br-0a3 -p tcp -j DROP",     # -o: another shape, kept
               "-A INPUT -o br-0a4 -p tcp -j DROP",
               "-A INPUT -i eth0 -j DROP",              # the sandbox's interface: kept
               "-A INPUT -i eth+ -j DROP",              # a prefix of it: kept
               "-A INPUT -i br+ -j DROP",               # a prefix of none: left out
               "-A INPUT ! -i br-0a5 -j DROP",          # negated: may match, kept
               "-A INPUT ! -i br-0a6 -j DROP",
               '-A INPUT -i "br-0a7" -j DROP',          # quoted: not read, kept
               "-A INPUT -i br-0a8 -s 10.0.0.1/32 -j DROP",   # the client, but not on br-0a8
               "-A INPUT -i br-0a9 -s 10.0.0.1/32 -j DROP")
    pruned = prune_iptables(text, ON_ETH0, 4)
    for needle in ("-i br-0a1 ", "-o br-0a3 ", "-i eth0 ", "-i eth+ ", "! -i br-0a5 ",
                   "! -i br-0a6 ", '"br-0a7"', "-i br-0a8 "):
        assert _lines_with(pruned.text, needle), needle
    for needle in ("-i br-0a2 ", "-o br-0a4 ", "-i br+ ", "-i br-0a9 "):
        assert not _lines_with(pruned.text, needle), needle
    assert pruned.left_out == 4
    # without the sandbox's interfaces, none is left out for its interface
    assert prune_iptables(text, SANDBOX, 4).left_out == 0


def test_a_chain_reached_only_on_other_interfaces_is_left_out() -> None:
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":OPEN - [0:0]", ":DOCKER - [0:0]",
                      "-A INPUT -i eth0 -j OPEN", "-A INPUT -i docker0 -j DOCKER",
                      "-A OPEN -p tcp --dport 82 -j DROP", "-A OPEN -p tcp --dport 83 -j DROP",
                      "-A DOCKER -p tcp --dport 80 -j DROP", "-A DOCKER -p tcp --dport 81 -j DROP",
                      "COMMIT", ""])
    pruned = prune_iptables(text, ON_ETH0, 4)
    assert _lines_with(pruned.text, "--dport 82") and _lines_with(pruned.text, "--dport 83")
    assert not _lines_with(pruned.text, "DOCKER")   # reached by no sandbox packet: its jump,
    assert pruned.left_out == 3                      # its rules, its declaration left out
    assert len(_lines_with(prune_iptables(text, SANDBOX, 4).text, "-A DOCKER ")) == 2


def test_a_translation_on_another_interface_does_not_widen() -> None:
    text = ipt("-A INPUT -i br-1 -p tcp -j DNAT --to-destination 203.0.113.5:80",
               "-A INPUT ! -i br-2 -p tcp -j DNAT --to-destination 203.0.113.6:80") \
        .replace("*filter", "*nat")
    found = prune.sandbox_addresses([CLIENT], [(text, 4)], [], ["lo", "eth0"])
    assert found is not None
    assert not found.meets("203.0.113.5", 4) and found.meets("203.0.113.6", 4)


def test_words_after_a_comment_are_not_taken_for_options() -> None:
    """`--comment -s` (or `-o`) printed unquoted: the next word is the jump, not a value."""
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":C - [0:0]",
                      "-A INPUT -m comment --comment -s -j C",
                      "-A INPUT -m comment --comment -o -j C",
                      "-A C -s 198.51.100.1/32 -j DROP", "-A C -s 198.51.100.2/32 -j DROP",
                      "-A C -p tcp -j DROP", "COMMIT", ""])
    pruned = prune_iptables(text, ON_ETH0, 4)
    assert _lines_with(pruned.text, "-A C -p tcp -j DROP")    # C is reached
    assert _lines_with(pruned.text, "--comment -s -j C") and _lines_with(pruned.text, "--comment -o -j C")
    assert pruned.left_out == 1                                 # 198.51.100.2's, one shape


def test_what_is_loaded_whole_is_said() -> None:
    """`check -v` and --json's sandbox.pruning: a table that deletes is loaded whole; no
    pruning at all names its reason; the addresses translations lead to are counted."""
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", "-D INPUT -s 198.51.100.1/32 -j DROP",
                      "-A INPUT -s 198.51.100.2/32 -j DROP", "COMMIT",
                      "*raw", ":PREROUTING ACCEPT [0:0]",
                      "-A PREROUTING -s 198.51.100.3/32 -j DROP",
                      "-A PREROUTING -s 198.51.100.4/32 -j DROP", "COMMIT", ""])
    pruned = prune_iptables(text, SANDBOX, 4)
    assert pruned.left_out == 1 and len(pruned.whole) == 1
    assert pruned.whole[0].startswith("table filter: loaded whole")
    assert "nft table translates" in prune.unpruned_why(["\t\tdnat ip to 10.9.9.9"])
    assert "could not be read" in prune.unpruned_why([])
    assert prune.sandbox_addresses([CLIENT], [(ipt("-A INPUT -j DNAT --to-destination x"), 4)],
                                   []) is None
    nat = ipt("-A INPUT -p tcp -j DNAT --to-destination 203.0.113.5:22").replace("*filter", "*nat")
    found = prune.sandbox_addresses([CLIENT], [(nat, 4)], [])
    assert found is not None and found.translated == 1
    assert prune.sandbox_addresses([CLIENT], [(ipt("-A INPUT -j DROP"), 4)], []).translated == 0


def test_nat_rules_for_ports_the_sandbox_never_opens_are_left_out() -> None:
    """The nat table sees a connection's first packet only, and the check opens TCP
    connections to the SSH port only: Docker's DNAT of its published ports never meets one,
    so it neither is loaded (one of its shape aside) nor widens the addresses; a DNAT of the
    SSH port is kept and widens them."""
    nat = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]",
                     ":DOCKER - [0:0]", "-A PREROUTING -j DOCKER",
                     "-A DOCKER ! -i br-1 -p tcp -m tcp --dport 10001 -j DNAT "
                     "--to-destination 172.18.1.2:80",
                     "-A DOCKER ! -i br-2 -p tcp -m tcp --dport 10002 -j DNAT "
                     "--to-destination 172.18.2.2:80",
                     "-A DOCKER ! -i br-3 -p tcp -m multiport --dports 2000:2100,22 -j DNAT "
                     "--to-destination 172.18.3.2:22",
                     "-A DOCKER -p udp -m udp --dport 10004 -j DNAT --to-destination 172.18.4.2",
                     "-A DOCKER ! -p tcp -m tcp --dport 10005 -j DNAT --to-destination 172.18.5.2",
                     "-A DOCKER -p tcp -m tcp ! --dport 10006 -j DNAT "
                     "--to-destination 172.18.6.2",
                     "-A POSTROUTING -s 172.18.1.0/24 ! -o br-1 -j MASQUERADE",
                     "-A POSTROUTING -s 172.18.2.0/24 ! -o br-2 -j MASQUERADE", "COMMIT", ""])
    found = prune.sandbox_addresses([CLIENT, SERVER], [(nat, 4)], [], ["lo", "eth0"], [22])
    assert found is not None
    assert not found.meets("172.18.1.2", 4) and not found.meets("172.18.2.2", 4)
    assert found.meets("172.18.3.2", 4)                       # 22 in its list: reached
    for kept in ("172.18.4.2", "172.18.5.2", "172.18.6.2"):   # not a TCP port read here
        assert found.meets(kept, 4), kept
    pruned = prune_iptables(nat, found, 4)
    assert _lines_with(pruned.text, "--dport 10001") and not _lines_with(pruned.text, "--dport 10002")
    assert not _lines_with(pruned.text, "-s 172.18.2.0/24")   # MASQUERADE: not its addresses
    every = prune.sandbox_addresses([CLIENT, SERVER], [(nat, 4)], [], ["lo", "eth0"])
    assert every is not None and every.meets("172.18.2.2", 4)   # without ports: any port
    # filter rules are left alone (a reply's destination is the client's own port)
    text = ipt("-A INPUT -p tcp -m tcp --dport 10001 -j DROP", "-A INPUT -p tcp -m tcp --dport 10002 -j DROP")
    assert prune_iptables(text, found, 4).left_out == 0


def test_tcp_destination_ports_read() -> None:
    read = prune_ports.tcp_dports
    assert read(" -p tcp -m tcp --dport 22 -j ACCEPT") == ((22, 22),)
    assert read(" -p tcp -m multiport --dports 80,443,1000:2000 -j X") == (
        (80, 80), (443, 443), (1000, 2000))
    assert read(" -p tcp --dport 1024: -j X") == ((1024, 65535),)
    assert read(" -p tcp --dport :1024 -j X") == ((0, 1024),)
    assert read(" -p 6 --destination-port 8080 -j X") == ((8080, 8080),)
    for unread in (" -p tcp --dport ssh -j X", " -p tcp --dport 99999 -j X",
                   " -p tcp --dport 20:10 -j X", " ! -p tcp --dport 22 -j X",
                   " -p tcp ! --dport 22 -j X", " -p udp --dport 53 -j X", " --dport 22 -j X",
                   " -p tcp --dport 22 --dport 23 -j X", " -p tcp -j X", " -p tcp --dport , -j X"):
        assert read(unread) is None, unread


def test_a_translated_port_switches_the_port_pruning_off() -> None:
    """REDIRECT or DNAT to another port: nat rules after it, in the same first packet, see that
    port, so no nat rule is left out for its port once such a translation is reached."""
    def nat(*rules: str) -> str:
        return "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", *rules,
                          "-A INPUT -p tcp -m tcp --dport 3000 -j SNAT --to-source 10.0.0.9",
                          "-A INPUT -p tcp -m tcp --dport 2222 -j SNAT --to-source 10.0.0.9",
                          "COMMIT", ""])
    for moving in ("-A PREROUTING -p tcp -m tcp --dport 22 -j REDIRECT --to-ports 2222",
                   "-A PREROUTING -p tcp -m tcp --dport 22 -j DNAT --to-destination "
                   "10.0.0.2:2222",
                   "-A PREROUTING -p tcp -j DNAT --to-destination :2222"):
        text = nat(moving)
        found = prune.sandbox_addresses([CLIENT, SERVER], [(text, 4)], [], ["lo", "eth0"], [22])
        assert found is not None and found.ports is None, moving
        assert _lines_with(prune_iptables(text, found, 4).text, "--dport 2222"), moving
    # not reached (another port, an address outside the sandbox's): the pruning stays
    for unreached in ("-A PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 2222",
                      "-A PREROUTING -d 198.51.100.9/32 -p tcp -j DNAT --to-destination "
                      "10.0.0.2:2222", ""):
        text = nat(unreached) if unreached else nat()
        found = prune.sandbox_addresses([CLIENT, SERVER], [(text, 4)], [], ["lo", "eth0"], [22])
        assert found is not None and found.ports == frozenset({22}), unreached
        assert not _lines_with(prune_iptables(text, found, 4).text, "--dport 2222"), unreached


def test_a_leading_zero_is_octal_to_iptables_so_the_rule_is_kept() -> None:
    """iptables and nft read `010.0.0.1` as 8.0.0.1 and `--dport 026` as 22 (found by a
    review): such a value is not read here, so its rule is never left out."""
    octal_client = AddressSet.of(["8.0.0.1", "10.0.0.2"], ["lo", "eth0"], [22])
    text = ipt("-A INPUT -s 010.0.0.1/32 -p tcp --dport 22 -j DROP",
               "-A INPUT -s 010.0.0.3/32 -p tcp --dport 22 -j DROP")
    assert prune_iptables(text, octal_client, 4).left_out == 0
    nft = "\n".join(["table inet t {", "\tchain c {", "\t\tip saddr 010.0.0.1 tcp dport 22 drop",
                     "\t\tip saddr 010.0.0.3 tcp dport 22 drop", "\t}", "}", ""])
    assert prune_nft(nft, octal_client).left_out == 0
    nat = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]",
                     "-A PREROUTING -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.9.9.9",
                     "-A PREROUTING -p tcp -m tcp --dport 026 -j DNAT --to-destination 10.9.9.9",
                     "COMMIT", ""])
    assert prune_iptables(nat, octal_client, 4).left_out == 0
    assert prune_ports.tcp_dports(" -p tcp --dports 80,026 -j X") is None
    assert prune_ports.moved_to(" -j REDIRECT --to-ports 022") == ((0, 65535),)
