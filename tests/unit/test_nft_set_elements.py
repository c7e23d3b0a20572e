"""nft set bodies split into elements (issue 27: a set of 100k elements is read in linear time)."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from fwsafe.backends.nftables import change_tables, merge_set, set_parts, split_elements

_PLAIN = st.lists(st.from_regex(r"10\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
                  max_size=30)


def _scanned(text: str) -> list[str]:
    """The same split without the plain fast path: a brace-free text made to take the scan."""
    return [e.removesuffix("(").rstrip() for e in split_elements(text + " (")]


@given(_PLAIN, st.sampled_from([", ", ",", " ,  ", ",\n\t\t\t     "]))
def test_plain_elements_split_as_the_scanner_splits_them(elements: list[str], sep: str) -> None:
    text = sep.join(elements)
    assert split_elements(text) == [e for e in elements if e]
    assert split_elements(text) == [e for e in _scanned(text) if e]


def test_elements_with_values_and_braces_still_scanned() -> None:
    assert split_elements('1.2.3.4 . 22 : accept, 5.6.7.8 : jump x, "a,b", { 1, 2 }') == [
        "1.2.3.4 . 22 : accept", "5.6.7.8 : jump x", '"a,b"', "{ 1, 2 }"]


def _wrapped(elements: list[str]) -> list[str]:
    """A set body as `nft list` prints it: two elements a line, continuation lines indented."""
    body = ["\t\ttype ipv4_addr"]
    pairs = [", ".join(elements[i:i + 2]) for i in range(0, len(elements), 2)]
    body.append(f"\t\telements = {{ {pairs[0]},")
    body += [f"\t\t\t     {p}," for p in pairs[1:-1]]
    body.append(f"\t\t\t     {pairs[-1]} }}")
    return body


def test_a_wrapped_set_of_100k_elements_is_read_in_linear_time() -> None:
    elements = [f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}" for i in range(100_000)]
    body = _wrapped(elements)
    started = time.process_time()
    lines, got = set_parts(body)
    changed = [*body[:-1], body[-1].replace(elements[-1], "10.99.0.1")]
    merged = merge_set(body, changed, changed)
    spent = time.process_time() - started
    assert lines == ["\t\ttype ipv4_addr"] and got == elements
    assert set_parts(merged)[1] == elements
    # quadratic joining took ~5 s here; linear is ~0.3 s (CPU time: load does not count)
    assert spent < 2.5, spent


def test_the_tables_an_nft_file_writes_to() -> None:
    text = (b"# header { not a brace\n"
            b"table foo {\n\tchain x { type filter hook input priority 0; } # c {\n}\n"
            b'add element inet f2b blocked { 1.2.3.4 }; delete table ip6 zz # "x\n'
            b'add rule bridge b c meta mark 1 comment "a ; b } {"\n'
            b"add table netdev n\n")
    assert change_tables(text) == ["ip foo", "inet f2b", "ip6 zz", "bridge b", "netdev n"]
    assert change_tables(b"\n# nothing\n") == []


def test_an_nft_file_that_does_not_name_its_tables_gives_none() -> None:
    for text in (b"flush ruleset\n", b'include "/x.nft"\n', b"define X = 1\n",
                 b"add rule inet $t c accept\n", b"delete table inet handle 4\n",
                 b"table inet x {\n", b"table inet x }\n", b'add rule inet t c comment "x\n',
                 b"list ruleset\n"):
        assert change_tables(text) is None, text
