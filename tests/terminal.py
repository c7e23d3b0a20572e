"""A real terminal for transcripts: tmux on a private socket, its window running an
interactive shell in an SSH session to the lab's server (so fwsafe sees a terminal on stdin,
stdout and stderr, $SSH_CONNECTION and a NEW-login confirm, as an admin's session does).

``capture()`` is what a person sees: ``tmux capture-pane``, the screen as drawn (a countdown
redrawn on one line is one line there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PROMPT = "$ "
#: The most lines each screen of docs/transcripts.md may take (the command's line included),
#: by its key; tests/lab/test_transcripts.py pins the live captures, tests/unit/test_reports.py
#: the docs.
TRANSCRIPT_LIMITS: dict[str, int] = {
    "refused enable": 6, "allow 22": 10, "status": 9, "confirm": 2, "enable": 10,
    "allow 80": 10, "refused deny": 6, "history": 9, "check allow 80": 12, "check deny 22": 15,
}
WIDTH, HEIGHT = 100, 50


class Terminal:
    """``with Terminal(lab.ssh_argv(SHELL, tty=True)) as term: term.run("fwsafe status")``."""

    def __init__(self, argv: list[str]) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            raise RuntimeError("tmux is missing: scripts/setup.sh --test installs it")
        self.tmux = tmux
        self.dir = Path(tempfile.mkdtemp(prefix="fwsafe-term-"))
        self.socket = str(self.dir / "tmux.sock")
        self._tmux("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "t",
                   "--", *argv)
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")
        self.wait_for(re.escape(PROMPT.rstrip()) + r"\s*$", 30)

    def _tmux(self, *args: str) -> str:
        return subprocess.run([self.tmux, "-S", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def capture(self, escapes: bool = False) -> str:
        """The screen's lines so far (scrollback included), trailing blanks dropped;
        ``escapes``: with the colours as escape sequences."""
        text = self._tmux("capture-pane", "-p", "-J", *(["-e"] if escapes else []), "-S", "-",
                          "-t", "t")
        return "\n".join(line.rstrip() for line in text.rstrip("\n").splitlines())

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)
        self._tmux("send-keys", "-t", "t", "Enter")

    def start(self, command: str, pattern: str, limit_s: float = 60) -> str:
        """Type ``command`` and wait until ``pattern`` shows once more than before (e.g. its
        countdown), without waiting for the prompt."""
        seen = len(re.findall(pattern, self.capture(), re.M))
        self.type(command)
        return self.wait_for(pattern, limit_s, times=seen + 1)

    def wait_for(self, pattern: str, limit_s: float, times: int = 1) -> str:
        end = time.monotonic() + limit_s
        while True:
            screen = self.capture()
            if len(re.findall(pattern, screen, re.M)) >= times:
                return screen
            if time.monotonic() > end:
                raise AssertionError(f"no {pattern!r} on the screen within {limit_s} s:\n{screen}")
            time.sleep(0.1)

    def run(self, command: str, limit_s: float = 120) -> str:
        """Type ``command``; when the prompt is back, what it printed (the screen from the
        command's line on, the new prompt left out)."""
        before = len(_prompts(self.capture().split("\n")))
        self.type(command)
        end = time.monotonic() + limit_s
        while True:
            lines = self.capture().split("\n")
            starts = _prompts(lines)
            if len(starts) > before and starts[-1] == len(lines) - 1 and lines[-1] == "$":
                return "\n".join(lines[starts[before - 1]:-1])
            if time.monotonic() > end:
                raise AssertionError(f"{command!r} did not finish within {limit_s} s:\n"
                                     + "\n".join(lines))
            time.sleep(0.1)


def _prompts(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line == "$" or line.startswith(PROMPT)]


def lab_shell(env: dict[str, str]) -> str:
    """The remote command of the session: an interactive bash with a plain prompt."""
    assigns = " ".join(f"{k}={v}" for k, v in env.items())
    return f"env {assigns} PS1='{PROMPT}' bash --norc --noprofile -i"
