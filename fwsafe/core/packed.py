"""Layer texts kept compressed in memory: the waiting guard's footprint.

The guard holds everything a revert needs in memory (the snapshot, the change, the capture
after it), so that nothing a session deletes can stop the revert. At 200,000 rules those are
three texts of 12-30 MB each, most of the guard's RSS while it waits: a `Packed` mapping keeps
each text zlib-compressed (level 1: iptables-save and nft texts shrink 6-20 times, in 25-80 ms
for 12-30 MB) and gives it back whole on each reading. The guard reads a layer's text a few
times per revert attempt, never per rule, so the cost is a few decompressions (20-60 ms each at
200k) on the way back, and nothing while it waits (its callers read a text into a local once
where they use it more than once). Every text is packed, small ones too (a
millisecond at 10,000 rules): one way for all, which every test of a revert goes through.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

LEVEL = 1   # the fastest level: most of the gain, a third of level 6's time


class Packed(Mapping[str, bytes]):
    """A read-only mapping of layer names to texts, held compressed."""

    __slots__ = ("_items",)

    def __init__(self, texts: Mapping[str, bytes]) -> None:
        self._items = {name: zlib.compress(text, LEVEL) for name, text in texts.items()}

    def __getitem__(self, name: str) -> bytes:
        return zlib.decompress(self._items[name])

    def __contains__(self, name: object) -> bool:   # (Mapping's own would decompress)
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def held_bytes(self) -> int:
        """What the texts take in memory, compressed."""
        return sum(len(data) for data in self._items.values())


def packed(texts: Mapping[str, bytes] | None) -> Packed | None:
    return None if texts is None else Packed(texts)
