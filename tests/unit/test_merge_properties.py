"""Property tests (hypothesis) of the three-way merge: sequences (a chain), iptables tables
(chains created and deleted by either side), nft sets and maps (element by element) and, in
tests/lab/test_merge_load.py, targets loaded by the real tools. FWSAFE_PROPERTY_EXAMPLES sets the
examples per property."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from fwsafe.backends.iptables import same_table, three_way_undo
from fwsafe.backends.iptsave import parse_ruleset
from fwsafe.backends.nftables import canonical_block, merge_block, parse_block, set_parts
from fwsafe.core.merge import delta_left, merge_sequences
from tests.merge_strategies import PROPERTY, SEQ, Story, stories
from tests.nft_strategies import element as nft_element
from tests.nft_strategies import set_stories
from tests.nft_strategies import table as nft_table
from tests.table_strategies import TableStory, table_stories, table_text


@PROPERTY
@given(stories())
def test_nobody_else_acted_gives_before_exactly(story: Story) -> None:
    assert merge_sequences(story.before, story.after, story.after) == story.before


@PROPERTY
@given(stories())
def test_a_reverted_chain_stays_as_it_is(story: Story) -> None:
    assert merge_sequences(story.before, story.after, story.before) == story.before


@PROPERTY
@given(stories())
def test_the_change_is_undone_and_others_work_kept(story: Story) -> None:
    """Unique rules: the result holds exactly what was there before, minus what others
    deleted, plus what others added; never one of the change's own rules, wherever others
    moved it; no duplicates."""
    got = merge_sequences(story.before, story.after, story.live)
    expected = ({b for b in story.before if b not in story.others_deleted}
                | {o for o in story.live if o.startswith("o")})
    assert Counter(got) == Counter(expected)
    assert delta_left(*({"u": x} for x in (story.before, story.after, story.live, got))) == []
    again = merge_sequences(story.before, story.after, got)
    # A second revert changes nothing (in content; also in order unless others moved rules:
    # a rule the change moved and others moved back looks as if nobody had moved it)
    assert Counter(again) == Counter(got)
    if not story.others_moved:
        assert again == got


@PROPERTY
@given(stories(others_move=False, others_delete=False))
def test_others_additions_keep_their_order_and_before_its_order(story: Story) -> None:
    got = merge_sequences(story.before, story.after, story.live)
    assert [x for x in got if x.startswith("b")] == story.before
    assert [x for x in got if x.startswith("o")] == [x for x in story.live if x.startswith("o")]
    assert merge_sequences(story.before, story.after, got) == got


@PROPERTY
@given(SEQ, SEQ, SEQ)
def test_identical_rules_counted_as_multisets(before: list[str], after: list[str],
                                              live: list[str]) -> None:
    got = merge_sequences(before, after, live)
    assert delta_left(*({"u": x} for x in (before, after, live, got))) == []   # the proof holds
    cb, ca, cl, cg = Counter(before), Counter(after), Counter(live), Counter(got)
    assert set(cg) <= set(cb) | set(cl)                     # nothing invented
    for item in set(cb) | set(ca) | set(cl):
        b, a, n, t = cb[item], ca[item], cl[item], cg[item]
        others_added = max(0, n - a)
        if a > b:          # the change's additions are gone, others' copies stay
            assert t <= b + others_added
            assert t >= others_added
        if a < b:          # its removals are back, unless others deleted or re-added them
            assert t <= max(n, b)
            if n >= a:
                assert t >= b
            else:          # no resurrection of what others deleted
                assert t <= n + (b - a)
        if a == b:
            assert t == n
    assert merge_sequences(before, after, after) == before
    assert merge_sequences(before, after, before) == before
    # A second revert changes nothing, unless others added copies of a rule the change added
    # or deleted copies of one it removed copies of: identical rules cannot tell those apart.
    if all(cl[x] <= ca[x] for x in ca if ca[x] > cb[x]) and all(
            cl[x] >= ca[x] for x in cb if ca[x] < cb[x]):
        assert Counter(merge_sequences(before, after, got)) == cg   # (the order of identical
        # rules the change moved may differ: only the unique-rule properties pin the order)


@PROPERTY
@given(st.data())
def test_tables_chains_created_and_deleted_by_either_side(data: st.DataObject) -> None:
    story: TableStory = data.draw(table_stories())
    old, new, now = (parse_ruleset(table_text(t)).get("filter")
                     for t in (story.before, story.after, story.live))
    got = three_way_undo("filter", old, new, now)
    chains = set(got.chains)
    for chain in got.chains.values():
        for rule in chain.rules:
            if " -j U" in rule:     # every jump has its chain: the target loads
                assert rule.split(" -j ")[1] in chains
    for name in chains - {"INPUT", "FORWARD", "OUTPUT"}:
        # no orphan: a user chain is live, or the change deleted it, or a kept rule needs it
        assert (name in story.live or (name in story.before and name not in story.after)
                or any(r.endswith(f"-j {name}") for c in got.chains.values() for r in c.rules))
    for name in story.after.keys() - story.before.keys():
        if name not in story.live:
            assert name not in chains or any(r.endswith(f"-j {name}")
                                             for c in got.chains.values() for r in c.rules)
    assert same_table(three_way_undo("filter", old, new, new), old)
    assert same_table(three_way_undo("filter", old, new, old), old)


@PROPERTY
@given(set_stories())
def test_nft_sets_and_maps_merged_element_by_element(case: tuple[str, Story]) -> None:
    """The change's elements are gone, the ones it removed are back, others' additions and
    deletions stay; one `elements` line (a wrapped list merged line by line used to break)."""
    kind, story = case
    got = merge_block(*(nft_table(kind, s) for s in (story.before, story.after, story.live)))
    assert got is not None
    _, _, objects = parse_block(got)
    body = objects["\tmap s {" if kind == "map" else "\tset s {"]
    assert sum("elements = " in line for line in body) <= 1
    _, elements = set_parts(body)
    expected = ({b for b in story.before if b not in story.others_deleted}
                | {o for o in story.live if o.startswith("o")})
    assert Counter(elements) == Counter(nft_element(x, kind) for x in expected)
    assert canonical_block(merge_block(*(nft_table(kind, s) for s in (
        story.before, story.after, story.after)))) == canonical_block(
            nft_table(kind, story.before))
