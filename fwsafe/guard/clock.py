"""The guard's deadline, and the bounds on every number of seconds it accepts.

The deadline is kept on CLOCK_BOOTTIME: it counts time spent suspended and ignores wall-clock
steps (NTP, `date -s`), unlike time.monotonic() (no suspend) and time.time() (steps). The record
keeps the wall-clock deadline for people and scripts.
"""

from __future__ import annotations

import math
import time
from typing import Any

from fwsafe.core.transaction import DEFAULT_MAX_TIMEOUT, Record

MIN_SECONDS = 1.0
DEADLINE_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boottime() -> float:
    return time.clock_gettime(DEADLINE_CLOCK)


def max_seconds(record: Record) -> float:
    """The longest timeout or extension the guard accepts (max_timeout, recorded by the CLI)."""
    value = record.options.get("max_timeout", DEFAULT_MAX_TIMEOUT)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= MIN_SECONDS
    return float(value) if ok else DEFAULT_MAX_TIMEOUT


def seconds_problem(value: Any, maximum: float) -> str | None:
    """Why `value` is not an acceptable number of seconds (finite, 1 .. maximum), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"seconds must be a number, got {value!r}"
    if not math.isfinite(value) or not MIN_SECONDS <= value <= maximum:
        return f"seconds must be from {MIN_SECONDS:g} to {maximum:g}, got {value!r}"
    return None


class Deadline:
    """When the guard reverts: counted on DEADLINE_CLOCK, mirrored in `record.deadline`."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.at_boot = 0.0   # the deadline on DEADLINE_CLOCK (boottime())

    def set(self, deadline: float) -> None:
        """Arm the deadline `deadline` (Unix time, kept in the record for display)."""
        self.record.deadline = deadline
        self.at_boot = boottime() + (deadline - time.time())

    def extend(self, seconds: float) -> None:
        """Push it back; the wall-clock deadline in the record is recomputed from the boottime
        one (so that it is right again after a wall-clock step)."""
        self.at_boot += seconds
        self.record.deadline = time.time() + self.remaining()

    def wall(self) -> float:
        """The deadline on the wall clock as of now (it moves when the wall clock is stepped)."""
        return time.time() + self.left()

    def left(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at_boot - boottime()

    def remaining(self) -> float:
        """Seconds left until the deadline, as the guard counts them."""
        return max(0.0, self.left())
