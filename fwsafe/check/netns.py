"""Named network namespaces, built and removed with ``ip``: the one builder behind the lockout
check's sandbox (fwsafe.check.sandbox), the scratch copy of the firewall that ``diff`` and the
apply-time precheck try a change on (fwsafe.check.simulate), and the namespace lab (fwsafe.lab,
which imports this module; this module imports nothing of the lab).

- :meth:`Namespaces.create` makes a namespace (``ip netns add``) and brings its loopback up. A
  stale namespace of the same name (left by a crashed run) is removed first: what still runs in
  it is killed, or with ``busy="refuse"`` the name is refused while anything lives there.
- :meth:`Namespaces.veth` creates a veth pair with each end directly inside its namespace
  (``ip link add A netns X ... type veth peer name B netns Y``): it never exists in the namespace
  that runs this code, so its names cannot collide with the host's interfaces.
- :meth:`Namespaces.configure` adds addresses (IPv6 ones with ``nodad``, usable at once) and
  brings a link up; :meth:`Namespaces.batch` runs any ``ip`` commands in one ``ip -batch``.
- :meth:`Namespaces.exec_argv` is the argv that runs a command inside (``ip netns exec``).
- :meth:`Namespaces.close` kills what still runs in each namespace it created (by the PIDs
  ``ip netns pids`` lists), deletes it, and raises if one could not be removed.

External commands are argument lists, never shell lines. The firewall of the namespace that
runs this code is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from fwsafe.runner import find_binary

__all__ = [
    "NETNS_DIR",
    "Namespaces",
    "NetnsError",
    "configuring",
    "destroy_netns",
    "kill_until_gone",
    "netns_exists",
    "netns_pids",
    "orphans",
    "remove_orphans",
    "run_command",
]

NETNS_DIR = Path("/run/netns")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_OUTPUT_TAIL = 3000


class NetnsError(Exception):
    """A namespace could not be created, configured or removed."""


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
    error: type[Exception] = NetnsError,
    timeout_error: type[Exception] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a list, no shell) with text output captured, and map its failures.

    A missing program, and a non-zero exit when ``check``, raise ``error``; running longer than
    ``timeout`` seconds raises ``timeout_error`` (default: ``error``), the child killed.
    """
    args = [str(a) for a in argv]
    try:
        result = subprocess.run(
            args,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError as exc:
        raise error(f"command not found: {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise (timeout_error or error)(f"timed out after {timeout:g}s: {' '.join(args)}") from exc
    if check and result.returncode != 0:
        output = result.stderr.strip() or result.stdout.strip()
        raise error(f"command failed (exit {result.returncode}): {' '.join(args)}\n"
                    f"{output[-_OUTPUT_TAIL:]}")
    return result


def _ip() -> str:
    return find_binary("ip") or "ip"


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_pids(name: str) -> list[int]:
    """PIDs of the processes living in network namespace ``name`` (empty if it is gone): those
    whose /proc/PID/ns/net is the namespace bound at /run/netns/NAME, as ``ip netns pids``
    finds them (read here directly: no process to start, twice per namespace removed)."""
    try:
        bound = os.stat(NETNS_DIR / name)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue   # gone meanwhile, or a kernel thread
        if ns.st_ino == bound.st_ino and ns.st_dev == bound.st_dev:
            found.append(int(entry))
    return found


def kill_until_gone(list_pids: Callable[[], Iterable[int]], *, timeout: float = 5.0) -> list[int]:
    """SIGKILL every PID ``list_pids()`` names (never this process) until it names none; the
    PIDs it still names after ``timeout`` seconds (empty once none is left).

    Only for processes that are ours by construction: those in a namespace or cgroup we made.
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in list_pids() if p != me]
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def destroy_netns(name: str, *, ip: str | None = None, timeout: float = 5.0) -> None:
    """SIGKILL what still runs in OUR namespace ``name`` (by PID, until none is left) and delete
    it; a no-op if it does not exist. Raises :class:`NetnsError` if it could not be removed."""
    if not netns_exists(name):
        return
    ip = ip or _ip()
    left = kill_until_gone(lambda: netns_pids(name), timeout=timeout)
    if left:
        raise NetnsError(f"processes still alive in netns {name}: {left}")
    run_command([ip, "netns", "del", name], check=False, timeout=15)
    if netns_exists(name):
        # A stale file without a namespace mounted on it (e.g. after a crash mid-creation).
        with contextlib.suppress(OSError):
            (NETNS_DIR / name).unlink()
    if netns_exists(name):
        raise NetnsError(f"could not delete network namespace {name}")


def _nodad(address: str) -> str:
    return " nodad" if ":" in address else ""


def configuring(dev: str, addresses: Iterable[str] = (), *, addrgen: bool = True,
                up: bool = True) -> list[str]:
    """The ``ip`` commands of :meth:`Namespaces.configure`, for a batch of one's own."""
    lines = [] if addrgen else [f"link set dev {dev} addrgenmode none"]
    lines += [f"addr add {address} dev {dev}{_nodad(address)}" for address in addresses]
    if up:
        lines.append(f"link set {dev} up")
    return lines


class Namespaces:
    """The network namespaces one user (a sandbox, a lab) creates; use as a context manager or
    call :meth:`close`, which removes every one of them."""

    def __init__(self, *, ip: str | None = None) -> None:
        self.ip = ip or _ip()
        self.created: list[str] = []

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self, args: Sequence[str], *, input: str | None = None) -> None:
        run_command([self.ip, *args], input=input, timeout=60)

    def create(self, name: str, *, busy: Literal["kill", "refuse"] = "kill",
               lo_up: bool = True) -> str:
        """``ip netns add name`` with its loopback up (``lo_up=False``: the caller brings it up
        with the rest of its set-up); returns ``name`` (nothing is left behind when this fails).

        A namespace of that name already there is stale (names carry a PID or a lock's prefix):
        what runs in it is killed and it is deleted, or with ``busy="refuse"`` it is reused only
        if nothing lives in it any more (:class:`NetnsError` otherwise).
        """
        if not _NAME_RE.match(name):
            raise NetnsError(f"bad network namespace name {name!r}")
        if netns_exists(name):
            if busy == "refuse" and netns_pids(name):
                raise NetnsError(f"network namespace {name} exists and is in use")
            destroy_netns(name, ip=self.ip)
        self._run(["netns", "add", name])
        self.created.append(name)
        if not lo_up:
            return name
        try:
            self.batch(name, ["link set lo up"])
        except NetnsError:
            with contextlib.suppress(NetnsError):
                self.destroy(name)
            raise
        return name

    def veth(self, a: str, a_dev: str, b: str, b_dev: str, *, mtu: int | None = None,
             a_mac: str | None = None, b_mac: str | None = None) -> None:
        """A veth pair: ``a_dev`` in namespace ``a``, ``b_dev`` in ``b``, each created directly
        there (never in the namespace that runs this)."""

        def end(ns: str, dev: str, mac: str | None) -> list[str]:
            return [dev, "netns", ns, *(["mtu", str(mtu)] if mtu else []),
                    *(["address", mac] if mac else [])]

        self._run(["link", "add", *end(a, a_dev, a_mac), "type", "veth",
                   "peer", "name", *end(b, b_dev, b_mac)])

    def configure(self, ns: str, dev: str, addresses: Iterable[str] = (), *,
                  addrgen: bool = True, up: bool = True) -> None:
        """Give ``dev`` in ``ns`` the ``addresses`` ("ADDRESS/PREFIXLEN"; IPv6 ones without
        duplicate address detection) and bring it up. ``addrgen=False``: no IPv6 link-local
        address of its own."""
        self.batch(ns, configuring(dev, addresses, addrgen=addrgen, up=up))

    def pair(self, a: str, b: str, a_addresses: Iterable[str], b_addresses: Iterable[str], *,
             dev: str = "eth0") -> None:
        """The usual wiring: a veth pair named ``dev`` on both sides, addressed, both up."""
        self.veth(a, dev, b, dev)
        self.configure(a, dev, a_addresses)
        self.configure(b, dev, b_addresses)

    def batch(self, ns: str, commands: Sequence[str]) -> None:
        """Run ``ip`` commands (one per item, without the leading ``ip``) in ``ns`` at once."""
        if not commands:
            return
        try:
            self._run(["-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")
        except NetnsError as exc:
            raise NetnsError(f"setting up {ns} failed: {exc}") from exc

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``ns``."""
        return [self.ip, "netns", "exec", ns, *argv]

    def destroy(self, name: str) -> None:
        """Remove one namespace now (see :func:`destroy_netns`), created here or stale."""
        destroy_netns(name, ip=self.ip)
        if name in self.created:
            self.created.remove(name)

    def close(self) -> None:
        """Remove every namespace created here (what runs in them is killed). Idempotent; raises
        :class:`NetnsError` naming those that could not be removed, after trying them all."""
        errors: list[str] = []
        for name in reversed(self.created):
            try:
                destroy_netns(name, ip=self.ip)
            except NetnsError as exc:
                errors.append(str(exc))
        self.created = []
        if errors:
            raise NetnsError("; ".join(errors))


_OWNED = re.compile(r"^(fw[a-z]{2})([1-9]\d{0,9})([a-z]*[sc])?$")
SANDBOX_PREFIXES = ("fwck", "fwpr")   # a sandbox's two namespaces: <prefix><pid><tag>s / c


def orphans(prefix: str) -> list[str]:
    """fwsafe's scratch namespaces named ``<prefix><pid>`` (a sandbox's: and its suffix) whose
    owner (that PID) is gone: killed (SIGKILL) before it could remove them. A name of another
    shape (a suffix where none is made, PID 0, a PID above the kernel's limit) is not fwsafe's
    and is left alone."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        return []
    limit = _pid_max()
    return [n for n in names if (m := _OWNED.match(n)) and m.group(1) == prefix
            and bool(m.group(3)) == (prefix in SANDBOX_PREFIXES)
            and int(m.group(2)) <= limit and _gone(int(m.group(2)))]


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 4194304


def _gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (killed, not yet reaped: what a pidfd reports)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def remove_orphans(prefix: str) -> list[str]:
    """Delete the sandbox namespaces under `prefix` whose owner died (what runs in them is
    killed by PID first); the names that could not be removed, said by the caller. Never
    raises: a leftover sandbox is no reason to stop a revert."""
    left = []
    for name in orphans(prefix):
        try:
            destroy_netns(name)
        except (NetnsError, OSError):
            left.append(name)
    return left
