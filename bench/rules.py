"""Generated rulesets of a given size, in iptables-save and nft syntax.

Variant A is the ruleset live before a change, variant B the change: the same number of rules
with other source addresses, so that a restore of either replaces every rule of the chain.
Both keep the lab usable (established connections and SSH accepted).
"""

from __future__ import annotations

NFT_TABLE = "inet fwbench"


def host(i: int, variant: int) -> str:
    """The i-th source address of a variant: 10.(100+variant).x.y for the first 62,500, then
    10.(102+variant), 10.(104+variant), ...: the two variants never share one (200k rules and
    more; the addresses below 62,500 are those of the earlier runs)."""
    block, i = divmod(i, 62500)
    return f"10.{100 + variant + 2 * block}.{i // 250}.{i % 250 + 1}"


def iptables_rules(n: int, variant: int) -> str:
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    ]
    lines += [f"-A INPUT -s {host(i, variant)}/32 -p tcp -m tcp --dport 22 -j ACCEPT"
              for i in range(n)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def nft_rules(n: int, variant: int) -> str:
    """One native table, replaced atomically (`table; delete table; table {...}`)."""
    rules = [f"\t\tip saddr {host(i, variant)} tcp dport 22 accept" for i in range(n)]
    return "\n".join([
        f"table {NFT_TABLE}",
        f"delete table {NFT_TABLE}",
        f"table {NFT_TABLE} {{",
        "\tchain input {",
        "\t\ttype filter hook input priority 0; policy accept;",
        "\t\tct state established,related accept",
        "\t\ttcp dport 22 accept",
        *rules,
        "\t}",
        "}",
    ]) + "\n"
