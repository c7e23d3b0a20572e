"""The state of one run of fwsafe, in one place (issue 26): every process-wide value that one
module sets and another reads. `RUN` is the only instance; `RUN.reset()` starts a command
(`fwsafe.cli.main` calls it first, so that a test calling main twice in one process starts
clean; `fwsafe.entry` may have started reading the firewall before that). Nothing else in the
package keeps mutable state at module level (tests/unit/test_architecture.py checks it).

Standard library only: the rescue tool's formats (fwsafe.ondisk) and the guard use it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    #: -1 --quiet (results and errors only); 0 the default; 1 -v (more detail); 2 -vv (also
    #: every command line fwsafe runs). Progress goes to stderr, results to stdout.
    verbosity: int = 0
    #: Told every external command line before it runs (`-vv`: on stderr; fwsafe.runner).
    trace: list[Callable[[Sequence[str]], None]] = field(default_factory=list)
    #: The state directory this run resolved last (where an unexpected error is reported).
    state_dir: Path | None = None
    #: Transactions whose guard this run told to apply: from then on, an error may leave a
    #: change live (exit 5, never 3: fwsafe.cli.failure).
    spawned: list[str] = field(default_factory=list)
    #: The firewall read started before the command was parsed (fwsafe.core.prefetch).
    ahead: Any = None
    #: A capture stripped a rule of the kernel escape hatch: one is loaded (fwsafe.ondisk.hatch_rules).
    hatch_seen: bool = False
    #: Failpoints that fired in this process (fwsafe.failpoints: each fires once unless `*`).
    fired: set[str] = field(default_factory=set)

    def reset(self) -> None:
        """A new command line: what a command sets starts afresh; what this process
        has learned stays (the firewall read started before the command line was parsed, a
        hatch rule seen by that read, the failpoints that fired)."""
        self.verbosity = 0
        self.trace = []
        self.state_dir = None
        self.spawned = []


RUN = Run()
