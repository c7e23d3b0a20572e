"""Shared fixtures. Lab tests need root and network namespaces: outside CI they skip when
those are missing; in CI (CI=true) they must run, so a missing capability fails them."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fwsafe.lab import Lab, create_lab, require_lab_capable
from tests.bins import FWSAFE, put_venv_first_on_path
from tests.rulesets import BASELINE_V4, BASELINE_V6

_INDEX = itertools.count(10)
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")

put_venv_first_on_path()


@pytest.fixture(scope="session", autouse=True)
def _own_fwsafe() -> None:
    """Fail at once, with the reason, when the suite would run somebody else's fwsafe."""
    found = shutil.which("fwsafe")
    if not Path(FWSAFE).exists() or found != FWSAFE:
        pytest.fail(f"the tests must run {FWSAFE} (this interpreter's entry point), "
                    f"but PATH finds {found}: install the repo with `bash scripts/setup.sh`")


def _capable() -> None:
    reason = require_lab_capable()
    if reason:
        if IN_CI:
            pytest.fail(f"lab tests must run in CI, but: {reason}")
        pytest.skip(reason)


class FwLab:
    """A lab with sshd running, a baseline ruleset, and helpers to drive fwsafe in it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state_dir = lab.workdir / "state"

    def write(self, name: str, text: str) -> Path:
        path = self.lab.workdir / name
        path.write_text(text)
        return path

    def fw(self, *args: str, check: bool = False, timeout: float = 60) -> Any:
        """Run fwsafe in the server namespace (not over SSH)."""
        return self.lab.srv_exec(["env", f"FWSAFE_STATE_DIR={self.state_dir}", FWSAFE, *args],
                                 check=check, timeout=timeout)

    def fw_in_cgroup(self, cgroup: Any, *args: str) -> subprocess.CompletedProcess[str]:
        """Run fwsafe in the server namespace inside `cgroup` (joined before `ip netns exec`,
        which hides /sys/fs/cgroup behind a fresh sysfs)."""
        argv = cgroup.wrap_argv(["ip", "netns", "exec", self.lab.srv_ns, "env",
                                 f"FWSAFE_STATE_DIR={self.state_dir}", FWSAFE, *args])
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return result

    def ufw_files(self) -> dict[str, bytes]:
        """The private ufw files as the server sees them: {relative path: content}."""
        assert self.lab.ufw_dir is not None and self.lab.default_ufw is not None
        files = {str(p.relative_to(self.lab.ufw_dir)): p.read_bytes()
                 for p in sorted(self.lab.ufw_dir.rglob("*")) if p.is_file()}
        files["default/ufw"] = self.lab.default_ufw.read_bytes()
        return files

    def status(self) -> dict[str, Any]:
        result = self.fw("status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def wait_state(self, states: set[str], limit_s: float) -> dict[str, Any]:
        end = time.monotonic() + limit_s
        while True:
            info = self.status()
            if info["state"] in states or time.monotonic() > end:
                return info
            time.sleep(0.1)


def _build(private_ufw: bool) -> Iterator[FwLab]:
    _capable()
    # A ufw lab gets private copies of whole directories (/etc/ufw, /etc/default, ...):
    # a file bind-mounted alone could not be replaced by rename, as fwsafe writes files.
    lab = create_lab(f"fwt{os.getpid()}"[:14], next(_INDEX) % 240 + 10,
                     private_ufw=private_ufw, private_boot_files=private_ufw)
    try:
        if not private_ufw:  # ufw labs start with ufw's rules only, as a ufw host does
            lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
            lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)
        lab.start_sshd(env={"FWSAFE_STATE_DIR": str(lab.workdir / "state")})
        yield FwLab(lab)
    finally:
        lab.close()


@pytest.fixture
def fwlab() -> Iterator[FwLab]:
    """A lab: two namespaces, a real sshd, baseline iptables rules (v4 and v6)."""
    yield from _build(private_ufw=False)


@pytest.fixture
def fwlab_ufw() -> Iterator[FwLab]:
    """The same, with private copies of /etc/ufw and /etc/default/ufw bind-mounted for sshd's
    sessions and for `fwlab.fw(...)` (the real files of this machine are never touched)."""
    yield from _build(private_ufw=True)
