"""What a change would do, per layer and per unit (chain, table, file), before it is applied.

The change is tried on a copy of the live state in a scratch namespace (`fwsafe.check.simulate`), so
the answer is the kernel's and ufw's own, normalised exactly as a capture is.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from fwsafe.backends import available_layers, layer_for, watched_layers
from fwsafe.check.simulate import simulate
from fwsafe.core.change import Change, resolve_partial, validate_change


@dataclass
class UnitDiff:
    layer: str
    unit: str
    kind: str      # "added", "removed", "changed"
    diff: str      # unified diff of the unit's text

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "unit": self.unit, "change": self.kind, "diff": self.diff}


def unit_diffs(layer_name: str, before: bytes, after: bytes) -> list[UnitDiff]:
    layer = layer_for(layer_name)
    old, new = layer.unit_texts(before), layer.unit_texts(after)
    out = []
    for unit in sorted(set(old) | set(new)):
        a, b = old.get(unit), new.get(unit)
        if a == b:
            continue
        kind = "added" if a is None else "removed" if b is None else "changed"
        lines = difflib.unified_diff(
            (a or "").splitlines(), (b or "").splitlines(),
            fromfile=f"{unit} (now)", tofile=f"{unit} (after the change)", lineterm="")
        out.append(UnitDiff(layer_name, unit, kind, "\n".join(lines)))
    return out


def diff_change(change: Change) -> list[UnitDiff]:
    """Every unit the change would alter, with a unified diff each."""
    captured = {name: layer_for(name).capture() for name in available_layers()}
    change = resolve_partial(change, captured)
    validate_change(change)
    watch = watched_layers(None if change.run is not None else change.layers, captured)
    after = simulate(captured, layers=change.layers, sources=change.sources, run=change.run,
                     watch=watch)
    result: list[UnitDiff] = []
    for name in watch:
        result.extend(unit_diffs(name, captured[name], after[name]))
    return result
