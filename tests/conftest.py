"""Shared fixtures. Lab tests need root and network namespaces: outside CI they skip when
those are missing; in CI (CI=true) they must run, so a missing capability fails them."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fwsafe.lab import Lab, create_lab, require_lab_capable
from tests.bins import FWSAFE, put_venv_first_on_path
from tests.rulesets import BASELINE_V4, BASELINE_V6
from tests.systemdlab import (  # noqa: F401 - the systemd lab's fixtures
    sdlab,
    sdlab_bare_image,
    sdlab_generation_image,
    sdlab_image,
    sdlab_trixie,
    sdlab_trixie_bare_image,
    sdlab_trixie_image,
)

if TYPE_CHECKING:  # imported at run time only by the neighbour fixtures
    from tests.neighbours import Dockerd, Fail2ban

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


def require_capable() -> None:
    """Skip where labs cannot be built here; in CI (where they must run) fail instead."""
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

    def srv_python(self, script: str, *args: str, timeout: float = 120) -> Any:
        """Run a Python `script` (this interpreter, fwsafe importable) in the server namespace;
        it must succeed and print one JSON value, which is returned (and printed)."""
        result = self.lab.srv_exec([sys.executable, "-c", script, *args], check=False,
                                   timeout=timeout)
        assert result.returncode == 0, result.stderr
        value = json.loads(result.stdout)
        print(value)
        return value

    def wait_state(self, states: set[str], limit_s: float) -> dict[str, Any]:
        end = time.monotonic() + limit_s
        while True:
            info = self.status()
            if info["state"] in states or time.monotonic() > end:
                return info
            time.sleep(0.1)


def _build(private_ufw: bool) -> Iterator[FwLab]:
    require_capable()
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


# --- real neighbours (fail2ban, dockerd) in the lab: see tests/neighbours.py ----------------


class NeighbourLab(FwLab):
    """An fwlab whose server namespace also runs the real fail2ban and/or dockerd.

    `f2b` / `docker`: the running neighbours (an error when the fixture started none);
    `clients`: ten extra client addresses (10.231.<index>.50-59) to ban or probe from;
    `before_neighbours`: the normalised iptables-save of the server as it was before any
    neighbour started (a "rules file written before fail2ban/Docker started")."""

    def __init__(self, lab: Lab, f2b: Fail2ban | None, docker: Dockerd | None,
                 clients: list[str], before_neighbours: str) -> None:
        super().__init__(lab)
        self._f2b = f2b
        self._docker = docker
        self.clients = clients
        self.before_neighbours = before_neighbours

    @property
    def f2b(self) -> Fail2ban:
        if self._f2b is None:
            raise AssertionError("no fail2ban here: use the f2b_lab or neighbours_lab fixture")
        return self._f2b

    @property
    def docker(self) -> Dockerd:
        if self._docker is None:
            raise AssertionError("no dockerd here: use the docker_lab or neighbours_lab fixture")
        return self._docker

    def save(self, tool: str = "iptables-save") -> str:
        """The live ruleset (iptables-save or ip6tables-save), without comments and counters."""
        from tests.neighbours import normalize_save

        return normalize_save(self.lab.srv_exec([tool]).stdout)

    def record(self, title: str) -> str:
        """Print (visible with -s, and on failure) and return the live IPv4 ruleset."""
        text = self.save()
        print(f"\n===== {title} =====\n{text}", end="", flush=True)
        return text


def our_namespaces(pid: int | None = None) -> list[str]:
    """Sandbox namespaces of fwsafe process `pid`; without it, those left behind: their owner
    (the PID in the name) is gone. Another user's running check on the same machine is not
    ours to count."""
    from fwsafe.check.netns import orphans
    from fwsafe.check.sandbox import CHECK_PREFIX

    if pid is None:
        return orphans(CHECK_PREFIX)   # the guard's proof (fwpr...) is not the check's
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout.split()
    return [n for n in names if (m := re.match(r"^fwck(\d+)x?[sc]$", n)) and int(m[1]) == pid]



def need_programs(paths: tuple[str, ...]) -> None:
    """Skip (in CI: fail) unless every program of `paths` is installed."""
    from tests.neighbours import missing_programs

    missing = missing_programs(paths)
    if missing:
        reason = ("missing: " + ", ".join(missing) + " (`bash scripts/setup.sh --test` installs "
                  "fail2ban, docker.io and busybox-static)")
        if IN_CI:
            pytest.fail(f"neighbour lab tests must run in CI, but {reason}")
        pytest.skip(reason)


def _neighbour_lab(f2b: bool, docker: bool) -> Iterator[NeighbourLab]:
    from tests import neighbours

    require_capable()
    need_programs((neighbours.F2B_PROGRAMS if f2b else ())
                   + (neighbours.DOCKER_PROGRAMS if docker else ()))
    with contextlib.contextmanager(_build)(False) as fw:  # the lab's own teardown last
        helpers: list[Fail2ban | Dockerd] = []
        try:
            before = neighbours.normalize_save(fw.lab.srv_exec(["iptables-save"]).stdout)
            clients = neighbours.add_client_addresses(fw.lab)
            f2b_helper: Fail2ban | None = None
            docker_helper: Dockerd | None = None
            if f2b:
                f2b_helper = neighbours.Fail2ban(fw.lab)
                helpers.append(f2b_helper)
                f2b_helper.start()
            if docker:
                docker_helper = neighbours.Dockerd(fw.lab)
                helpers.append(docker_helper)
                docker_helper.start()
                docker_helper.import_busybox()
            yield NeighbourLab(fw.lab, f2b_helper, docker_helper, clients, before)
        finally:
            errors = []
            for helper in reversed(helpers):  # every one, even when another fails
                try:
                    helper.close()
                except Exception as exc:
                    errors.append(f"{type(helper).__name__}: {exc}")
            if errors:
                pytest.fail("neighbour teardown incomplete: " + "; ".join(errors))


@pytest.fixture
def f2b_lab() -> Iterator[NeighbourLab]:
    """fwlab + a real fail2ban (one sshd jail, iptables-multiport) in the server namespace."""
    yield from _neighbour_lab(f2b=True, docker=False)


@pytest.fixture
def docker_lab() -> Iterator[NeighbourLab]:
    """fwlab + a real dockerd (busybox image imported) in the server namespace."""
    yield from _neighbour_lab(f2b=False, docker=True)


@pytest.fixture
def neighbours_lab() -> Iterator[NeighbourLab]:
    """fwlab + both: fail2ban and dockerd in the server namespace."""
    yield from _neighbour_lab(f2b=True, docker=True)


@pytest.fixture
def keep_signals() -> Iterator[None]:
    """guard.main and the backstop ignore the terminal signals: put the test process's
    handlers back afterwards."""
    signums = [signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTTOU,
               signal.SIGTTIN, signal.SIGTSTP, signal.SIGTERM]
    saved = {s: signal.getsignal(s) for s in signums}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
