"""Private files for the lab's server: copies of ufw's files and of the firewall's boot files,
mounted over the real ones in a private mount namespace, so nothing run in the lab reaches the
host's /etc.

A :class:`MountHolder` is a process, started in a network namespace, whose fresh private mount
namespace carries the mounts: a fixed shell program (paths come as positional parameters,
never interpolated) mounts, says ``ready`` and sleeps. Commands join it with ``nsenter``; the
mounts vanish with it. :class:`PrivateFiles` makes the copies and the holder for a lab.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, cast

from fwsafe.check.netns import NETNS_DIR
from fwsafe.lab.procs import LabError, stop_popen, tail

__all__ = ["MountHolder", "PrivateFiles"]

_HOLDER_START_TIMEOUT = 10.0

# Bind-mount the private ufw copies, report readiness, then hold the mount namespace open.
_UFW_SCRIPT = (
    'mount --bind "$1" /etc/ufw && mount --bind "$2" /etc/default/ufw '
    "&& echo ready && exec sleep infinity"
)

# The same with private boot files: an overlay over /etc (upper layer in the workdir), then the
# private copies of the firewall's boot files and ufw's files bound over it.
_BOOT_SCRIPT = (
    'mount -t overlay fwsafe-lab-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc '
    "&& mkdir -p /etc/iptables /etc/fwsafe /etc/default /etc/ufw "
    "&& : > /etc/fwsafe/persist-in-netns "
    '&& mount --bind "$3" /etc/iptables && mount --bind "$4" /etc/ufw '
    '&& mount --bind "$5" /etc/default '
    "&& echo ready && exec sleep infinity"
)


class MountHolder:
    """The process that holds a private mount namespace open inside network namespace
    ``netns``; its stderr goes to ``err_path``."""

    def __init__(self, netns: str, err_path: Path) -> None:
        self.netns = netns
        self.err_path = err_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID whose mount namespace holds the mounts (None unless it runs)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def start(self, prefix: Sequence[str], script: str, args: Sequence[str], *, name: str,
              timeout: float = _HOLDER_START_TIMEOUT) -> None:
        """Run ``sh -c script name args...`` under ``prefix`` (which enters the network
        namespace) in a new private mount namespace; return once it printed ``ready``."""
        argv = [*prefix, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, name, *args]
        with open(self.err_path, "wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=err, start_new_session=True)
        stdout = cast(IO[bytes], self._proc.stdout)
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = os.read(stdout.fileno(), 64) if ready else b""
        if line.strip() != b"ready":
            raise LabError(f"private mount namespace failed: {tail(self.err_path).strip()}")

    def enter_argv(self) -> list[str]:
        """argv prefix that runs a command in the network namespace and these mounts."""
        pid = self.pid
        if pid is None:
            raise LabError(f"the private mount namespace holder in {self.netns} is not running")
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", f"--mount=/proc/{pid}/ns/mnt", "--"]

    def stop(self) -> None:
        """Stop it (its process group), which ends the mount namespace. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_popen(proc, group=True)
            if proc.stdout is not None:
                proc.stdout.close()


def _copy_dir(src: str, dst: Path) -> None:
    """A copy of directory ``src`` at ``dst`` (an empty directory where the host has none)."""
    if dst.exists():
        shutil.rmtree(dst)
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True)
    else:
        dst.mkdir(mode=0o755)


def _copy_file(src: str | Path, dst: Path, *, mode: int = 0o644) -> None:
    """A copy of file ``src`` at ``dst`` (an empty file where there is none)."""
    if os.path.isfile(src):
        shutil.copy2(src, dst)
    else:
        dst.touch(mode=mode)


class PrivateFiles:
    """The lab's private copies, in its workdir, and the mount namespace they are mounted in.

    ``ufw_dir``/``default_ufw``: copies of /etc/ufw and /etc/default/ufw. With ``boot_files``,
    /etc is an overlay whose upper layer is in the workdir, with ``iptables_dir`` (a copy of
    /etc/iptables), ``ufw_dir`` and a copy of /etc/default (``default_ufw`` is its ``ufw``)
    bind-mounted over it, and ``nftables_conf`` the copy of /etc/nftables.conf in the upper
    layer. Only directories are bind-mounted, so that files can be replaced by rename.
    """

    def __init__(self, workdir: Path, netns: str, *, boot_files: bool) -> None:
        self.workdir = workdir
        self.boot_files = boot_files
        self.ufw_dir = workdir / "etc-ufw"
        self.default_ufw = workdir / "default-ufw"
        self.iptables_dir: Path | None = None
        self.nftables_conf: Path | None = None
        self.holder = MountHolder(netns, workdir / "mount-holder.err")

    def prepare(self) -> None:
        """Make the copies (before the mount namespace exists, so that it sees them)."""
        _copy_dir("/etc/ufw", self.ufw_dir)
        _copy_file("/etc/default/ufw", self.default_ufw)
        if not self.boot_files:
            return
        self.iptables_dir = self.workdir / "etc-iptables"
        default_dir = self.workdir / "etc-default"
        upper, work = self.workdir / "etc-overlay", self.workdir / "etc-overlay-work"
        for path in (default_dir, upper, work):
            if path.exists():
                shutil.rmtree(path)
        _copy_dir("/etc/iptables", self.iptables_dir)
        shutil.copytree("/etc/default", default_dir, symlinks=True)
        if self.default_ufw.exists():
            shutil.copy2(self.default_ufw, default_dir / "ufw")
        self.default_ufw = default_dir / "ufw"
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o755)
        self.nftables_conf = upper / "nftables.conf"
        _copy_file("/etc/nftables.conf", self.nftables_conf, mode=0o755)

    def mount(self, prefix: Sequence[str]) -> None:
        """Start the holder (``prefix`` enters the network namespace) with the mounts."""
        if self.boot_files:
            assert self.iptables_dir is not None and self.nftables_conf is not None
            args = [str(self.nftables_conf.parent), str(self.workdir / "etc-overlay-work"),
                    str(self.iptables_dir), str(self.ufw_dir), str(self.default_ufw.parent)]
            script = _BOOT_SCRIPT
        else:
            args, script = [str(self.ufw_dir), str(self.default_ufw)], _UFW_SCRIPT
        self.holder.start(prefix, script, args, name="fwsafe-lab-mounts")
