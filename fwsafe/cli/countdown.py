"""The interactive countdown: shows the seconds left and reads `yes` / `no` from the terminal.

The terminal is put in cbreak mode without echo, so that the redrawn status line and what the
user types never garble each other; the typed answer is shown inside the status line.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable
from types import FrameType
from typing import TextIO

YES = "yes"
NO = "no"
EOF = "eof"
INTERRUPT = "interrupt"
HANGUP = "hangup"
EXTERNAL = "external"  # the transaction ended elsewhere (confirm from another session, deadline)


class _HungUp(Exception):
    pass


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def run_countdown(
    deadline: float,
    still_open: Callable[[], bool],
    *,
    stdin_fd: int | None = None,
    out: TextIO | None = None,
    poll_s: float = 0.25,
) -> str:
    """Count down to `deadline` (Unix time) until the user answers or the transaction ends.

    Returns YES, NO, EOF, INTERRUPT, HANGUP or EXTERNAL. `still_open()` is polled to notice a
    confirm from another session, a revert, or the deadline passing.
    """
    fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stream = out or sys.stderr
    saved = None
    try:
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except termios.error:
        saved = None

    def on_hup(signum: int, frame: FrameType | None) -> None:
        raise _HungUp()

    old_hup = signal.signal(signal.SIGHUP, on_hup)
    typed = ""
    hint = ""
    last_line = ""
    try:
        while True:
            left = deadline - time.time()
            if not still_open():
                return EXTERNAL
            line = (f"\r\x1b[K  {format_duration(left):>8} left — type 'yes' to keep the change, "
                    f"'no' to revert now: {hint}{typed}")
            if line != last_line:
                try:
                    stream.write(line)
                    stream.flush()
                except OSError:
                    return HANGUP
                last_line = line
            try:
                readable, _, _ = select.select([fd], [], [], poll_s)
            except InterruptedError:
                continue
            if not readable:
                continue
            data = os.read(fd, 64)
            if not data:
                return EOF
            for ch in data.decode(errors="replace"):
                if ch in ("\r", "\n"):
                    answer = typed.strip().lower()
                    typed = ""
                    if answer == "yes":
                        return YES
                    if answer in ("no", "n"):
                        return NO
                    # Anything else, 'y' included, is not a confirmation: say what counts.
                    hint = "(type the whole word 'yes') "
                    last_line = ""
                elif ch == "\x04":
                    return EOF
                elif ch in ("\x7f", "\x08"):
                    typed = typed[:-1]
                elif ch.isprintable():
                    typed = (typed + ch)[-16:]
    except KeyboardInterrupt:
        return INTERRUPT
    except _HungUp:
        return HANGUP
    finally:
        signal.signal(signal.SIGHUP, old_hup)
        if saved is not None:
            try:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass
        try:
            stream.write("\n")
            stream.flush()
        except OSError:
            pass

