"""Running the firewall tools: argument lists only, never a shell."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from fwsafe.context import RUN
from fwsafe.errors import EnvironmentProblem
from fwsafe.tool_stack import TOOL_STACK_BYTES

# fork()/exec() can fail transiently when memory or PIDs run out.
TRANSIENT_ERRNOS = frozenset({errno.ENOMEM, errno.EAGAIN})


_FOUND: dict[tuple[str, str | None], str] = {}


def find_binary(name: str) -> str | None:
    """The tool's path (PATH, then the sbin directories). What was found is remembered while it
    is still there (one access(2) instead of a search of every PATH directory, tens of times
    per check); what was not found is looked for again each time."""
    key = (name, os.environ.get("PATH"))
    known = _FOUND.get(key)
    if known is not None and os.access(known, os.X_OK):
        return known
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is not None:
        _FOUND[key] = found
    return found


def require_binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        raise EnvironmentProblem(
            f"{name} is not installed (not found in PATH or /usr/sbin)",
            hint="install the iptables / nftables package for this system",
        )
    return path


def run(
    argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv`, capture its output; raise nothing for a non-zero exit."""
    for trace in RUN.trace:
        trace(argv)
    return subprocess.run(
        list(argv), input=input, capture_output=True, timeout=timeout, check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def run_persistently(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    timeout: float | None = 120,
    on_retry: Callable[[str], None] | None = None,
    max_delay: float = 1.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` until it actually ran: retry while fork/exec fails for lack of memory or
    PIDs, and while the child is killed by SIGKILL (the OOM killer) before it finished.

    Used by the guard's revert, which must not give up because the machine is out of memory.
    A child that runs and exits non-zero is returned as it is: that is an answer, not a
    resource failure.
    """
    delay = 0.02
    attempt = 0
    while True:
        attempt += 1
        try:
            result = run(argv, input=input, timeout=timeout)
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS:
                raise
            if on_retry:
                on_retry(f"attempt {attempt}: cannot start {argv[0]}: {exc.strerror}")
        except subprocess.TimeoutExpired:
            if on_retry:
                on_retry(f"attempt {attempt}: {argv[0]} timed out after {timeout} s")
        else:
            if result.returncode != -9:
                return result
            if on_retry:
                on_retry(f"attempt {attempt}: {argv[0]} was killed (SIGKILL, out of memory?)")
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


# `python -m MODULE` puts the current directory first on sys.path: run as root from a directory
# someone else can write (/tmp, a user's home), a planted `fwsafe/` there would run instead of
# fwsafe. This runs MODULE (sys.argv[1]) with the directory taken off the path first (Python
# 3.11's -P does the same, and fwsafe supports older Pythons). No single quotes: the shim's
# shell script quotes it in single quotes.
RUN_MODULE = ('import sys\n'
              'if sys.path and sys.path[0] == "": del sys.path[0]\n'
              'import runpy\n'
              'runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)\n')


def module_argv(module: str, *args: str) -> list[str]:
    """argv that runs fwsafe's own `python -m module args...` without the current directory on
    sys.path."""
    return [sys.executable, "-c", RUN_MODULE, module, *args]


def failure_said(result: subprocess.CompletedProcess[bytes]) -> tuple[str, str | None]:
    """What a tool that failed said (its stderr), and how it ended when a signal ended it,
    with a hint for a crash: (text, hint or None). A crash says nothing on stderr: iptables-nft
    1.8.9 overflows its stack reading tables of tens of thousands of chains (SIGSEGV; fwsafe
    raises the soft limit, fwsafe.tool_stack, never past the hard one)."""
    said = result.stderr.decode(errors="replace").strip()
    if result.returncode >= 0:
        return said, None
    try:
        name = signal.Signals(-result.returncode).name
    except ValueError:
        name = f"signal {-result.returncode}"
    ended = f"killed by {name}"
    hint = None
    if -result.returncode == signal.SIGSEGV:
        hint = ("a crash reading a large ruleset is often its stack: fwsafe raises the soft "
                f"stack limit to {TOOL_STACK_BYTES >> 20} MiB, never past the hard one; see "
                "`ulimit -Hs` (systemd: LimitSTACK=) and docs/operations.md")
    return (f"{said} ({ended})" if said else ended), hint
