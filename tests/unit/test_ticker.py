"""fwsafe.cli.ticker: a step that takes long shows one status line on a terminal, and nothing
elsewhere."""

from __future__ import annotations

import io
import time

from fwsafe.cli.ticker import StepTicker


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_slow_step_shows_progress_then_clears() -> None:
    out = Terminal()
    with StepTicker(out, total=2, enabled=True, threshold_s=0.3) as tick:
        tick.step("fast step")
        tick.step("slow step")
        time.sleep(0.9)
    text = out.getvalue()
    assert "fwsafe: step 2/2: slow step (" in text
    assert "fast step" not in text
    assert text.endswith("\r\x1b[K")   # the line is cleared when the step ends


def test_fast_steps_print_nothing() -> None:
    out = Terminal()
    with StepTicker(out, total=2, enabled=True, threshold_s=5) as tick:
        tick.step("one")
        time.sleep(0.3)
        tick.step("two")
    assert out.getvalue() == ""


def test_nothing_on_a_pipe_or_with_json() -> None:
    pipe = io.StringIO()   # not a terminal
    with StepTicker(pipe, total=1, enabled=True, threshold_s=0.1) as tick:
        tick.step("slow")
        time.sleep(0.5)
    assert pipe.getvalue() == ""
    out = Terminal()       # --json: the CLI passes enabled=False
    with StepTicker(out, total=1, enabled=False, threshold_s=0.1) as tick:
        tick.step("slow")
        time.sleep(0.5)
    assert out.getvalue() == ""
