"""The sshd daemon: its verdict on a configuration (`sshd -t`, `sshd -T -C`), finding the
daemon that reads a configuration, and reloading it.

A reload is a SIGHUP to the daemon named by the configuration's PidFile (what
`systemctl reload ssh` does on Debian, too): sshd re-executes itself with the same PID and the
new configuration, and the sessions already open live on. Only a daemon whose command line
names this very configuration file (`-f FILE`, else /etc/ssh/sshd_config) is signalled. Where
none is found, the system's own configuration is reloaded through systemd (`ssh.service` or
`sshd.service`). A reload is done when the daemon listens again, on new sockets, on the ports
the configuration names (more, given on its command line with -p or -o, are fine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fwsafe.errors import EnvironmentProblem, InvalidRulesError
from fwsafe.runner import find_binary, run
from fwsafe.sshd.sshd_config import SSHD_CONFIG, Tree

DEFAULT_PIDFILE = "/run/sshd.pid"
RELOAD_WAIT_S = 10.0
SYSTEMD_UNITS = ("ssh.service", "sshd.service")
TCP_LISTEN = "0A"

Effective = dict[str, list[str]]


class ReloadError(Exception):
    """sshd could not be reloaded, or did not come back listening."""


def sshd_binary() -> str:
    path = find_binary("sshd")
    if path is None:
        raise EnvironmentProblem("sshd is not installed (not found in PATH or /usr/sbin)",
                                 hint="install openssh-server")
    return path


@contextlib.contextmanager
def flat_file(tree: Tree) -> Iterator[tuple[str, Tree]]:
    """The tree as one private temporary file (see Tree.flatten)."""
    directory = tempfile.mkdtemp(prefix="fwsafe-sshd-")
    try:
        path = os.path.join(directory, "sshd_config")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(tree.flatten().text)
        yield path, tree
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _message(tree: Tree, flat_path: str, output: bytes) -> str:
    text = output.decode(errors="replace").strip()
    return tree.flatten().explain(text, flat_path) or "refused"


def test_config(tree: Tree) -> str | None:
    """`sshd -t` on the tree: None when sshd accepts it, else its message (naming the real
    file and line)."""
    with flat_file(tree) as (path, _):
        result = run([sshd_binary(), "-t", "-f", path], timeout=60)
        if result.returncode == 0:
            return None
        return _message(tree, path, result.stderr + result.stdout)


def connection_spec(spec: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in spec.items() if value)


def parse_effective(text: str) -> Effective:
    values: Effective = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            values.setdefault(key.lower(), []).append(value.strip())
    return values


def effective(tree: Tree, spec: Mapping[str, str] | None = None) -> Effective:
    """The values sshd uses (`sshd -T`), for a connection (`-C user=..,addr=..`) if given:
    {keyword in lower case: [value, ...]}. Raises InvalidRulesError when sshd refuses."""
    with flat_file(tree) as (path, _):
        argv = [sshd_binary(), "-T", "-f", path]
        if spec:
            argv += ["-C", connection_spec(spec)]
        result = run(argv, timeout=60)
        if result.returncode != 0:
            raise InvalidRulesError(f"sshd -T refused the configuration: "
                                    f"{_message(tree, path, result.stderr + result.stdout)}")
        return parse_effective(result.stdout.decode(errors="replace"))


def listen_ports(values: Effective) -> set[int]:
    """The ports of `listenaddress` lines of `sshd -T` ("10.0.0.1:22", "[::]:2222")."""
    ports = set()
    for item in values.get("listenaddress", []):
        address = item.split()[0] if item.split() else ""
        _, _, port = address.rpartition(":")
        if port.isdigit():
            ports.add(int(port))
    return ports


def pidfiles(tree: Tree) -> list[str]:
    """Where the daemon that reads `tree` writes its PID (PidFile; none: [])."""
    value = tree.value("pidfile", DEFAULT_PIDFILE) or DEFAULT_PIDFILE
    if value.lower() == "none":
        return []
    return [value] if value != DEFAULT_PIDFILE else [DEFAULT_PIDFILE, "/var/run/sshd.pid"]


# -- the daemon -----------------------------------------------------------------------------
def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    # sshd rewrites its process title ("sshd: /usr/sbin/sshd -D [listener] ..."): split on
    # both NUL and spaces.
    return raw.replace(b"\0", b" ").decode(errors="replace").split()


_WITH_ARGUMENT = "CEbcfghkopu"     # sshd's options that take an argument


def config_of(argv: Sequence[str]) -> str:
    """The configuration file a sshd command line reads (-f FILE, else the default)."""
    index = 1
    while index < len(argv):
        word = argv[index]
        index += 1
        if len(word) < 2 or not word.startswith("-") or word.startswith("--"):
            continue
        for at, flag in enumerate(word[1:], 1):
            if flag not in _WITH_ARGUMENT:
                continue
            value = word[at + 1:]
            if not value and index < len(argv):
                value = argv[index]
                index += 1
            if flag == "f" and value:
                return value
            break
    return SSHD_CONFIG


def is_sshd(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe).startswith("sshd")


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def find_daemon(config: str, files: Sequence[str]) -> tuple[int, str] | None:
    """(PID, pidfile) of the running sshd that reads `config`, named by one of `files`."""
    for pidfile in files:
        try:
            pid = int(Path(pidfile).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid > 1 and is_sshd(pid) and same_file(config_of(_cmdline(pid)), config):
            return pid, pidfile
    return None


def listening(pid: int) -> dict[int, int]:
    """{socket inode: port} of the TCP sockets `pid` listens on (in its network namespace)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    except OSError:
        return {}
    found = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == TCP_LISTEN and int(fields[9]) in inodes:
                found[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def systemctl(*args: str) -> tuple[int, str]:
    tool = find_binary("systemctl")
    if tool is None:
        return 127, "systemctl not found"
    result = run([tool, *args], timeout=90)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace").strip()


def active_unit(units: Sequence[str]) -> str | None:
    for unit in units:
        code, out = systemctl("is-active", unit)
        if code == 0 and out.splitlines()[:1] == ["active"]:
            return unit
    return None


def systemd_main_pid(unit: str) -> int | None:
    code, out = systemctl("show", "-p", "MainPID", "--value", unit)
    value = out.splitlines()[0].strip() if code == 0 and out else ""
    return int(value) if value.isdigit() and int(value) > 1 else None


@dataclass
class Reload:
    config: str
    pidfiles: list[str]
    ports: set[int] | None = None      # what the daemon must (at least) listen on afterwards
    restart_if_down: bool = False      # a revert: start the system's sshd if it is gone

    def _system(self) -> bool:
        return self.config == SSHD_CONFIG and systemd_running()

    def _unit(self) -> str | None:
        """The active systemd unit of the system's sshd (None for another configuration)."""
        return active_unit(SYSTEMD_UNITS) if self._system() else None

    def _daemon(self, unit: str | None) -> int | None:
        """The PID of the running sshd that reads this configuration: from its PidFile, else
        the main PID of its systemd unit."""
        found = find_daemon(self.config, self.pidfiles)
        if found is not None:
            return found[0]
        pid = systemd_main_pid(unit) if unit is not None else None
        if pid is not None and is_sshd(pid) and same_file(config_of(_cmdline(pid)),
                                                          self.config):
            return pid
        return None

    def daemon(self) -> int | None:
        """The PID of the running sshd that reads this configuration (None: none runs)."""
        return self._daemon(self._unit())

    def reloadable(self) -> str | None:
        """None when a reload can be done, else why not."""
        unit = self._unit()
        if self._daemon(unit) is not None or unit is not None:
            return None
        if self.restart_if_down and self._system():
            return None
        where = ", ".join(self.pidfiles) or "none"
        return f"no running sshd reads {self.config} (PidFile: {where})"

    def run(self, wait_s: float = RELOAD_WAIT_S) -> str:
        """Reload; return what was done. Raises ReloadError."""
        unit = self._unit()
        pid = self._daemon(unit)
        old: set[int] = set()
        if pid is not None:
            old = set(listening(pid))
            os.kill(pid, signal.SIGHUP)
            how = f"SIGHUP to sshd (PID {pid})"
        elif unit is not None:
            how = self._systemctl("reload", [unit])
        elif self.restart_if_down and self._system():
            how = self._systemctl("restart", list(SYSTEMD_UNITS))
            unit = active_unit(SYSTEMD_UNITS)
        else:
            raise ReloadError(self.reloadable() or "sshd not found")
        return f"{how}; {self._wait(old, unit, wait_s)}"

    @staticmethod
    def _systemctl(verb: str, units: list[str]) -> str:
        out = ""
        for unit in units:
            code, out = systemctl(verb, unit)
            if code == 0:
                return f"systemctl {verb} {unit}"
        raise ReloadError(f"systemctl {verb} {' / '.join(units)} failed: {out}")

    def _wait(self, old: set[int], unit: str | None, wait_s: float) -> str:
        """Until the daemon listens again, on new sockets, on the expected ports."""
        end = time.monotonic() + wait_s
        seen: set[int] = set()
        while True:
            pid = self._daemon(unit)
            if pid is not None:
                sockets = listening(pid)
                seen = set(sockets.values())
                fresh = not (set(sockets) & old)
                if sockets and fresh and (self.ports is None or self.ports <= seen):
                    return f"sshd (PID {pid}) listens on {_ports(seen)}"
            if time.monotonic() > end:
                want = f" (expected {_ports(self.ports)})" if self.ports else ""
                state = (f"it listens on {_ports(seen)}" if pid and seen else
                         "it is not running" if pid is None else "it listens on nothing")
                raise ReloadError(f"sshd did not come back within {wait_s:g} s: {state}{want}")
            time.sleep(0.05)


def _ports(ports: set[int] | None) -> str:
    return ", ".join(str(p) for p in sorted(ports or ())) or "-"
