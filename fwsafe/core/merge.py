"""The three-way merge behind every revert: undo the change, not the world.

Three states of one ordered list (the rules of a chain, the lines of an nft chain):

* ``before``: the snapshot taken before the change;
* ``after``:  a capture taken right after the change was applied (what the change did);
* ``live``:   the state at revert time (what the change did plus what others did since:
  fail2ban's bans, Docker's networks, kube-proxy's services).

The change's own delta is ``before -> after``. Undoing it on ``live`` removes the items the
change added and puts back the items it removed; whatever others added, removed or moved
meanwhile stays as it is::

    before: A B C          after: A X C          (the change replaced B by X)
    live:   A X C D        (Docker appended D meanwhile)
    target: A B C D        (X goes, B comes back after A, D stays)

Identity is by content, counted per chain as a multiset (`target_count`), so it survives
moves by others: the change's additions go wherever they stand now (another program that
deletes and re-appends its own rule does not shield them); a rule others re-added identically
is not doubled; what others deleted is not brought back. Order is the only thing positions
decide: a rule the change removed (or moved) returns after its nearest predecessor in
``before`` that the result has, else before its nearest such successor (a ban before
fail2ban's RETURN), else where the change's own lines stand, else (a rule the change moved)
where it stands now. Reverting what is already
reverted changes nothing; with identical copies of one rule on both sides (others added a copy
of a rule the change added, or deleted a copy of one it removed a copy of) the states cannot be
told apart, and a second revert may differ in count there.

Pure functions, no I/O: the backends parse their rulesets into chains and call these.
"""

from __future__ import annotations

from collections import Counter
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


def _matched(a: Sequence[str], b: Sequence[str]) -> tuple[set[int], set[int]]:
    """Indices of `a` and of `b` that the longest common subsequence (difflib) pairs up."""
    mapping = _mapping(a, b)
    return set(mapping), set(mapping.values())


def target_count(before: int, after: int, live: int) -> int:
    """How many copies of one item the revert leaves (the identity rules, counted per item):

    * the change added copies (after > before): they go, wherever they stand; copies others
      added since (live > after) stay; copies others deleted are not brought back;
    * the change removed copies (after < before): they come back, unless others deleted the
      item too (no resurrection) or re-added it themselves (no duplicate: theirs count);
    * otherwise the item is as others left it.

    Reverting a table that is already reverted (live == before) changes nothing."""
    if after > before:
        return min(live, before) if live <= after else live - (after - before)
    if after < before:
        return live + max(0, before - max(live, after))
    return live


def merge_sequences(before: Sequence[str], after: Sequence[str],
                    live: Sequence[str]) -> list[str]:
    """`live` with the change `before -> after` undone (see the module's documentation)."""
    if list(after) == list(live):
        return list(before)
    if list(before) == list(after) or list(live) == list(before):
        return list(live)          # nothing to undo, or already undone
    a_to_l = _mapping(after, live)
    kept_b, kept_a = _matched(before, after)
    count_b, count_a, count_l = Counter(before), Counter(after), Counter(live)
    # The change's own occurrences: before's it took away, after's it put in (a move is both).
    taken: dict[str, list[int]] = {}
    for i, item in enumerate(before):
        if i not in kept_b:
            taken.setdefault(item, []).append(i)
    put = Counter(after[j] for j in range(len(after)) if j not in kept_a)
    put_live: dict[str, list[int]] = {}       # where live still has after's put-in items
    for j in sorted(a_to_l):
        if j not in kept_a:
            put_live.setdefault(after[j], []).append(a_to_l[j])
    mapped_live = set(a_to_l.values())
    spots: dict[str, list[int]] = {}
    for i, item in enumerate(live):
        spots.setdefault(item, []).append(i)
    delete: set[int] = set()
    restore: list[int] = []                  # indices of `before` to put back
    was_at: dict[int, int] = {}              # a move's restored index -> where live had it
    for item in dict.fromkeys([*before, *after]):
        b, a, n = count_b[item], count_a[item], count_l[item]
        target = target_count(b, a, n)
        drop, back = max(0, n - target), max(0, target - n)
        # A move by the change (taken and put in) goes back where `before` had it, if live
        # still shows it where the change put it.
        moves = min(put[item], len(taken.get(item, ())), len(put_live.get(item, ())),
                    n - drop, len(taken.get(item, ())) - back)
        drop, back = drop + max(0, moves), back + max(0, moves)
        if drop:
            delete.update(_pick(drop, spots[item], put_live.get(item, []), mapped_live))
        if back:
            restore.extend(taken.get(item, [])[:back])
        if moves > 0:
            was_at.update(zip(taken.get(item, [])[:moves],
                              [i for i in put_live.get(item, []) if i in delete]))
    # Where the change's own lines of each replaced block stand in live (the last anchor).
    stood: dict[int, int] = {}
    for tag, i1, i2, j1, j2 in _opcodes(before, after):
        there = next((a_to_l[j] for j in range(j1, j2) if j in a_to_l), None)
        if tag != "equal" and there is not None:
            stood.update(dict.fromkeys(range(i1, i2), there))
    gap_of: list[int] = []                   # live index -> its gap in the result
    kept = 0
    for i in range(len(live)):
        gap_of.append(kept)
        kept += i not in delete
    result = [x for i, x in enumerate(live) if i not in delete]
    # Last anchor: where the change's own lines stand; with none left (others deleted them
    # too), a moved rule stays where it is (so that reverting again changes nothing).
    fallback = {i: gap_of[stood[i]] if i in stood else gap_of[was_at[i]]
                for i in restore if i in stood or i in was_at}
    return _insert(before, result, sorted(restore), fallback)


def _pick(count: int, spots: list[int], put_there: list[int], mapped: set[int]) -> list[int]:
    """`count` of the live indices `spots` (one item's) to delete: where the change put it
    first, then copies that match nothing of `after` (moved by others), then the last ones."""
    first = set(put_there)
    order = [*put_there, *(i for i in spots if i not in mapped and i not in first),
             *(i for i in reversed(spots) if i in mapped and i not in first)]
    return list(dict.fromkeys(order))[:count]


def _insert(before: Sequence[str], result: list[str], restore: list[int],
            fallback: dict[int, int]) -> list[str]:
    """`result` with before[i] for each i in `restore` put back after its nearest predecessor
    in `before` that `result` still has (or that is put back itself), else before its nearest
    such successor (bans before fail2ban's RETURN), else where the change's own lines stood or,
    for a moved rule, where it stood (`fallback`: i -> gap in `result`), else at the end."""
    if not restore:
        return result
    back = set(restore)
    rest = [i for i in range(len(before)) if i not in back]
    position = {rest[k]: v for k, v in _mapping([before[i] for i in rest], result).items()}
    before_next = [-1] * len(before)    # the gap before the nearest kept successor
    last = -1
    for i in range(len(before) - 1, -1, -1):
        before_next[i] = last
        if i in position:
            last = position[i]
    slots: list[tuple[int, int]] = []   # (gap in result, index in before), in before's order
    last = -1                           # the gap after the nearest predecessor placed so far
    for i in range(len(before)):
        if i in position:
            last = position[i] + 1
        elif i in back:                 # a restored rule anchors the next one in turn
            last = (last if last >= 0 else before_next[i] if before_next[i] >= 0
                    else fallback.get(i, len(result)))
            slots.append((last, i))
    out: list[str] = []
    slots.sort()
    s = 0
    for gap in range(len(result) + 1):
        while s < len(slots) and slots[s][0] == gap:
            out.append(before[slots[s][1]])
            s += 1
        if gap < len(result):
            out.append(result[gap])
    return out


def merge_value(before: str | None, after: str | None, live: str | None) -> str | None:
    """One value (a chain's policy, whether a chain exists): the change's edit undone unless
    someone else changed it since."""
    if before != after and live == after:
        return before
    return live


Items = dict[str, list[str]]   # unit (a chain, a set, a table's declarations) -> its items


def delta_left(before: Items, after: Items, live: Items, now: Items) -> list[str]:
    """The proof that a revert undid the change, on a fresh reading of the kernel (`now`),
    independent of the merge's own prediction: what of the change's delta `before -> after`
    is still there. An item the change added is gone (counted per unit: at most `before`'s
    copies, plus the copies others added by the time the revert read the live state); an item
    it removed is back (at least `before`'s copies, less those others deleted, unless others
    deleted the whole unit). [] = proved."""
    problems: list[str] = []
    for unit in sorted(set(before) | set(after)):
        old = before.get(unit, ())
        if list(now.get(unit, ())) == list(old):
            continue   # the unit is as before the change, item for item: nothing is left
        b, a = Counter(old), Counter(after.get(unit, ()))
        if b == a:
            continue
        n, seen = Counter(now.get(unit, ())), Counter(live.get(unit, ()))
        unit_gone = unit in after and unit not in live     # its owner deleted it meanwhile
        for item in dict.fromkeys([*after.get(unit, ()), *before.get(unit, ())]):
            if a[item] > b[item] and n[item] > b[item] + max(0, seen[item] - a[item]):
                problems.append(f"{unit}: `{item}` (added by the change) is still there")
            if a[item] < b[item] and not unit_gone \
                    and n[item] < b[item] - max(0, a[item] - seen[item]):
                problems.append(f"{unit}: `{item}` (removed by the change) is not back")
    return problems
