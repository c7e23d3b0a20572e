"""fwsafe.core.packed: the guard's texts held compressed give back exactly what was put in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.shapes import iptables_shape
from fwsafe.core.packed import Packed, packed
from fwsafe.guard.host_facts import give_back_freed_memory

LAYERS = st.dictionaries(st.sampled_from(["iptables", "ip6tables", "nft", "ufw", "sshd"]),
                         st.binary(max_size=4096))


@given(LAYERS)
def test_every_text_comes_back_as_it_was(texts: dict[str, bytes]) -> None:
    held = Packed(texts)
    assert dict(held) == texts
    assert list(held) == list(texts) and len(held) == len(texts)
    for name, text in texts.items():
        assert held[name] == text and held.get(name) == text and name in held
    assert "missing" not in held and held.get("missing") is None


def test_a_large_ruleset_is_held_in_a_fraction_of_its_size() -> None:
    text = iptables_shape("blocklist", 50000, 0).encode()
    held = Packed({"iptables": text})
    assert held["iptables"] == text
    assert held.held_bytes() * 4 < len(text), (held.held_bytes(), len(text))


def test_none_stays_none() -> None:
    assert packed(None) is None
    assert dict(packed({"nft": b"table inet t {}\n"}) or {}) == {"nft": b"table inet t {}\n"}


def test_glibc_takes_the_thresholds() -> None:
    assert give_back_freed_memory() is True   # glibc's mallopt answers 1 when it takes them
