"""The crash matrix in the namespace lab (setsid guard, watcher backstop): every failpoint of
fwsafe x {SIGKILL the CLI, SIGKILL the guard, SIGKILL guard and backstop together, SIGSTOP the
guard, SIGSTOP guard and backstop together, raise MemoryError}. Each trial: a NEW SSH connection
gets in by the deadline + 10 s (+ hatch_grace + 5 s where everything of fwsafe was frozen or
killed: then only the kernel escape hatch lets it in), nothing needs a hand (every trial settles
by itself, no record left open and no hatch left before the next apply: the first command,
here `fwsafe status`, takes over a transaction left past its deadline with nobody on it; then
the next apply works), the record and the exit codes tell the truth (tests/crashmatrix.py).

Run: CI=true .venv/bin/python -m pytest -p no:cacheprovider -s tests/lab/test_crash_matrix.py
(-s prints every trial and the worst time to SSH in each column). FWSAFE_MATRIX_LABS sets how
many labs run trials side by side (default 5); FWSAFE_MATRIX_POINTS and FWSAFE_MATRIX_COLUMNS
(comma-separated) run a part of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fwsafe.check.netns import NETNS_DIR
from fwsafe.lab import Lab, create_lab
from tests.conftest import require_capable
from tests.crashmatrix import (
    COLUMNS,
    Host,
    Matrix,
    NetnsProber,
    run_parallel,
    scan_processes,
    summary,
    trials,
)
from tests.rulesets import BASELINE_V4, BASELINE_V6

pytestmark = pytest.mark.lab

LABS = int(os.environ.get("FWSAFE_MATRIX_LABS", "5"))


class NamespaceHost(Host):
    """A namespace lab's server, as the matrix reaches it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state_dir = str(lab.workdir / "state")
        self.client_ip, self.server_ip = lab.cli_ip4, lab.srv_ip4
        self.failpoint_dir = str(lab.workdir / "failpoints")
        self.markers_here = Path(self.failpoint_dir)
        self.rules_dir = str(lab.workdir)
        Path(self.failpoint_dir).mkdir(mode=0o700)
        self.prober = NetnsProber(str(NETNS_DIR / lab.cli_ns))
        self.logs = lab.workdir / "cli.log"

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        result = self.lab.srv_exec(self.env_argv(argv, env), check=False, input=input,
                                   timeout=timeout)
        return result.returncode, result.stdout, result.stderr

    def start(self, argv: Sequence[str], env: dict[str, str]) -> Any:
        with open(self.logs, "ab") as log:
            return self.lab.srv_popen(self.env_argv(argv, env), stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log)

    def processes(self) -> dict[str, list[int]]:
        return scan_processes(self.state_dir)

    def write(self, path: str, text: str) -> None:
        Path(path).write_text(text)

    def close(self) -> None:
        self.prober.close()
        left = self.processes()
        self.signal(left["guard"] + left["backstop"], signal.SIGKILL)


@pytest.fixture
def matrix_hosts() -> Iterator[list[NamespaceHost]]:
    require_capable()
    hosts: list[NamespaceHost] = []
    labs: list[Lab] = []
    try:
        for index in range(LABS):
            lab = create_lab(f"fwm{os.getpid() % 100000}{index}", 200 + index)
            labs.append(lab)
            lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
            lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)
            lab.start_sshd(env={"FWSAFE_STATE_DIR": str(lab.workdir / "state")})
            hosts.append(NamespaceHost(lab))
        yield hosts
    finally:
        for host in hosts:
            host.close()
        for lab in labs:
            lab.close()


def test_crash_matrix(matrix_hosts: list[NamespaceHost]) -> None:
    points = [p for p in os.environ.get("FWSAFE_MATRIX_POINTS", "").split(",") if p]
    columns = [c for c in os.environ.get("FWSAFE_MATRIX_COLUMNS", "").split(",") if c]
    work = trials(points or None, columns or COLUMNS)
    results = run_parallel([Matrix(host) for host in matrix_hosts], work)
    print("\n" + summary(results))
    assert len(results) == len(work)
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
