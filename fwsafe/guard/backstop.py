"""The backstop: a second, independent way back when the guard itself dies or is stuck.

The guard is the dead-man's switch; the backstop is the switch's own dead-man's switch. While
a transaction is open, a watcher process (``--watch``) started by the guard in a session of its
own holds a pidfd of the guard and keeps its own copy of the deadline on CLOCK_BOOTTIME, which
the guard sends it over the watcher's stdin (a pipe: no disk involved) when the change goes
live and with every extension, with a heartbeat from the guard's main loop:

* the guard dies (``kill -9``, the OOM killer, a crash) while the transaction is open: the
  watcher wakes at once and undoes the change from the snapshots on disk (the same merge-based
  revert as the guard's; it never gives up);
* the guard is alive but stuck (SIGSTOP, a hung mount, a deadlock: no heartbeat, and it is not
  waiting for a tool it runs) at the deadline + ``stuck_grace`` (default 5 s): the watcher kills
  it (SIGKILL through its pidfd; under systemd ``systemctl kill`` of its unit) and takes over.

With systemd as PID 1 the guard is a transient unit whose ``ExecStopPost=<python> -m
fwsafe.guard.backstop --after-stop STATE TX`` is what takes over: systemd runs it whenever the
guard's main process is gone, however it ended; the watcher (in the unit) only kills a stuck
guard there. systemd's own limit, for when the guard and the watcher are frozen together, is a
transient timer the guard sets to the deadline + ``hatch_grace`` + ``stuck_grace`` and moves
with every extension (``RuntimeMaxSec=`` cannot be changed once the unit runs: systemd 252
refuses it), which ``systemctl kill``s the unit; ExecStopPost= then takes over.

The take-over claims the transaction (tx/<id>/lock, which the guard holds for its life), marks
it reverting and reverts without holding the state directory's lock, so `confirm`, `revert` and
`status` answer at once meanwhile. The record then says ``reverted_by: backstop``. Nothing on
the way back needs the disk: the log goes to stderr (the guard's log file, or the journal) and
a record that cannot be written (ENOSPC, EIO, read-only) is kept in memory and written once
space returns.


The backstop's parts: the guard's side (fwsafe.guard.backstop_keeper), the watcher
(fwsafe.guard.watcher), the take-over (fwsafe.guard.takeover), what they share
(fwsafe.guard.backstop_tools). This module is the backstop process's entry
(`python -m fwsafe.guard.backstop`); it keeps its imports small.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fwsafe.core.statedir import StateDir
from fwsafe.guard.backstop_tools import log, quiet_std, run_tool, unit_name, write_line
from fwsafe.guard.takeover import late, limit, take_over
from fwsafe.guard.watcher import watch
from fwsafe.tool_stack import raise_for_tools

USAGE = ("usage: python -m fwsafe.guard.backstop --watch|--watch-unit|--after-stop|--take-over"
         "|--limit STATE_DIR TX_ID\n       python -m fwsafe.guard.backstop --converge [STATE_DIR]")


def main(argv: Sequence[str] | None = None) -> int:
    raise_for_tools()   # started by systemd-run: its own limit (fwsafe.tool_stack)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--converge"] and len(args) <= 2:
        args = [*args, "", ""][:3]
    if len(args) != 3 or args[0] not in ("--watch", "--watch-unit", "--after-stop",
                                         "--take-over", "--converge", "--limit"):
        write_line(USAGE)
        return 2
    how, state_dir, tx_id = args
    if how == "--converge" and not state_dir:
        # imported by the guard and backstop processes, which keep their imports small: loaded when
        # used
        from fwsafe.core.config import load_config
        from fwsafe.core.statedir import resolve_state_dir

        try:
            state_dir = str(resolve_state_dir(None, load_config(None).state_dir))
        except Exception as exc:  # noqa: BLE001 - a broken config: the hook says nothing
            log(f"no state directory ({exc})")
            return 0
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    quiet_std()
    try:  # shielded from the OOM killer where the kernel allows (children inherit it)
        Path("/proc/self/oom_score_adj").write_text("-1000")
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            log(f"oom_score_adj: {exc}")
    state = StateDir(Path(state_dir))
    if how in ("--take-over", "--converge"):
        return late(state, tx_id or None)
    if how == "--limit":
        return limit(state, tx_id)
    if how == "--after-stop":
        # systemd runs this after the guard unit's main process is gone, however it ended.
        result = os.environ.get("SERVICE_RESULT", "unknown")
        code = take_over(state, tx_id, f"the guard unit stopped ({result})")
        # systemd's limit of a guard that could not stop it itself (it was killed)
        run_tool(["systemctl", "stop", f"fwsafe-limit-{tx_id}-*.timer"], tries=1)
        return code
    return watch(state, tx_id, unit_name(tx_id) if how == "--watch-unit" else None)


if __name__ == "__main__":
    sys.exit(main())
