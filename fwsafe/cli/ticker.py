"""Progress for slow steps, on a terminal only.

A step that has run for more than ``THRESHOLD_S`` (2 s) gets one status line on stderr, kept
up to date: which step of how many, what it is doing, and for how long. The line is cleared when
the step ends, so a fast run prints nothing, and nothing at all reaches a pipe, a file or
``--json`` output.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import IO

THRESHOLD_S = 2.0
TICK_S = 0.25


class StepTicker:
    """``with StepTicker(stderr, total=3, enabled=...) as ticker: ticker.step("reading ...")``."""

    def __init__(self, stream: IO[str], *, total: int, enabled: bool,
                 threshold_s: float = THRESHOLD_S) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled and _is_terminal(stream)
        self.threshold_s = threshold_s
        self.number = 0
        self.what = ""
        self.started = time.monotonic()
        self.shown = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StepTicker:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="fwsafe-ticker", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        with self._lock:
            self._clear()

    def step(self, what: str) -> None:
        """A new step begins (the previous one ended)."""
        with self._lock:
            self._clear()
            self.number = min(self.number + 1, self.total)
            self.what = what
            self.started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                elapsed = time.monotonic() - self.started
                if self.what and elapsed >= self.threshold_s:
                    self._write(f"\r\x1b[Kfwsafe: step {self.number}/{self.total}: {self.what} "
                                f"({elapsed:.0f} s)")
                    self.shown = True

    def _clear(self) -> None:
        if self.shown:
            self._write("\r\x1b[K")
            self.shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
