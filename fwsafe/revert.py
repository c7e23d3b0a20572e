"""Putting what a change touched back from its snapshot, and proving it worked.

Shared by the guard (which holds the snapshot in memory) and `fwsafe recover` (which reads it
from disk after the guard is gone). A revert is only reported as done when a fresh capture
shows that every touched unit equals the snapshot again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fwsafe.backends import ALL_LAYERS, layer_for
from fwsafe.backends.base import ApplyError, RetryLog

ATTEMPTS = 3


def compute_touched(before: Mapping[str, bytes], after: Mapping[str, bytes]) -> dict[str, list[str]]:
    """The units that differ between two captures, per layer (layers without change left out)."""
    touched = {}
    for name in before:
        if name in after:
            units = layer_for(name).touched(before[name], after[name])
            if units:
                touched[name] = units
    return touched


def revert_touched(
    touched: Mapping[str, Sequence[str]],
    before: Mapping[str, bytes],
    *,
    log: RetryLog | None = None,
) -> list[str]:
    """Restore every touched unit from `before`; return the problems ([] = done and verified).

    Files first, iptables last (the reverse of capture order). Each layer is retried a few
    times when its tool refuses (a held xtables lock, a transient kernel error); running out of
    memory is retried until the tool runs (see runner).
    """
    problems: list[str] = []
    order = [n for n in reversed(ALL_LAYERS) if n in touched]
    for name in order:
        units = list(touched[name])
        layer = layer_for(name)
        last_error = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                layer.restore_units(before[name], units, on_retry=log)
                remaining = layer.differences(before[name], units)
            except (ApplyError, OSError, ValueError) as exc:
                last_error = str(exc)
                if log:
                    log(f"restore of {name}, attempt {attempt}: {last_error}")
                continue
            if not remaining:
                last_error = ""
                break
            last_error = "still differs: " + ", ".join(remaining)
            if log:
                log(f"restore of {name}, attempt {attempt}: {last_error}")
        if last_error:
            problems.append(f"{name}: {last_error}")
    return problems
