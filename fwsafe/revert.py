"""Putting a transaction's layers back from its snapshot, and proving it worked.

Shared by the guard (which holds the snapshot in memory) and `fwsafe recover` (which reads it
from disk after the guard is gone). A revert is only reported as done when a fresh capture
shows that what the change touched equals the snapshot again.
"""

from __future__ import annotations

from collections.abc import Sequence

from fwsafe.backends import layer_for
from fwsafe.backends.base import ApplyError, RetryLog

ATTEMPTS = 3


def revert_layers(
    layer_names: Sequence[str],
    before: dict[str, bytes],
    change: dict[str, bytes],
    *,
    log: RetryLog | None = None,
) -> list[str]:
    """Restore every layer in reverse order of application; return the problems ([] = done).

    Each layer is retried a few times when its tool refuses (a held xtables lock, a transient
    kernel error); running out of memory is retried until the tool runs (see runner).
    """
    problems: list[str] = []
    for name in reversed(list(layer_names)):
        layer = layer_for(name)
        last_error = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                layer.restore(before[name], change[name], on_retry=log)
                remaining = layer.differences(before[name], change[name])
            except (ApplyError, OSError) as exc:
                last_error = str(exc)
                if log:
                    log(f"restore of {name}, attempt {attempt}: {last_error}")
                continue
            if not remaining:
                last_error = ""
                break
            last_error = "; ".join(remaining)
            if log:
                log(f"restore of {name}, attempt {attempt}: still differs: {last_error}")
        if last_error:
            problems.append(f"{name}: {last_error}")
    return problems
