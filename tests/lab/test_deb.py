"""The Debian package, installed with dpkg in a real systemd container (tests/systemdlab.py).

The .deb is built once per session by scripts/build-deb.sh (dpkg-buildpackage, lintian) into a
temporary directory, copied into a container that has no fwsafe of its own (no /opt/fwsafe:
the ``sdlab_bare_image`` fixture) and installed with ``dpkg -i``: its dependencies (Debian's
python3-click, python3-paramiko, iptables, nftables) are in the cached root fs, and there is no
apt mirror in there. Then: the boot unit is enabled, fwsafe runs with Debian's click and
paramiko, a lockout reverts on time, a hard reboot mid-window comes back with the old rules
through the packaged unit, and removal refuses while a change is pending. Every test also runs
on Debian 13 (trixie: its Python 3.13, click 8.1.8, paramiko 3.5, systemd 257).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.test_systemd_lab import NETFILTER_PERSISTENT_UNIT
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_NEW_SSH, GOOD
from tests.systemdlab import IN_CI, TRIXIE, Image, SystemdLab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
UNIT = "fwsafe-recover.service"
PACKAGED = (f"/lib/systemd/system/{UNIT}", f"/usr/lib/systemd/system/{UNIT}")
PROBE_SLACK_S = 0.3   # a probe of "SSH answers" is a fresh interpreter (see test_systemd_lab)


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/build-deb.sh, once per session, into a temporary directory: the .deb."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        reason = "no apt-get/dpkg here: the .deb is built with Debian's tooling"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "scripts/build-deb.sh"), str(out)],
                            capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, f"build-deb.sh failed:\n{result.stdout}\n{result.stderr}"
    debs = sorted(out.glob("fwsafe_*_all.deb"))
    assert len(debs) == 1, result.stdout
    print(f"\n[deb] built {debs[0].name} in {time.monotonic() - started:.1f} s\n"
          + "\n".join(ln for ln in result.stdout.splitlines() if "lintian" in ln or ln.startswith("    ")))
    return debs[0]


@pytest.fixture
def debian(request: pytest.FixtureRequest, deb: Path) -> Iterator[SystemdLab]:
    """A booted container without fwsafe, then the .deb installed with dpkg -i. Bookworm;
    trixie for a test parametrized with ``debian=["trixie"]`` (indirect)."""
    generation = getattr(request, "param", "bookworm")
    image: Image = request.getfixturevalue(
        "sdlab_trixie_bare_image" if generation == TRIXIE else "sdlab_bare_image")
    lab = SystemdLab.start(image)
    try:
        assert lab.exec(["sh", "-c", "command -v fwsafe || test -e /opt/fwsafe"],
                        check=False).returncode != 0, "the container already has a fwsafe"
        shutil.copyfile(deb, lab.root / "root" / deb.name)
        started = time.monotonic()
        installed = lab.exec(["dpkg", "-i", f"/root/{deb.name}"], check=False, timeout=300)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        print(f"\n[deb] dpkg -i in {time.monotonic() - started:.2f} s")
        yield lab
    finally:
        lab.close()


def _ssh_json(lab: SystemdLab, command: str, *, expect: int = 0) -> dict[str, Any]:
    result = lab.ssh(command, timeout=120)
    assert result.returncode == expect, (
        f"`{command}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _iptables_baseline(lab: SystemdLab) -> None:
    lab.exec(["iptables-restore"], input=BASELINE_V4)
    lab.exec(["ip6tables-restore"], input=BASELINE_V6)


def _no_second_unit(lab: SystemdLab) -> None:
    """apply recognised the packaged unit: nothing written to /etc/systemd/system, and the
    wants symlink is still the one dpkg made (to /lib/systemd/system)."""
    etc = lab.exec(["test", "-e", f"/etc/systemd/system/{UNIT}"], check=False)
    assert etc.returncode != 0, "apply wrote a second unit to /etc/systemd/system"
    link = lab.exec(["readlink", f"/etc/systemd/system/sysinit.target.wants/{UNIT}"],
                    check=False).stdout.strip()
    assert link in PACKAGED, link


# --------------------------------------------------------------------------- installed


GENERATIONS = pytest.mark.parametrize("debian", ["bookworm", TRIXIE], indirect=True)


@GENERATIONS
def test_the_deb_installs_enables_the_boot_unit_and_runs(debian: SystemdLab) -> None:
    lab = debian
    enabled = lab.exec(["systemctl", "is-enabled", UNIT], check=False).stdout.strip()
    assert enabled == "enabled", lab.exec(["systemctl", "status", UNIT], check=False).stdout
    fragment = lab.exec(["systemctl", "show", "-P", "FragmentPath", UNIT]).stdout.strip()
    assert fragment in PACKAGED, fragment
    _no_second_unit(lab)
    # The login hook of the power-cycle recovery is enabled (pam-auth-update): an SSH login
    # leaves its mark.
    assert "/usr/lib/fwsafe/login-mark" in lab.read("/etc/pam.d/common-session")

    version = lab.ssh("fwsafe --version")  # over SSH: root's PATH finds /usr/bin/fwsafe
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("fwsafe, version "), version.stdout
    mark = lab.read("/var/lib/fwsafe/login-mark").split()
    assert mark[0] == lab.boot_id(), mark
    assert "installed: deb" in version.stdout, version.stdout
    assert lab.ssh("command -v fwsafe").stdout.strip() == "/usr/bin/fwsafe"
    assert lab.ssh("fwsafe --help").returncode == 0
    libs = lab.exec(["python3", "-c", "import click, paramiko, fwsafe; print(click.__version__, "
                     "paramiko.__version__, fwsafe.__file__)"]).stdout.split()
    print(f"[deb] Debian's click {libs[0]}, paramiko {libs[1]}; {libs[2]}")
    assert libs[2].startswith("/usr/lib/python3/dist-packages/fwsafe/"), libs

    state = lab.exec(["stat", "-c", "%a %U %G", "/var/lib/fwsafe"]).stdout.split()
    assert state == ["700", "root", "root"], state
    conffiles = lab.exec(["dpkg-query", "-W", "-f=${Conffiles}", "fwsafe"]).stdout
    assert "/etc/fwsafe/fwsafe.toml" in conffiles, conffiles
    config = lab.read("/etc/fwsafe/fwsafe.toml")
    assert all(not ln.strip() or ln.lstrip().startswith("#") for ln in config.splitlines())
    assert "# timeout = 60" in config
    _ssh_json(lab, "fwsafe status --json")   # reads /etc/fwsafe/fwsafe.toml: no error
    for path in ("/usr/share/bash-completion/completions/fwsafe",
                 "/usr/share/zsh/vendor-completions/_fwsafe", "/usr/share/fwsafe/fwsafe.pyz"):
        assert lab.exec(["test", "-s", path], check=False).returncode == 0, path
    completion = lab.exec(["env", "_FWSAFE_COMPLETE=bash_complete", "COMP_WORDS=fwsafe ap",
                           "COMP_CWORD=1", "fwsafe"], check=False).stdout
    assert "apply" in completion, completion
    rescue = lab.exec(["python3", "/usr/share/fwsafe/fwsafe.pyz", "rescue", "--help"], check=False)
    assert rescue.returncode == 0 and "--last-good" in rescue.stdout, rescue.stdout + rescue.stderr

    # The SSH probes with Debian's paramiko 2.12: a key exchange, then a full key login.
    lab.exec(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/root/.ssh/id_ed25519"])
    lab.exec(["sh", "-c", "cat /root/.ssh/id_ed25519.pub >> /root/.ssh/authorized_keys"])
    probe = _ssh_json(lab, "fwsafe probe --json ssh://127.0.0.1:22 ssh-auth://root@127.0.0.1:22")
    assert probe["ok"], probe
    assert "SHA256:" in json.dumps(probe), probe   # the host key's fingerprint, as OpenSSH's


# --------------------------------------------------------------------------- the guard


@GENERATIONS
def test_a_lockout_reverts_on_time(debian: SystemdLab) -> None:
    lab = debian
    _iptables_baseline(lab)
    before = lab.ruleset()
    lab.write("/root/drop-new.rules", DROP_NEW_SSH)
    applied = _ssh_json(lab, "fwsafe apply --detach --json --force --timeout 6 /root/drop-new.rules")
    assert applied["state"] == "pending", applied
    info = lab.status()
    assert info["guard_mode"] == "systemd-run", info
    assert not lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    _no_second_unit(lab)
    deadline = float(info["deadline"])
    lab.wait_ssh(30)
    late = time.time() - deadline
    print(f"\n[deb] lockout reverted: SSH answered {late:+.2f} s from the deadline")
    assert late < 3.0 + PROBE_SLACK_S
    final = _ssh_json(lab, "fwsafe status --json")
    assert final["state"] == "reverted" and "timeout" in final["reason"], final
    assert lab.ruleset() == before


@GENERATIONS
def test_a_hard_reboot_mid_window_reverts_through_the_packaged_unit(debian: SystemdLab) -> None:
    lab = debian
    lab.write("/etc/iptables/rules.v4", BASELINE_V4, mode="0640")
    lab.write("/etc/iptables/rules.v6", BASELINE_V6, mode="0640")
    lab.write("/etc/systemd/system/netfilter-persistent.service", NETFILTER_PERSISTENT_UNIT)
    lab.exec(["systemctl", "daemon-reload"])
    lab.exec(["systemctl", "enable", "--now", "netfilter-persistent.service"])
    lab.write("/root/change.rules", DROP_NEW_SSH)
    before = lab.ruleset()
    tx_id = _ssh_json(lab, "fwsafe apply --detach --json --force --timeout 300 "
                           "/root/change.rules")["id"]
    assert not lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    _no_second_unit(lab)
    issued = time.monotonic()
    lab.reboot(hard=True)
    lab.wait_ssh(60)
    print(f"\n[deb] hard reboot mid-window -> SSH answering: {time.monotonic() - issued:.2f} s")
    assert lab.wait_booted() in ("running", "degraded")
    journal = lab.journal("-b", "-u", UNIT, lines=30)
    assert lab.ruleset() == before, journal
    info = _ssh_json(lab, "fwsafe status --json")
    assert info["id"] == tx_id and info["state"] == "reverted", f"{info}\n{journal}"
    assert re.search(r"reboot", info["reason"] or "", re.I), info
    ran = dict(line.partition("=")[::2] for line in lab.exec(
        ["systemctl", "show", "-p", "ExecMainStatus", "-p", "ExecMainStartTimestampMonotonic",
         "-p", "FragmentPath", UNIT]).stdout.splitlines())
    assert ran["FragmentPath"] in PACKAGED, ran
    assert ran["ExecMainStatus"] == "0" and ran["ExecMainStartTimestampMonotonic"] != "0", ran


# --------------------------------------------------------------------------- removal


@GENERATIONS
def test_removal_refuses_while_pending_and_purge_cleans_up(debian: SystemdLab) -> None:
    lab = debian
    _iptables_baseline(lab)
    lab.write("/root/good.rules", GOOD)
    tx_id = _ssh_json(lab, "fwsafe apply --detach --json --timeout 120 /root/good.rules")["id"]

    refused = lab.exec(["apt-get", "remove", "-y", "fwsafe"], check=False, timeout=120)
    print(f"\n[deb] apt-get remove while pending: exit {refused.returncode}")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "REFUSING TO REMOVE fwsafe" in refused.stdout + refused.stderr
    assert tx_id in refused.stdout + refused.stderr
    assert "install ok installed" in lab.exec(["dpkg-query", "-W", "-f=${Status}", "fwsafe"]).stdout
    info = lab.status()
    assert info["state"] == "pending" and info["guard_alive"], info

    confirmed = lab.ssh(f"fwsafe confirm {tx_id}")   # from a NEW session
    assert confirmed.returncode == 0, confirmed.stdout + confirmed.stderr
    real_ufw = lab.exec(["sha256sum", "/usr/sbin/ufw"]).stdout.split()[0]
    lab.exec(["fwsafe", "shim", "install"])
    removed = lab.exec(["apt-get", "remove", "-y", "fwsafe"], check=False, timeout=120)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    # The shim went with fwsafe: the real ufw is back where it was, and it runs.
    assert lab.exec(["sha256sum", "/usr/sbin/ufw"]).stdout.split()[0] == real_ufw
    assert lab.exec(["dpkg-divert", "--list", "/usr/sbin/ufw"]).stdout.strip() == ""
    assert lab.exec(["ufw", "version"], check=False).returncode == 0
    assert lab.exec(["test", "-e", "/usr/bin/fwsafe"], check=False).returncode != 0
    assert "fwsafe" not in lab.read("/etc/pam.d/common-session"), "the login hook is left"
    assert lab.ssh("true").returncode == 0   # logins work without it
    assert lab.exec(["test", "-d", "/var/lib/fwsafe/history"], check=False).returncode == 0, \
        "remove keeps the state directory (only purge removes it)"
    assert lab.exec(["test", "-f", "/etc/fwsafe/fwsafe.toml"], check=False).returncode == 0

    purged = lab.exec(["dpkg", "--purge", "fwsafe"], check=False, timeout=120)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    for path in ("/var/lib/fwsafe", "/etc/fwsafe",
                 f"/etc/systemd/system/sysinit.target.wants/{UNIT}"):
        assert lab.exec(["test", "-e", path], check=False).returncode != 0, f"{path} is left"
