"""The lab's network: two namespaces joined by a veth pair, their names and addresses, the
per-prefix lock, and whether labs can be built here at all.

The namespaces are made by the shared builder (fwsafe.check.netns, also behind ``fwsafe check``
and ``fwsafe diff``): the veth pair (``eth0`` on each side) is created directly inside them, so
it never exists in the machine's own namespace, whose firewall is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fwsafe.check.netns import Namespaces, NetnsError
from fwsafe.lab.lab_sshd import SSHD
from fwsafe.lab.procs import LabError

__all__ = ["LOCK_DIR", "LabNetwork", "acquire_prefix_lock", "require_lab_capable"]

LOCK_DIR = Path("/run/fwsafe-lab")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,13}$")


@dataclass(frozen=True)
class LabNetwork:
    """Names and addresses of lab ``index`` with ``prefix``: ``<prefix>-srv`` and
    ``<prefix>-cli``, ``10.231.<index>.1``/``.2`` and ``fd00:231:<index>::1``/``::2`` (the
    IPv6 ones "" without ``ipv6``)."""

    prefix: str
    index: int
    ipv6: bool = True

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise LabError(f"invalid lab prefix {self.prefix!r} (1-14 of [A-Za-z0-9_-])")
        if not 1 <= self.index <= 250:
            raise LabError(f"lab index must be in 1..250, got {self.index}")

    @property
    def srv_ns(self) -> str:
        return f"{self.prefix}-srv"

    @property
    def cli_ns(self) -> str:
        return f"{self.prefix}-cli"

    def ip4(self, host: int) -> str:
        return f"10.231.{self.index}.{host}"

    def ip6(self, host: int) -> str:
        return f"fd00:231:{self.index}::{host}" if self.ipv6 else ""

    def addresses(self, host: int) -> list[str]:
        """The addresses (with prefix length) of host 1 (server) or 2 (client) on eth0."""
        return [f"{self.ip4(host)}/24", *([f"{self.ip6(host)}/64"] if self.ipv6 else [])]

    def build(self, namespaces: Namespaces) -> None:
        """Both namespaces (stale ones of the same names removed first), wired and addressed."""
        try:
            for ns in (self.srv_ns, self.cli_ns):
                namespaces.create(ns)
            namespaces.pair(self.srv_ns, self.cli_ns, self.addresses(1), self.addresses(2))
        except NetnsError as exc:
            raise LabError(str(exc)) from exc


def acquire_prefix_lock(prefix: str) -> int:
    """Hold ``/run/fwsafe-lab/<prefix>.lock`` for the lab's lifetime.

    A live lab with the same prefix (this process or another) makes this fail, so that the
    stale-namespace cleanup of :func:`fwsafe.lab.create_lab` never destroys a lab that is in
    use. The lock dies with its process, so a crashed run leaves nothing that blocks the next.
    """
    LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
    fd = os.open(LOCK_DIR / f"{prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise LabError(f"a lab with prefix {prefix!r} is in use by a live process") from exc
        raise
    return fd


def require_lab_capable() -> str | None:
    """None if labs can be built here (root, tools, ``ip netns add`` works); else the reason."""
    if os.geteuid() != 0:
        return "the namespace lab needs root"
    missing = [
        t
        for t in ("ip", "ssh", "ssh-keygen", "unshare", "nsenter", "iptables", "iptables-save")
        if shutil.which(t) is None
    ]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD)
    if missing:
        return "missing tools: " + ", ".join(missing)
    namespaces = Namespaces()
    try:
        namespaces.create(f"fwsafe-probe-{os.getpid()}")
    except NetnsError as exc:
        return f"`ip netns add` failed: {exc}"
    try:
        namespaces.close()
    except NetnsError as exc:
        return f"`ip netns del` failed: {exc}"
    return None
