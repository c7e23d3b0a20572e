"""audit.space.named_space reads IPv4 networks without ipaddress (a set of 100,000 elements);
pinned here against the reading it replaced, which parsed every one with ipaddress: the same
cells in the same order, the same count of networks left without a cell of their own."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from fwsafe.audit import space as space_module
from fwsafe.audit.space import MAX_CELLS, PER_SHAPE, NamedSpace, named_space

# the IPv4 pattern as it was written before (its look-behind first), line by line
_OLD_V4 = re.compile(r"(?<![\w.:/-])(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?(?![\w.])")


def _oracle(texts: Iterable[str]) -> NamedSpace:
    """The reading before: every address through ipaddress.ip_network, each line apart."""
    space = NamedSpace()
    seen: set[object] = set()
    per_shape: dict[str, int] = {}
    for text in texts:
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            found = []
            for pattern in (_OLD_V4, space_module._V6):
                for match in pattern.finditer(line):
                    net = space_module._network(match.group(1), match.group(2))
                    if net is not None and net.prefixlen > 0 and not space_module._local_only(net):
                        found.append(net)
            if found:
                shape = space_module._V6.sub("A", _OLD_V4.sub("A", line))
                for net in found:
                    if net in seen:
                        continue
                    seen.add(net)
                    key = f"{net.version} {shape}"
                    count = per_shape.get(key, 0)
                    if count >= PER_SHAPE or len(space.networks[net.version]) >= MAX_CELLS:
                        space.collapsed += 1
                        continue
                    per_shape[key] = count + 1
                    space.networks[net.version].append(net)
            for match in space_module._SPORT.finditer(line):
                for port in space_module._PORT.findall(match.group(1))[:space_module.MAX_SPORTS]:
                    number = int(port)
                    if 0 < number < 65536 and number not in space.sports \
                            and len(space.sports) < space_module.MAX_SPORTS:
                        space.sports.append(number)
    return space


# the octets that matter: the special ranges' edges, leading zeros, over 255
_OCTET = st.one_of(st.integers(0, 255).map(str),
                   st.sampled_from(["0", "00", "01", "007", "127", "169", "254", "224", "239",
                                    "240", "255", "256", "999", "10", "192", "168",
                                    "\u0661\u0660", "\uff13", "1\u0668"]))
_V4 = st.one_of(st.tuples(_OCTET, _OCTET, _OCTET, _OCTET).map(".".join),
                st.tuples(st.sampled_from(["127", "169.254", "224", "239", "240", "0", "1"]),
                          _OCTET, _OCTET).map(lambda t: f"{t[0]}.{t[1]}.{t[2]}.1"
                                              if t[0] == "169.254" else f"{t[0]}.{t[1]}.{t[2]}.0"))
_PREFIX = st.one_of(st.just(""), st.integers(0, 40).map(lambda n: f"/{n}"),
                    st.sampled_from(["/00", "/08", "/99", "/\u0668", "/\uff12\uff14"]))
_V6 = st.sampled_from(["2001:db8::1", "2001:db8::/32", "fe80::1", "::1", "ff02::1", "::",
                       "2001:db8:0:1::/64", "::ffff:10.0.0.1"])
_ADDRESS = st.one_of(st.tuples(_V4, _PREFIX).map("".join), _V6)
_LINE = st.one_of(
    st.lists(_ADDRESS, min_size=1, max_size=6).map(lambda a: "\t\telements = { " + ", ".join(a)),
    st.tuples(_ADDRESS, st.integers(1, 70000)).map(
        lambda t: f"-A INPUT -s {t[0]} -p tcp --sport {t[1]} -j DROP"),
    st.tuples(_ADDRESS, _ADDRESS).map(lambda t: f"ip saddr {t[0]} ip daddr {t[1]} drop"),
    st.just("# -s 10.0.0.1 a comment"), st.just(""),
    st.just(":KUBE-SEP-0000000000000081 - [0:0]"),   # two colons, no address
    st.tuples(_ADDRESS, _ADDRESS).map(lambda t: f"x{t[0]} {t[1]}:{t[0]}:1 -{t[1]}"))
# what splits lines besides "\n" (str.splitlines): the look-arounds see them as a line's end
_JOIN = st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\x1c", "\x85", "\u2028"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_JOIN, st.lists(_LINE, max_size=40)).map(lambda t: t[0].join(t[1])),
                max_size=3))
def test_named_space_reads_as_ipaddress_did(texts: list[str]) -> None:
    fast, slow = named_space(texts), _oracle(texts)
    assert fast.networks == slow.networks
    assert fast.collapsed == slow.collapsed
    assert fast.sports == slow.sports


# the first and last addresses of the ranges _local_only names, and their neighbours
_EDGES = [base + delta for base in (0x00000000, 0x01000000, 0x7F000000, 0x80000000, 0xA9FE0000,
                                    0xA9FF0000, 0xE0000000, 0xF0000000, 0xFFFFFFFF)
          for delta in (-1, 0, 1, 0xFFFF, 0x10000, 0xFFFFFF) if 0 <= base + delta < 2**32]


@settings(max_examples=600)
@given(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(_EDGES)), st.integers(0, 32))
def test_the_special_ranges_as_ipaddress_has_them(first: int, length: int) -> None:
    net = ipaddress.IPv4Network((first, length), strict=False)
    assert space_module._v4_local_only(int(net.network_address), length) == \
        space_module._local_only(net)


def test_a_blocklist_set_of_many_shapes_collapses_to_a_few_cells() -> None:
    elements = [f"10.{i >> 8 & 255}.{i & 255}.{i % 7 + 1}" for i in range(3000)]
    text = "\n".join("\t\t\t" + ", ".join(elements[i:i + 4]) + ","
                     for i in range(0, len(elements), 4))
    fast = named_space([text])
    assert fast.networks == _oracle([text]).networks
    assert len(fast.networks[4]) <= PER_SHAPE * 2 and fast.collapsed > 2900


def test_digits_of_other_scripts_are_not_an_address() -> None:
    """\\d and int() read Arabic-Indic or full-width digits; ipaddress does not, nor do the
    rules' tools: a comment holding such text names no network."""
    for line in ['-A INPUT -s \u0661\u0660.\u0660.\u0660.\u0661 -j DROP',
                 '-A INPUT -s 10.0.0.0/\u0668 -j DROP',
                 '-A INPUT -m comment --comment "\uff13.\uff13.\uff13.\uff13" -j ACCEPT']:
        assert named_space([line]).networks == _oracle([line]).networks == {4: [], 6: []}
