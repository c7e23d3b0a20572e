"""fwsafe.core.packed: the guard's texts held compressed give back exactly what was put in."""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.shapes import iptables_shape
from fwsafe.core import packed as packed_module
from fwsafe.core.packed import Packed, packed

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


def test_asking_for_a_name_decompresses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    held = Packed({"iptables": b"*filter\nCOMMIT\n" * 1000, "nft": b"table inet t {}\n"})
    calls: list[int] = []
    decompress = zlib.decompress

    def counted(data: bytes) -> bytes:
        calls.append(len(data))
        return decompress(data)

    monkeypatch.setattr(packed_module.zlib, "decompress", counted)
    keys = held.keys()   # (a view: it asks the mapping)
    assert "iptables" in held and "ufw" not in held and "nft" in keys
    assert sorted(held) == ["iptables", "nft"] and len(held) == 2 and bool(held)
    assert calls == []
    assert held["nft"] == b"table inet t {}\n" and len(calls) == 1


def test_glibc_takes_the_thresholds() -> None:
    """In a process of its own, as the guard calls it (glibc's mallopt answers 1)."""
    out = subprocess.run([sys.executable, "-c", "from fwsafe.guard.host_facts import "
                          "give_back_freed_memory as g; print(g())"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "True"
