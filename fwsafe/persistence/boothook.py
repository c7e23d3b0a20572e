"""Boot-time recovery: a systemd unit that runs `fwsafe recover --boot` early at boot.

A reboot while a change is pending must come back with the old rules. The boot files already
hold them (fwsafe writes them only on confirm, see fwsafe.persistence.bootfiles); the unit undoes the rest:
before the network and before netfilter-persistent, ufw and nftables load their files, it
restores the snapshot of a transaction still pending whose guard is gone (ufw's files
included). With nothing pending it does nothing. It also counts boots for the recovery by
power cycle (fwsafe.persistence.powercycle), which needs the login hook that `install()` puts
in place too (fwsafe.persistence.loginhook). It runs before firewalld and sshd as well.

`install()` writes the unit to /etc/systemd/system (under `root` for tests), enables it by
creating the wants symlink itself (no systemctl needed), and puts the rescue zipapp in the state
directory, where a rescue system finds it on the server's disk. The Debian package ships the
same unit in /lib/systemd/system and enables it: `is_installed` counts that one too, so `apply`
on a package install writes no second unit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fwsafe.ondisk.atomic_files import local_path, write_file_atomically
from fwsafe.persistence import loginhook
from fwsafe.rescue.rescue_zipapp import build_zipapp

UNIT_NAME = "fwsafe-recover.service"
UNIT_DIR = "/etc/systemd/system"
PACKAGED_UNIT_DIRS = ("/lib/systemd/system", "/usr/lib/systemd/system")   # the .deb's
WANTED_BY = "sysinit.target"
ZIPAPP_NAME = "fwsafe.pyz"

UNIT_TEMPLATE = """\
# fwsafe: undo a firewall change that was still pending (unconfirmed) when the machine went
# down, and recover by power cycle (two boots within reboot_recovery_window, no SSH login in
# between: the last known-good state). Installed by `fwsafe install-boot-hook`; removed by
# `fwsafe install-boot-hook --uninstall`.
[Unit]
Description=fwsafe: restore the firewall after a reboot during a change or a power-cycle recovery
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service
Wants=network-pre.target
Before=network-pre.target netfilter-persistent.service ufw.service nftables.service
Before=firewalld.service ssh.service ssh.socket sshd.service
Before=shutdown.target
Conflicts=shutdown.target
ConditionPathIsDirectory={state_dir}

[Service]
Type=oneshot
ExecStart={python} -m fwsafe recover --boot --state-dir {state_dir}
Environment=PYTHONUNBUFFERED=1
StandardOutput=journal+console
TimeoutStartSec=300

[Install]
WantedBy={wanted_by}
"""


def render_unit(python: str, state_dir: str) -> str:
    for value in (python, state_dir):
        if not value.startswith("/") or any(c.isspace() or c in "\"'\\%$;" for c in value):
            raise ValueError(f"unsuitable path for a systemd unit: {value!r}")
    return UNIT_TEMPLATE.format(python=python, state_dir=state_dir, wanted_by=WANTED_BY)


def is_installed(root: Path, state_dir: str, *, python: str | None = None) -> bool:
    """The unit is in place, up to date and enabled (nothing for `install` to do): ours in
    /etc/systemd/system, or, when there is none there, the package's (see `packaged_unit`)."""
    unit_dir = local_path(root, UNIT_DIR)
    unit = unit_dir / UNIT_NAME
    link = unit_dir / f"{WANTED_BY}.wants" / UNIT_NAME
    try:
        wanted = render_unit(python or sys.executable, state_dir)
    except ValueError:
        return False
    if loginhook.wanted(root, state_dir):
        return False   # the power-cycle recovery needs the login hook too
    if not os.path.lexists(unit):
        return packaged_unit(root, wanted) is not None
    try:
        current = unit.read_bytes() == wanted.encode()
    except OSError:
        return False
    return current and os.path.islink(link) and os.readlink(link) == f"{UNIT_DIR}/{UNIT_NAME}"


def _directives(text: str) -> list[str]:
    """A unit's lines as systemd reads them: comments and blank lines left out."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", ";"))]


def packaged_unit(root: Path, wanted: str) -> str | None:
    """The path of the distribution package's unit (/lib/systemd/system) when it is enabled
    (the wants symlink points to it) and says what `wanted` says, comments aside; else None."""
    link = local_path(root, UNIT_DIR) / f"{WANTED_BY}.wants" / UNIT_NAME
    if not os.path.islink(link):
        return None
    target = os.readlink(link)
    if target not in [f"{d}/{UNIT_NAME}" for d in PACKAGED_UNIT_DIRS]:
        return None
    try:
        text = local_path(root, target).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return target if _directives(text) == _directives(wanted) else None


def ensure_on_systemd(state_dir: str) -> list[str]:
    """On a systemd host, install and enable the unit unless it is there already (what the
    first `apply` does). Returns what was done ([] = nothing to do). Raises OSError/ValueError
    when it cannot be installed."""
    root = Path("/")
    if is_installed(root, state_dir):
        return []
    done = install(root, state_dir)
    subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60, check=False)
    return done


def install(root: Path, state_dir: str, *, python: str | None = None,
            with_zipapp: bool = True) -> list[str]:
    """Install and enable the unit under `root`; return what was done, one line each."""
    done: list[str] = []
    unit_dir = local_path(root, UNIT_DIR)
    unit_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    text = render_unit(python or sys.executable, state_dir).encode()
    if unit.exists() and unit.read_bytes() == text:
        done.append(f"unit {unit} is up to date")
    else:
        write_file_atomically(unit, text, 0o644, keep_owner=True)
        done.append(f"wrote {unit}")
    wants = unit_dir / f"{WANTED_BY}.wants"
    wants.mkdir(mode=0o755, exist_ok=True)
    link = wants / UNIT_NAME
    target = f"{UNIT_DIR}/{UNIT_NAME}"
    if os.path.islink(link) and os.readlink(link) == target:
        done.append(f"enabled already: {link} -> {target}")
    else:
        if os.path.lexists(link):
            link.unlink()
        os.symlink(target, link)
        done.append(f"enabled: {link} -> {target}")
    done += loginhook.install(root, state_dir)
    if with_zipapp:
        state = local_path(root, state_dir)
        if not state.is_dir():
            state.mkdir(mode=0o700, parents=True)
        pyz = build_zipapp(state / ZIPAPP_NAME, mode=0o600)
        done.append(f"rescue tool: {pyz} (in a rescue system: python3 "
                    f"/mnt{state_dir}/{ZIPAPP_NAME} rescue --root /mnt --list)")
    if root == Path("/"):
        done.append("run `systemctl daemon-reload` for systemd to see it before the next boot")
    return done


def uninstall(root: Path, state_dir: str) -> list[str]:
    """Disable and remove the unit (only if it is fwsafe's); the rescue zipapp stays."""
    done: list[str] = []
    unit_dir = local_path(root, UNIT_DIR)
    link = unit_dir / f"{WANTED_BY}.wants" / UNIT_NAME
    if os.path.islink(link):
        link.unlink()
        done.append(f"disabled: removed {link}")
    unit = unit_dir / UNIT_NAME
    if unit.is_file():
        if b"fwsafe recover" not in unit.read_bytes():
            done.append(f"left {unit} alone: it is not fwsafe's")
        else:
            unit.unlink()
            done.append(f"removed {unit}")
    done += loginhook.uninstall(root)
    if not done:
        done.append("nothing to remove: the boot hook is not installed")
    pyz = local_path(root, state_dir) / ZIPAPP_NAME
    if pyz.exists():
        done.append(f"kept the rescue tool {pyz} (delete it by hand if you want)")
    return done
