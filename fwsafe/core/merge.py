"""The three-way merge behind every revert: undo the change, not the world.

Three states of one ordered list (the rules of a chain, the lines of an nft chain):

* ``before``: the snapshot taken before the change;
* ``after``:  a capture taken right after the change was applied (what the change did);
* ``live``:   the state at revert time (what the change did plus what others did since:
  fail2ban's bans, Docker's networks, kube-proxy's services).

The change's own delta is ``before -> after``. Undoing it on ``live`` removes the items the
change added and puts back the items it removed, each at the place its neighbours give it;
whatever others added, removed or moved meanwhile stays as it is::

    before: A B C          after: A X C          (the change replaced B by X)
    live:   A X C D        (Docker appended D meanwhile)
    target: A B C D        (X goes, B comes back where X stood, D stays)

Pure functions, no I/O: the backends parse their rulesets into chains and call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher


def _common_ends(a: Sequence[str], b: Sequence[str]) -> tuple[int, int]:
    """Lengths of the common prefix and (non-overlapping) common suffix of two lists."""
    limit = min(len(a), len(b))
    head = 0
    while head < limit and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < limit - head and a[len(a) - 1 - tail] == b[len(b) - 1 - tail]:
        tail += 1
    return head, tail


def _opcodes(a: Sequence[str], b: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """difflib opcodes a -> b; the common ends are matched first (large rulesets usually
    differ in a few lines, and SequenceMatcher is slow on long equal runs with repeats)."""
    head, tail = _common_ends(a, b)
    ops: list[tuple[str, int, int, int, int]] = []
    if head:
        ops.append(("equal", 0, head, 0, head))
    mid_a, mid_b = a[head:len(a) - tail], b[head:len(b) - tail]
    if mid_a or mid_b:
        matcher = SequenceMatcher(None, mid_a, mid_b, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            ops.append((tag, i1 + head, i2 + head, j1 + head, j2 + head))
    if tail:
        ops.append(("equal", len(a) - tail, len(a), len(b) - tail, len(b)))
    return ops


def _mapping(a: Sequence[str], b: Sequence[str]) -> dict[int, int]:
    """Index in `a` -> index in `b` of every item the two lists share (in order)."""
    out: dict[int, int] = {}
    for tag, i1, i2, j1, _j2 in _opcodes(a, b):
        if tag == "equal":
            for k in range(i2 - i1):
                out[i1 + k] = j1 + k
    return out


def merge_sequences(before: Sequence[str], after: Sequence[str],
                    live: Sequence[str]) -> list[str]:
    """`live` with the change `before -> after` undone (see the module's documentation)."""
    if list(after) == list(live):
        return list(before)
    if list(before) == list(after):
        return list(live)
    a_to_l = _mapping(after, live)
    deleted: set[int] = set()
    insert_before: dict[int, list[str]] = {}
    insert_after: dict[int, list[str]] = {}

    def anchor_back(j: int) -> int | None:
        """The live index of the nearest item of `after` before index j that live still has."""
        for k in range(j - 1, -1, -1):
            if k in a_to_l:
                return a_to_l[k]
        return None

    def anchor_forward(j: int) -> int | None:
        for k in range(j, len(after)):
            if k in a_to_l:
                return a_to_l[k]
        return None

    for tag, i1, i2, j1, j2 in _opcodes(before, after):
        if tag == "equal":
            continue
        # What the change added: gone again, wherever live still has it.
        added_in_live = [a_to_l[j] for j in range(j1, j2) if j in a_to_l]
        deleted.update(added_in_live)
        removed = list(before[i1:i2])
        if not removed:
            continue
        # What the change removed comes back where the change's own lines stood, else after
        # its nearest surviving predecessor, else before its nearest surviving successor.
        if added_in_live:
            insert_before.setdefault(added_in_live[0], []).extend(removed)
            continue
        back = anchor_back(j1)
        if back is not None:
            insert_after.setdefault(back, []).extend(removed)
            continue
        forward = anchor_forward(j2)
        if forward is not None:
            insert_before.setdefault(forward, []).extend(removed)
        else:
            insert_after.setdefault(len(live) - 1, []).extend(removed)

    out: list[str] = list(insert_after.get(-1, []))
    for index, item in enumerate(live):
        out.extend(insert_before.get(index, []))
        if index not in deleted:
            out.append(item)
        out.extend(insert_after.get(index, []))
    return out


def merge_value(before: str | None, after: str | None, live: str | None) -> str | None:
    """One value (a chain's policy, whether a chain exists): the change's edit undone unless
    someone else changed it since."""
    if before != after and live == after:
        return before
    return live
