"""fwsafe's unit tests on the second generation's Python: Debian 13 (trixie), Python 3.13 with
Debian's python3-click, python3-paramiko, python3-pytest and python3-hypothesis, in the trixie
container of the systemd lab (tests/systemdlab.py), from this working tree.

By default a sample that reaches every module and the parsers, formats and state machine
(about 40 s); FWSAFE_TRIXIE_UNIT=all runs the whole unit suite there (about 2.5 min on the
2-core CI machine) but two tests that need what the container lacks (NEEDS_OUTSIDE).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.systemdlab import REPO, SystemdLab

pytestmark = pytest.mark.lab

SAMPLE = (
    "test_architecture.py", "test_config.py", "test_merge.py", "test_merge_cases.py",
    "test_iptables_format.py", "test_rules_input.py", "test_sshd_config.py",
    "test_sshd_layer.py", "test_sshd_socketunit.py", "test_transaction.py", "test_persist.py",
    "test_statedir_hardening.py", "test_history.py", "test_cli_basics.py", "test_ufwfiles.py",
    "test_check_clients.py", "test_remote_hostkeys.py",
)  # fmt: skip


# Not about the Python version, and not possible in the container: a wheel built with pip's
# build isolation needs the package index (the container has no network), and the Ansible
# module's test needs ansible-core (a test extra, not in the root fs).
NEEDS_OUTSIDE = (
    "tests/unit/test_wheel.py::test_a_wheel_builds_without_license_warnings_and_runs",
    "tests/unit/test_remote_faults.py::test_the_ansible_module_scales_its_limits_as_apply_host_does",
)


def _tracked_files() -> list[str]:
    """The working tree's files that git knows or would add (not ignored)."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, timeout=60, check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def test_the_unit_tests_pass_on_python_3_13(sdlab_trixie: SystemdLab) -> None:
    lab = sdlab_trixie
    files = "\n".join(_tracked_files()) + "\n"
    subprocess.run(["tar", "-C", str(REPO), "--null", "-T", "-", "-cf",
                    str(lab.workdir / "src.tar")], input=files.replace("\n", "\0").encode(),
                   check=True, timeout=120)
    lab.exec(["mkdir", "/root/src"])
    with open(lab.workdir / "src.tar", "rb") as tar:
        subprocess.run(lab.exec_argv(["tar", "-C", "/root/src", "-xf", "-"]), stdin=tar,
                       check=True, timeout=120, capture_output=True)
    version = lab.exec(["/opt/fwsafe/bin/python", "-c", "import sys; print(sys.version)"]).stdout
    assert version.startswith("3.13."), version
    which = os.environ.get("FWSAFE_TRIXIE_UNIT", "")
    targets = ["tests/unit"] if which == "all" else [f"tests/unit/{t}" for t in SAMPLE]
    targets += [f"--deselect={test}" for test in NEEDS_OUTSIDE]
    started = time.monotonic()
    # python -m puts /root/src first on sys.path: the tree's fwsafe, not the layer's wheel.
    result = lab.exec(["sh", "-c", 'cd /root/src && exec /opt/fwsafe/bin/python -m pytest '
                       '-p no:cacheprovider -q "$@" 2>&1', "pytest", *targets],
                      check=False, timeout=1200)
    took = time.monotonic() - started
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    print(f"\n[trixie python] {version.split()[0]}: {summary[0]} ({took:.0f} s, "
          f"{'all' if which == 'all' else 'sample'})")
    assert result.returncode == 0, result.stdout[-6000:]
