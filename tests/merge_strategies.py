"""Hypothesis strategies for the merge's property tests: three states of a chain (before, after
the change, live) made by random edits, with the bookkeeping that says what each side did.

The number of examples per property: FWSAFE_PROPERTY_EXAMPLES (2,000 by default, as in CI;
e.g. 100000 for a long run)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FWSAFE_PROPERTY_EXAMPLES", "2000"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Story:
    """before -> after (the change) -> live (others); labels are unique: b* were there before,
    c* the change added, o* others added."""

    before: list[str]
    after: list[str]
    live: list[str]
    others_deleted: set[str] = field(default_factory=set)   # net: deleted, not re-added
    others_moved: bool = False
    others_deleted_any: bool = False


def _edit(draw: st.DrawFn, items: list[str], new: str, *, moves: bool,
          reappend: bool) -> tuple[list[str], set[str], set[str], bool]:
    """Random edits: insert new labels, delete, move (delete + insert elsewhere), re-append
    (delete + append, as `iptables -D` then `-A`). Returns (result, deleted, added, moved)."""
    out = list(items)
    deleted: set[str] = set()
    added: set[str] = set()
    moved = False
    kinds = ["insert", "delete"] + (["move"] if moves else []) + (["reappend"] if reappend else [])
    for n in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(kinds))
        if kind == "insert" or not out:
            label = f"{new}{n}"
            out.insert(draw(st.integers(0, len(out))), label)
            added.add(label)
            continue
        index = draw(st.integers(0, len(out) - 1))
        item = out.pop(index)
        if kind == "delete":
            deleted.add(item)
            added.discard(item)
        elif kind == "move":
            out.insert(draw(st.integers(0, len(out))), item)
            moved = True
        else:
            out.append(item)
            moved = True
    return out, deleted, added, moved


@st.composite
def stories(draw: st.DrawFn, *, others_move: bool = True, others_delete: bool = True) -> Story:
    before = [f"b{i}" for i in range(draw(st.integers(0, 8)))]
    after, _deleted, _added, _moved = _edit(draw, before, "c", moves=True, reappend=False)
    if others_delete:
        live, deleted, _added, moved = _edit(draw, after, "o", moves=others_move,
                                             reappend=others_move)
    else:
        live, deleted, moved = list(after), set(), False
        for n in range(draw(st.integers(0, 4))):
            live.insert(draw(st.integers(0, len(live))), f"o{n}")
    return Story(before, after, live, deleted, moved, bool(deleted))


# Lists with repeats (a small alphabet): identical rules, counted as multisets.
ITEMS = st.sampled_from(["a", "b", "c", "d"])
SEQ = st.lists(ITEMS, max_size=7)
