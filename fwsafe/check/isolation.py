"""The walls around a command tried on a copy (fwsafe.check.simulate): nothing it does may reach
the live host.

The agent of a simulation runs as ``ip netns exec SCRATCH`` + :data:`UNSHARE_ARGS` + ``python -m
fwsafe.check.simulate``: its own network namespace (a scratch one, with the host's firewall
loaded), and its own mount, PID, UTS and IPC namespaces; it dies with the ``unshare`` that
started it, and everything it started dies with it (it is the PID namespace's init). Inside,
before anything is loaded or run, :func:`enter` builds a new root and chroots into it:

- every mount of the host (``/``, ``/usr``, ``/home``, ...) becomes an overlay whose writable
  layer is in memory: every file the command writes is a private copy, gone with the sandbox.
  A mount overlayfs cannot stack on is bind-mounted read-only (a write fails; nothing changes)
  and a file bind-mounted alone is copied;
- ``/run`` and ``/dev/shm`` are new and empty: no daemon's socket, pid file or lock;
  ``/dev`` holds only null, zero, full, random, urandom and tty; ``/sys`` is the scratch
  namespace's, read-only; ``/proc`` is the new PID namespace's, read-only except
  ``/proc/sys/net`` (the scratch network namespace's settings, which ufw writes);
- every daemon socket of the live host (:func:`host_sockets`: each listening socket in
  /proc/net/unix, every socket under /run and /tmp, the well-known ones; not the journal's) is a
  **tripwire** (:class:`Tripwires`): a socket of the sandbox that accepts a connection, closes
  it at once and records it. A command that touched one would have acted on a live daemon (the
  system D-Bus: firewalld, systemd; Docker; fail2ban), so what it left in the sandbox is not
  what it would do: the simulation says it cannot be simulated, whatever the command's exit
  status.

What it does not stop: a command that deliberately climbs out (it runs as root, and could
remount or reach the host's processes' files through a file descriptor it was given); kernel
modules loaded on demand (global, as with any firewall tool).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import socket
import stat
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

UNSHARE_ARGS = ("--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                "--mount-proc", "--uts", "--ipc")

# Sockets whose daemon changes something when asked; looked for even when /proc/net/unix of
# this network namespace does not list them (the daemon lives in another one).
WELL_KNOWN_SOCKETS = (
    "/run/dbus/system_bus_socket", "/run/systemd/private", "/run/docker.sock",
    "/run/containerd/containerd.sock", "/run/fail2ban/fail2ban.sock",
    "/var/run/dbus/system_bus_socket", "/var/run/docker.sock",
)
# Logging is not acting on a daemon: these are left out (absent in the sandbox: the command's
# log lines are lost, nothing else).
LOGGING_SOCKETS = ("/run/systemd/journal/", "/dev/log")
# Fresh and empty in the sandbox.
EMPTY_DIRS = ("/run", "/dev", "/proc", "/sys")
SOCKET_DIRS = ("/run", "/tmp")   # walked for sockets (of daemons in other namespaces too)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MAX_WALKED = 20000   # the walk of a directory for sockets stops there

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
SOCK_LISTENING = 0x10000   # __SO_ACCEPTCON in /proc/net/unix's Flags
SOCK_TYPES = {1: socket.SOCK_STREAM, 5: socket.SOCK_SEQPACKET}


def _under(path: str, tops: Iterable[str]) -> bool:
    return any(path == top or path.startswith(top.rstrip("/") + "/") for top in tops)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def host_sockets() -> dict[str, str]:
    """Every daemon socket a command run here could reach, {path: "stream"|"seqpacket"}: the
    listening ones of /proc/net/unix (this network namespace), every socket under /run and
    /tmp (of daemons in other namespaces too) and the well-known ones, where they exist. Read on the
    live host, before the sandbox is entered."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text(errors="replace").splitlines()[1:]:
            fields = line.split(None, 7)
            if len(fields) < 8 or not fields[7].startswith("/"):
                continue   # unnamed or abstract (abstract names are per network namespace)
            flags, kind = int(fields[3], 16), int(fields[4], 16)
            if flags & SOCK_LISTENING and kind in SOCK_TYPES and _is_socket(fields[7]):
                found[fields[7]] = "seqpacket" if kind == 5 else "stream"
    for where in SOCKET_DIRS:
        seen = 0
        for top, dirs, files in os.walk(where):   # follows no symlinked directory
            seen += len(files) + len(dirs)
            for name in files:
                path = os.path.join(top, name)
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        found.setdefault(path, "stream")
            if seen > MAX_WALKED:
                break
    for path in WELL_KNOWN_SOCKETS:
        if _is_socket(path):
            found.setdefault(path, "stream")
    return {path: kind for path, kind in sorted(found.items())
            if not _under(path, LOGGING_SOCKETS)}


class Tripwires:
    """Listening sockets in the places of the live host's daemon sockets: each connection is
    accepted, closed at once (the client sees the daemon hang up) and recorded."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.paths: list[str] = []
        self._hits: list[str] = []

    def add(self, path: str, kind: str, *, bind_at: str | None = None) -> None:
        """A tripwire for `path`, bound there (or at `bind_at`, to be bind-mounted over it)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if kind == "seqpacket"
                             else socket.SOCK_STREAM)
        try:
            sock.bind(bind_at or path)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._selector.register(sock, selectors.EVENT_READ, path)
        self.paths.append(path)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="tripwires", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            for key, _events in self._selector.select():
                if key.data is None:
                    return
                assert isinstance(key.fileobj, socket.socket)
                self._accept(key.fileobj, key.data)

    def _accept(self, sock: socket.socket, path: str) -> None:
        """Take (and close) every connection waiting on `sock`; record `path` if there was one."""
        while True:
            try:
                conn, _addr = sock.accept()
            except OSError:   # none waiting (BlockingIOError), or gone
                return
            conn.close()
            with self._lock:
                if path not in self._hits:
                    self._hits.append(path)

    def hits(self) -> list[str]:
        """The sockets something connected to so far (a connection still waiting to be
        accepted counts: it is taken now)."""
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                assert isinstance(key.fileobj, socket.socket)
                self._accept(key.fileobj, key.data)
        with self._lock:
            return list(self._hits)

    def stop(self) -> list[str]:
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        return self.hits()


# --------------------------------------------------------------------------------------------
# Inside the sandbox: the new root
# --------------------------------------------------------------------------------------------
_LIBC = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if _LIBC.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                   enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): "
                           f"{os.strerror(err)}")


def _unescape(field: str) -> str:
    """A path of /proc/self/mountinfo (space, tab, newline and backslash are octal escapes)."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def visible_mounts() -> list[tuple[str, str]]:
    """(mount point, file system type) of this mount namespace, parents before children."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _sep, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = _unescape(fields[4])
        found.pop(point, None)   # the later of two mounts on one point is the one on top
        found[point] = right.split()[0]
    return sorted(found.items(), key=lambda item: 0 if item[0] == "/" else item[0].count("/"))


def _tmpfs(target: str, mode: str) -> None:
    _mount("fwsafe-sandbox", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")


def _readonly(target: str, extra: int = 0) -> None:
    _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | extra)


def _copy_mount(index: int, point: str, target: str, work: str) -> str | None:
    """`point` (one mount, without what is mounted below it) at `target`: an overlay with a
    writable layer under `work`, else read-only. Returns `point` when it is read-only."""
    if os.path.isdir(point) and not os.path.islink(point):
        lower, upper, scratch = (f"{work}/{part}/{index}" for part in ("lower", "upper", "work"))
        for path in (lower, upper, scratch):
            os.makedirs(path)
        _mount(point, lower, None, MS_BIND)
        try:
            _mount("fwsafe-sandbox", target, "overlay", 0,
                   f"lowerdir={lower},upperdir={upper},workdir={scratch}")
            return None
        except OSError:
            _mount(lower, target, None, MS_BIND)
            _readonly(target, MS_NOSUID | MS_NODEV)
            return point
    if os.path.isfile(point):   # a file bind-mounted alone: a copy of it
        copy = f"{work}/files/{index}"
        os.makedirs(os.path.dirname(copy), exist_ok=True)
        shutil.copy2(point, copy)
        _mount(copy, target, None, MS_BIND)
    return None


def _system_dirs(root: str) -> None:
    """/run, /tmp, /var/tmp, /dev, /proc and /sys of the new root."""
    _tmpfs(f"{root}/run", "0755")
    os.mkdir(f"{root}/run/lock", 0o1777)
    os.chmod(f"{root}/run/lock", 0o1777)
    for path, mode in (("/var/run", "0755"), ("/var/lock", "1777")):
        where = f"{root}{path}"
        if os.path.isdir(where) and not os.path.islink(where):
            _tmpfs(where, mode)
    dev = f"{root}/dev"
    _tmpfs(dev, "0755")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            Path(f"{dev}/{name}").touch()
            _mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm")
    _tmpfs(f"{dev}/shm", "1777")
    _readonly(dev, MS_NOSUID)
    proc = f"{root}/proc"
    _mount("/proc", proc, None, MS_BIND | MS_REC)   # the new PID namespace's
    _readonly(proc, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    net = f"{proc}/sys/net"
    _mount(net, net, None, MS_BIND)
    _mount(None, net, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount("sysfs", f"{root}/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def enter(sockets: dict[str, str]) -> tuple[Tripwires, list[str]]:
    """Build the new root and chroot into it; lay the tripwires for `sockets` (host_sockets(),
    read on the live host). Returns the tripwires (started) and the mounts that could only be
    made read-only. Needs the private mount namespace of UNSHARE_ARGS."""
    mounts = visible_mounts()
    work = "/run"   # a tmpfs over it, in this mount namespace only
    _tmpfs(work, "0700")
    root = f"{work}/root"
    os.mkdir(root)
    readonly = []
    for index, (point, _fstype) in enumerate(mounts):
        if _under(point, EMPTY_DIRS):
            continue
        target = root if point == "/" else root + point
        if not os.path.lexists(target):
            continue
        kept = _copy_mount(index, point, target, work)
        if kept is not None:
            readonly.append(kept)
    _system_dirs(root)
    os.chroot(root)
    os.chdir("/")
    return _lay(sockets), readonly


def _lay(sockets: dict[str, str]) -> Tripwires:
    """Inside the new root: a tripwire at (or bind-mounted over) each socket's place."""
    wires = Tripwires()
    spare = "/run/.fwsafe-tripwires"
    os.makedirs(spare, mode=0o700, exist_ok=True)
    for index, (path, kind) in enumerate(sockets.items()):
        place = os.path.realpath(path)
        if _under(place, LOGGING_SOCKETS):
            continue
        with contextlib.suppress(OSError):
            if _under(place, ("/run",)):
                os.makedirs(os.path.dirname(place), exist_ok=True)
                wires.add(path, kind, bind_at=place)
            elif os.path.lexists(place) and stat.S_ISSOCK(os.lstat(place).st_mode):
                wires.add(path, kind, bind_at=f"{spare}/{index}")
                _mount(f"{spare}/{index}", place, None, MS_BIND)
    wires.start()
    return wires


def describe(paths: Sequence[str]) -> str:
    """The daemons behind the sockets a command reached, for a message."""
    names = []
    for path in paths:
        what = ("the system D-Bus: firewalld, systemd, NetworkManager, ..." if "dbus" in path
                else "systemd" if path.startswith("/run/systemd/") else
                "Docker" if "docker" in path else
                "containerd" if "containerd" in path else
                "fail2ban" if "fail2ban" in path else "")
        names.append(f"{path} ({what})" if what else path)
    return ", ".join(names)
