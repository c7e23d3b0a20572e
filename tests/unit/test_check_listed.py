"""The check's candidate read back instead of echoed (issue 27): an nft file that deletes each
of its tables first is loaded with plain `nft -f` (`nft --echo` prints every set element and
overflows netlink's buffer at 100k of them), and its rules' handles come from the sandbox's
terse listing, one `nft -a -t list ruleset`."""

from __future__ import annotations

from fwsafe.backends.nftables import replaced_tables
from fwsafe.check.loading import table_blocks
from fwsafe.check.naming import NftCandidate
from fwsafe.check.nft_listing import parse_nft_listing

FILE = """\
table inet fw
delete table inet fw
table inet fw {
\tset blocked {
\t\ttype ipv4_addr
\t\telements = { 10.0.0.1, 10.0.0.2 }
\t}
\tchain input {
\t\ttype filter hook input priority 0; policy accept;
\t\tct state established,related accept
\t\tip saddr @blocked tcp dport 22 drop
\t}
}
"""

RULESET = """\
table ip filter { # handle 1
\tchain INPUT { # handle 1
\t\ttype filter hook input priority filter; policy accept;
\t\tcounter packets 0 bytes 0 accept # handle 2
\t}
}
table inet fw { # handle 9
\tset blocked { # handle 2
\t\ttype ipv4_addr
\t}

\tchain input { # handle 1
\t\ttype filter hook input priority filter; policy accept;
\t\tct state established,related accept # handle 3
\t\tip saddr @blocked tcp dport 22 drop # handle 4
\t}
}
table inet other { # handle 10
}
"""


def test_the_tables_a_file_replaces_whole() -> None:
    assert replaced_tables(FILE.encode()) == ["inet fw"]
    assert replaced_tables(FILE.replace("delete table inet fw\n", "").encode()) is None
    assert replaced_tables(b"delete table x\ntable x {\n}\nadd element inet y s { 1 }\n") is None
    assert replaced_tables(b"flush ruleset\ntable inet fw {\n}\n") is None


def test_ruleset_listing_split_into_tables() -> None:
    blocks = table_blocks(RULESET)
    assert [key for key, _ in blocks] == [("ip", "filter"), ("inet", "fw"), ("inet", "other")]
    assert blocks[1][1].startswith("table inet fw { # handle 9\n") and \
        blocks[1][1].endswith("\t}\n}\n")


def test_handles_from_the_listing_map_to_the_file_lines() -> None:
    listing = parse_nft_listing(dict(table_blocks(RULESET))[("inet", "fw")])
    candidate = NftCandidate.listed(FILE.encode(), "fw.nft", listing)
    chain = ("inet", "fw", "input")
    assert candidate.handles == {(chain, 3): 10, (chain, 4): 11}
    assert candidate.tables == {("inet", "fw")}
    assert candidate.line(11) == "ip saddr @blocked tcp dport 22 drop"
