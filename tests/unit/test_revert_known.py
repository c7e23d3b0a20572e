"""The revert's access proof reads the state the revert proved loaded (issue 27), and only
while nothing else can have changed it: nf_tables' generation decides. Each shortcut here has
the case where it must NOT apply. (The real kernel: tests/lab/test_revert_known_state.py.)"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fwsafe.backends import nflist
from fwsafe.backends.base import MERGE, Layer, RetryLog
from fwsafe.core import revert
from fwsafe.core.merge import delta_left


class FakeLayer(Layer):
    """A backend whose load the kernel proved at generations 5 -> 6 (a stand-in for the tool,
    not for the code under test: which proofs the revert keeps)."""

    name = "ipv4"
    label = "IPv4"
    captured = b"*filter\n-A INPUT -j DROP\nCOMMIT\n"

    def available(self) -> bool:
        return True

    def capture(self) -> bytes:
        return self.captured

    def in_nf_tables(self) -> bool:
        return True

    def units(self, data: bytes) -> dict[str, str]:
        return {}

    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        self.proved = (5, 6, b"loaded")
        return []


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLayer:
    layer = FakeLayer()
    monkeypatch.setattr(revert, "layer_for", lambda name: layer)
    return layer


def test_the_proved_state_stands_for_the_live_one_only_at_its_generation(
        fake: FakeLayer, monkeypatch: pytest.MonkeyPatch) -> None:
    known = {"ipv4": (6, b"loaded")}
    monkeypatch.setattr(nflist, "generation", lambda: 6)
    assert revert.live_state("ipv4", known) == b"loaded"
    # Anyone committed since (generation 7), or it cannot be read: read the kernel again.
    for now in (7, None):
        monkeypatch.setattr(nflist, "generation", lambda now=now: now)
        assert revert.live_state("ipv4", known) == fake.captured
    monkeypatch.setattr(nflist, "generation", lambda: 6)
    assert revert.live_state("ipv6", known) == fake.captured   # a layer not proved


def test_a_proof_made_from_after_counts_only_when_after_was_the_state_at_its_start(
        fake: FakeLayer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`after` stands for the live state when nf_tables' stamp is the one right after the
    change; the load's proof (5 -> 6) holds the untouched tables of that reading, so it is kept
    only when the stamp's generation is the load's start (nothing committed in between)."""
    monkeypatch.setattr(nflist, "ruleset_stamp", lambda: "boot/1/5")
    level, error, proved = revert._revert_layer("ipv4", ["filter/INPUT"], b"", b"x",
                                                lambda _m: None, "boot/1/5")
    assert (level, error, proved) == (MERGE, "", (5, 6, b"loaded"))
    # The stamp was read at generation 4: someone committed before the revert's own reading.
    monkeypatch.setattr(nflist, "ruleset_stamp", lambda: "boot/1/4")
    level, _, proved = revert._revert_layer("ipv4", ["filter/INPUT"], b"", b"x",
                                            lambda _m: None, "boot/1/4")
    assert level == MERGE and proved is None
    # No stamp: the layer read the live state itself, after the generation it started from.
    level, _, proved = revert._revert_layer("ipv4", ["filter/INPUT"], b"", b"x",
                                            lambda _m: None, None)
    assert proved == (5, 6, b"loaded")


def test_known_states_follow_only_the_loads_that_came_right_after_them() -> None:
    known: dict[str, tuple[int, bytes]] = {}
    revert._keep_known(known, "ipv4", (10, 12, b"v4"))
    revert._keep_known(known, "ipv6", (12, 13, b"v6"))   # only ipv6's own commits since
    assert known == {"ipv4": (13, b"v4"), "ipv6": (13, b"v6")}
    revert._keep_known(known, "ipv4-legacy", (20, 21, b"l"))   # something else came between
    assert known == {"ipv4-legacy": (21, b"l")}
    revert._keep_known(known, "ufw", None)   # a load nobody proved: nothing is sure any more
    assert known == {}


def test_the_access_proof_is_given_the_known_states_and_reads_again_after_a_fallback(
        fake: FakeLayer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first proof gets the revert's proved state; when access fails and the touched
    tables are loaded whole, the second proof must read the kernel (no known state)."""
    asked: list[dict[str, tuple[int, bytes]]] = []

    def access(known: dict[str, tuple[int, bytes]]) -> tuple[bool | None, str]:
        asked.append(dict(known))
        return (False, "access FAILED") if len(asked) == 1 else (True, "access: ok")

    result = revert.revert_change({"ipv4": ["filter/INPUT"]}, {"ipv4": b""}, {"ipv4": b"x"},
                                  access=access)
    assert asked == [{"ipv4": (6, b"loaded")}, {}]
    assert result.verified


def test_delta_left_is_the_same_with_the_shortcut_for_units_as_before() -> None:
    """A unit that is item for item as before the change has nothing of the change left; one
    that merely holds the same items in another order is still judged by counting."""
    before = {"filter/INPUT": ["-A INPUT -j A", "-A INPUT -j B"]}
    after = {"filter/INPUT": ["-A INPUT -j A", "-A INPUT -j B", "-A INPUT -j C"]}
    assert delta_left(before, after, after, before) == []
    left = delta_left(before, after, after, {"filter/INPUT": [*after["filter/INPUT"]]})
    assert left == ["filter/INPUT: `-A INPUT -j C` (added by the change) is still there"]
    reordered = {"filter/INPUT": ["-A INPUT -j B", "-A INPUT -j A"]}
    assert delta_left(before, after, after, reordered) == []


def test_the_after_stamp_moves_past_the_hatch_s_own_commits_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard loads the hatch right after capturing the change's result; captures never
    show the hatch, so that capture still stands for the live state if only the hatch's own
    commits came after it; anyone else's commit, or commits not known, and it does not."""
    from fwsafe.guard.applying import hatch_only

    monkeypatch.setattr(nflist, "ruleset_stamp", lambda: "boot/7/12")
    assert hatch_only("boot/7/10", 2) == "boot/7/12"
    assert hatch_only("boot/7/10", 1) is None        # someone else committed too
    assert hatch_only("boot/7/10", None) is None     # a hatch load failed: not known
    assert hatch_only("boot/7/10", 0) == "boot/7/10"   # the hatch committed nothing
    assert hatch_only(None, 2) is None
    assert hatch_only("boot/8/10", 2) is None        # another namespace or boot
