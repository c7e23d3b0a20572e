"""The merge's targets load: a sample of the property tests' tables (chains created and
deleted by either side; nft sets and maps) merged, loaded with the real iptables-restore / nft
into a scratch network namespace, and read back: the kernel holds exactly the target.
FWSAFE_PROPERTY_LOAD_EXAMPLES sets the sample (100 by default)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwsafe.backends.iptables import same_table, three_way_undo
from fwsafe.backends.iptsave import parse_ruleset
from fwsafe.backends.nftables import canonical_block, merge_block, split_tables
from tests.conftest import require_capable
from tests.merge_strategies import Story
from tests.nft_strategies import set_stories
from tests.nft_strategies import table as nft_table
from tests.table_strategies import table_stories, table_text

pytestmark = pytest.mark.lab

SAMPLE = int(os.environ.get("FWSAFE_PROPERTY_LOAD_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def scratch_ns() -> Iterator[str]:
    require_capable()
    name = f"fwmerge{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


def _in_ns(ns: str, argv: list[str], text: str | None = None) -> str:
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], input=text, text=True,
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, f"{argv[0]} refused:\n{text}\n{result.stderr}"
    return result.stdout


def test_merged_tables_load_and_read_back(scratch_ns: str) -> None:
    @settings(max_examples=SAMPLE, deadline=None, database=None)
    @given(st.data())
    def load(data: st.DataObject) -> None:
        story = data.draw(table_stories())
        old, new, now = (parse_ruleset(table_text(t, counters=True)).get("filter")
                         for t in (story.before, story.after, story.live))
        target = three_way_undo("filter", old, new, now)
        text = target.text()
        _in_ns(scratch_ns, ["iptables-restore", "--test"], text)
        _in_ns(scratch_ns, ["iptables-restore"], text)
        back = parse_ruleset(_in_ns(scratch_ns, ["iptables-save", "-t", "filter"]))
        assert same_table(back.get("filter"), target), (text, back.get("filter"))

    load()


def test_merged_nft_sets_load_and_read_back(scratch_ns: str) -> None:
    """Sets, timeout sets and verdict maps merged element by element: nft loads the target
    (as the revert does: add, delete, define the table) and lists exactly its elements."""
    @settings(max_examples=SAMPLE, deadline=None, database=None)
    @given(set_stories())
    def load(case: tuple[str, Story]) -> None:
        kind, story = case
        target = merge_block(*(nft_table(kind, s)
                               for s in (story.before, story.after, story.live)))
        assert target is not None
        script = f"add table inet prop\ndelete table inet prop\n{target}\n"
        _in_ns(scratch_ns, ["nft", "-f", "-"], script)
        back = split_tables(_in_ns(scratch_ns, ["nft", "-s", "list", "table", "inet", "prop"]))
        assert canonical_block(back["inet prop"]) == canonical_block(target), script

    load()
