"""firewalld's reload flushes every iptables table and Docker writes its chains again in its own
order (DOCKER-ISOLATION-STAGE-1 first, DOCKER-USER second, the admin's rules in DOCKER-USER
gone): the revert reads the iptables layers before firewalld's revert and, when that reloaded,
reverts them from what others had left (issue 24). Here: the wait for others to be done, the
revert's order of work, and why the merge must start from what others had left. (The real
firewalld and dockerd: tests/lab/test_firewalld_docker.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwsafe.backends import firewalld_layer, firewalld_settle, nflist
from fwsafe.backends.base import MERGE, Layer, RetryLog
from fwsafe.backends.iptables import three_way_undo
from fwsafe.backends.iptsave import parse_ruleset
from fwsafe.core import revert
from fwsafe.core.merge import merge_sequences

# -- waiting for others to be done ----------------------------------------------------------


class Clock:
    def __init__(self, generations: Sequence[int | None]) -> None:
        self.now = 0.0
        self.generations = iter(generations)
        self.last: int | None = None

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def generation(self) -> int | None:
        self.last = next(self.generations, self.last)
        return self.last


def test_others_are_done_once_the_generation_stood_still_long_enough() -> None:
    # Docker's burst: a commit every poll for 10 polls (0.5 s), then nothing
    clock = Clock([5, *range(6, 16)])
    quiet, commits = firewalld_settle.wait_quiet(clock.generation, quiet=1.0, limit=6.0,
                                                clock=clock.time, sleep=clock.sleep)
    assert (quiet, commits) == (True, 10)
    assert 1.5 <= clock.now <= 1.6   # the burst, then one quiet second


def test_the_wait_ends_at_its_limit_when_someone_commits_all_the_time() -> None:
    clock = Clock(range(1000))
    quiet, commits = firewalld_settle.wait_quiet(clock.generation, quiet=1.0, limit=2.0,
                                                clock=clock.time, sleep=clock.sleep)
    assert not quiet and commits > 30
    assert clock.now <= 2.1


def test_no_wait_when_the_generation_cannot_be_read() -> None:
    clock = Clock([None])
    assert firewalld_settle.wait_quiet(clock.generation, clock=clock.time,
                                      sleep=clock.sleep) == (False, 0)
    assert clock.now == 0.0


@pytest.mark.parametrize(("before", "now", "waits"), [
    ({"handle": 3}, 3, False),   # a runtime change: firewalld's table is the same one
    ({"handle": 3}, 5, True),    # a reload made it again: Docker writes its chains again
    ({}, 5, True),               # a snapshot without the handle: cannot tell, wait
    ({"handle": 3}, None, True),
])
def test_the_capture_after_a_change_waits_only_after_a_reload(
        monkeypatch: pytest.MonkeyPatch, before: dict[str, int], now: int | None,
        waits: bool) -> None:
    waited: list[str] = []
    monkeypatch.setattr(nflist, "table_handles", lambda: {"inet firewalld": now})
    monkeypatch.setattr(firewalld_layer, "settle_after_reload", lambda: "waited")
    firewalld_layer.FirewalldLayer().settle(json.dumps(before).encode(), waited.append)
    assert waited == (["waited"] if waits else [])


# -- the revert's order of work -------------------------------------------------------------

LEFT = b"*filter\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n"
FLUSHED = b"*filter\n:FORWARD DROP [0:0]\nCOMMIT\n*nat\n:DOCKER - [0:0]\nCOMMIT\n"


class Recording(Layer):
    """A stand-in for a backend (not for the code under test, the revert's order of work):
    records what it was asked to revert; the firewalld one flushes the iptables ones."""

    label = "fake"

    def __init__(self, name: str, world: dict[str, bytes], asked: list[tuple[str, ...]]) -> None:
        self.name, self.world, self.asked = name, world, asked

    def available(self) -> bool:
        return True

    def capture(self) -> bytes:
        return self.world[self.name]

    def units(self, data: bytes) -> dict[str, str]:
        return {f"{t}/{c}": "" for t, table in parse_ruleset(data.decode()).items()
                for c in table.chains}

    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        self.asked.append((self.name, ",".join(sorted(units)), (live or b"").decode()))
        if self.before_flush is not None:   # the contract: run before anything may flush
            self.before_flush()
        if self.name == "firewalld" and self.world.get("reloads") == b"yes":
            self.world["ipv4"] = FLUSHED   # the reload; Docker wrote its chains again
            self.disturbed = True
        return []


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, bytes],
                                                             list[tuple[str, ...]]]]:
    state = {"ipv4": LEFT, "ipv6": b"*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"}
    asked: list[tuple[str, ...]] = []
    monkeypatch.setattr(revert, "layer_for", lambda name: Recording(name, state, asked))
    yield state, asked


def test_iptables_flushed_by_firewalld_s_reload_go_back_from_what_others_had_left(
        world: tuple[dict[str, bytes], list[tuple[str, ...]]]) -> None:
    state, asked = world
    state["reloads"] = b"yes"
    before = {"firewalld": b"{}", "ipv4": b"", "ipv6": b""}
    result = revert.revert_change({"firewalld": ["zone public"]}, before, dict(before))
    assert result.ok
    # firewalld first; then ipv4 (untouched by the change itself), every table it had before
    # firewalld's revert or has now loaded from that state; ipv6 was not flushed: left alone
    assert asked == [("firewalld", "zone public", ""),
                     ("ipv4", "filter/DOCKER-USER,filter/FORWARD,nat/DOCKER", LEFT.decode())]


def test_nothing_more_when_firewalld_s_revert_did_not_reload(
        world: tuple[dict[str, bytes], list[tuple[str, ...]]]) -> None:
    _state, asked = world
    before = {"firewalld": b"{}", "ipv4": b"", "ipv6": b""}
    result = revert.revert_change({"firewalld": ["zone public"], "ipv4": ["filter/FORWARD"]},
                                  before, dict(before))
    assert result.ok
    assert asked == [("firewalld", "zone public", ""), ("ipv4", "filter/FORWARD", "")]


# -- why the merge starts from what others had left -----------------------------------------

BEFORE = """*filter
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -s 10.0.0.2/32 -d 172.17.0.3/32 -j DROP
-A DOCKER-USER -j RETURN
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
COMMIT
"""
# the change's reload: flushed, written again by Docker (the admin's DROP gone, USER second)
AFTER = """*filter
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -j RETURN
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
COMMIT
"""
# the window: Docker made a network (its rules on top, then DOCKER-USER first again)
WINDOW = AFTER.replace("-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n-A FORWARD -j DOCKER-USER\n",
                       "-A FORWARD -j DOCKER-USER\n-A FORWARD -o br-1 -j DOCKER\n"
                       "-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n")
# the revert's own reload: flushed again, Docker's callbacks put its bridges' rules on top
REWRITTEN = AFTER.replace("-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n",
                          "-A FORWARD -o br-1 -j DOCKER\n-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n")


def forward_after_revert(live: str) -> tuple[list[str], list[str]]:
    table = three_way_undo("filter", *(parse_ruleset(t)["filter"]
                                       for t in (BEFORE, AFTER, live)))
    return table.chains["FORWARD"].rules, table.chains["DOCKER-USER"].rules


def test_from_what_others_had_left_docker_user_is_first_and_the_admin_s_drop_back() -> None:
    for live in (WINDOW, AFTER):   # a network made in the window, or nothing
        forward, user = forward_after_revert(live)
        assert forward[0] == "-A FORWARD -j DOCKER-USER", forward
        assert user == ["-A DOCKER-USER -s 10.0.0.2/32 -d 172.17.0.3/32 -j DROP",
                        "-A DOCKER-USER -j RETURN"]
    forward, _user = forward_after_revert(WINDOW)
    assert "-A FORWARD -o br-1 -j DOCKER" in forward   # Docker's window network kept


def test_from_the_state_the_revert_s_own_reload_leaves_docker_user_is_not_first() -> None:
    """What main did (the live state read after the revert's reload): Docker's order after
    a reload counts as others' doing, and is kept."""
    forward, _user = forward_after_revert(REWRITTEN)
    assert forward[0] != "-A FORWARD -j DOCKER-USER", forward


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.data())
def test_a_first_rule_moved_by_the_change_is_first_again_whatever_others_added(
        n: int, data: st.DataObject) -> None:
    """DOCKER-USER's jump, first before the change, moved down by the change's reload (and a
    rule lost with it); others add rules anywhere while keeping it first (Docker arranges it
    first at every network it makes): the merge from what others left keeps it first, keeps
    everything others added and brings back what the change lost."""
    rest = [f"d{i}" for i in range(n)]
    before = ["USER", *rest]
    at = data.draw(st.integers(1, n))
    after = rest[:at] + ["USER"] + rest[at:]
    if n > 1 and data.draw(st.booleans()):
        after.remove(rest[-1])
    left = [x for x in after if x != "USER"]
    added = [f"o{i}" for i in range(data.draw(st.integers(0, 5)))]
    for rule in added:
        left.insert(data.draw(st.integers(0, len(left))), rule)
    if data.draw(st.booleans()):
        left.insert(0, "USER")   # a network made in the window
    else:
        left = after if not added else ["USER", *left]
    got = merge_sequences(before, after, left)
    assert got[0] == "USER", (before, after, left, got)
    assert set(before) | set(added) <= set(got)
