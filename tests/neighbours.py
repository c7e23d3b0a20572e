"""Real neighbours in the namespace lab: fail2ban 1.0 and dockerd 20.10 from Debian.

fwsafe promises that the rules Docker and fail2ban add while a change is pending survive its
revert. These helpers run the real programs INSIDE a lab's server network namespace with all
their state private to the lab's workdir (see /work/shared/notes/neighbours-lab.md); nothing
runs in, or changes the firewall of, the machine's own network namespace, and the programs'
system services are never started.

- :class:`Fail2ban`: ``fail2ban-server`` in the foreground (so its PID is our child's) with a
  private copy of /etc/fail2ban, one ``sshd`` jail reading a log file the test writes
  ``Failed password`` lines into, its own socket, pidfile and sqlite db.
- :class:`Dockerd`: ``dockerd`` in a private mount namespace (private /run, /etc/docker and
  data/exec roots), the host's cgroup tree bound back after ``ip netns exec`` mounted a fresh
  sysfs, its own containerd, vfs storage, iptables on, no userland proxy; a busybox-static image
  imported from a tar, ``busybox httpd`` containers with published ports.
- Client side: extra client addresses (:func:`add_client_addresses`) and real TCP probes from a
  chosen source address (:func:`tcp_probe`, :func:`wait_banner`, :func:`http_get`).
- Rules text: :func:`normalize_save`, :func:`with_rule`, :func:`chain_lines`.

Every process is started with an argument list (never a shell line built from input; the two
fixed shell programs below take paths as positional parameters) and stopped by PID. A process
counts as ours when we started it, or when it carries this lab's unique paths (containerd and
its shims name our exec root) or sits in this lab's own cgroup (the containers).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwsafe.lab import (
    Lab,
    LabError,
    kill_until_gone,
    normalize_save,
    remove_cgroup_tree,
    run,
    stop_popen,
    tail,
    wait_answering,
)

__all__ = [
    "BUSYBOX",
    "DOCKER",
    "DOCKERD",
    "DOCKER_PROGRAMS",
    "F2B_PROGRAMS",
    "FAIL2BAN_CLIENT",
    "FAIL2BAN_SERVER",
    "Dockerd",
    "Fail2ban",
    "HttpResult",
    "Probe",
    "add_client_addresses",
    "chain_lines",
    "flush_everything",
    "http_get",
    "missing_programs",
    "normalize_save",
    "tcp_probe",
    "wait_banner",
    "wait_http",
    "with_rule",
]

FAIL2BAN_SERVER = "/usr/bin/fail2ban-server"
FAIL2BAN_CLIENT = "/usr/bin/fail2ban-client"
FAIL2BAN_ETC = "/etc/fail2ban"
DOCKERD = "/usr/sbin/dockerd"
# The docker.io client, version-matched to dockerd. Not whatever PATH finds: a machine may have
# another docker CLI in /usr/local/bin.
DOCKER = "/usr/bin/docker"
CONTAINERD = "/usr/bin/containerd"
BUSYBOX = "/bin/busybox"

F2B_PROGRAMS = (FAIL2BAN_SERVER, FAIL2BAN_CLIENT, FAIL2BAN_ETC + "/jail.conf")
DOCKER_PROGRAMS = (DOCKERD, DOCKER, CONTAINERD, "/usr/bin/containerd-shim-runc-v2", BUSYBOX)

IMAGE = "fwsafe-lab/busybox:1"
"""The image :meth:`Dockerd.import_busybox` makes: /bin/busybox, sh and httpd links, /www."""

_START_TIMEOUT = 60.0
_BAN_TIMEOUT = 30.0
_STOP_GRACE = 20.0

# Run by a fresh interpreter in the client namespace. argv[1] is a JSON object:
#   mode "banner": one NEW TCP connection from `src` (bound) to host:port, expect "SSH-";
#   mode "http":   one connection, `GET path HTTP/1.0`, report status and body;
#   mode "wait":   "banner" attempts of `attempt` seconds each until one succeeds or `limit`.
# Prints one JSON object: ok, error, data, t (the wall-clock time of the successful attempt).
_CLIENT_SCRIPT = """\
import json, socket, sys, time
p = json.loads(sys.argv[1])

def attempt(limit):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if p["src"]:
            s.bind((p["src"], 0))
        s.settimeout(limit)
        end = time.monotonic() + limit
        s.connect((p["host"], p["port"]))
        if p["mode"] == "http":
            s.sendall(("GET %s HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n" % (p["path"], p["host"])).encode())
        data = b""
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if p["mode"] != "http" and len(data) >= 4:
                break
        return data.decode("latin-1"), None
    except OSError as exc:
        return "", type(exc).__name__ + ": " + str(exc)
    finally:
        s.close()

def good(data):
    return data.startswith("HTTP/") if p["mode"] == "http" else data.startswith("SSH-")

if p["mode"] == "wait":
    end = time.monotonic() + p["limit"]
    tries = 0
    while True:
        tries += 1
        data, error = attempt(p["attempt"])
        if good(data):
            print(json.dumps({"ok": True, "error": None, "data": data, "t": time.time(),
                              "tries": tries}))
            break
        if time.monotonic() >= end:
            print(json.dumps({"ok": False, "error": error or repr(data[:40]), "data": data,
                              "t": None, "tries": tries}))
            break
        time.sleep(0.02)
else:
    data, error = attempt(p["limit"])
    ok = good(data)
    print(json.dumps({"ok": ok, "error": None if ok else (error or repr(data[:40])),
                      "data": data, "t": time.time() if ok else None, "tries": 1}))
"""

# Fixed shell programs (paths arrive as positional parameters, never interpolated).
# Outer, in a fresh private mount namespace: keep the host's cgroup tree reachable at $1, then
# enter the server netns (`ip netns exec` mounts a fresh sysfs over /sys, hiding it).
_DOCKER_OUTER = (
    'cg=$1; ns=$2; inner=$3; shift 3; '
    'mount --rbind /sys/fs/cgroup "$cg" '
    '&& exec ip netns exec "$ns" sh -c "$inner" fwsafe-lab-dockerd "$cg" "$@"'
)
# Inner, in the server netns: cgroups back at /sys/fs/cgroup; a private /run (containerd 1.6
# puts its shims' sockets in /run/containerd/s whatever its root); a private /etc/docker (dockerd
# 20.10 writes key.json there); then dockerd.
_DOCKER_INNER = (
    'cg=$1; etc=$2; shift 2; '
    'mount --rbind "$cg" /sys/fs/cgroup && umount -l "$cg" '
    '&& mount -t tmpfs -o mode=0755 fwsafe-lab-run /run '
    '&& { [ ! -d /etc/docker ] || mount --bind "$etc" /etc/docker; } '
    '&& exec "$@"'
)
# Inside a container: serve /www, with /www/name holding the container's name ($1).
_HTTPD_SCRIPT = 'echo "$1" > /www/name && exec /bin/busybox httpd -f -p 80 -h /www'


# --------------------------------------------------------------------------- small helpers


def missing_programs(paths: Iterable[str]) -> list[str]:
    """The paths (programs or files) of `paths` that do not exist here."""
    return [p for p in paths if not os.path.exists(p)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _check_config_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in "%\n\r"):  # fail2ban's config files interpolate '%'
        raise LabError(f"unsupported character in path {text!r}")
    return text


# --------------------------------------------------------------------------- rules text


_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}


def _table_span(lines: list[str], table: str) -> tuple[int, int]:
    """(index of `*table`, index of its COMMIT) in iptables-save lines."""
    start = lines.index(f"*{table}")
    return start, lines.index("COMMIT", start)


def with_rule(save_text: str, rule: str, *, table: str = "filter", first: bool = False) -> str:
    """`save_text` (iptables-save format) with `rule` (an `-A CHAIN ...` line) added to `table`:
    at the end of its chain, or with `first` before the chain's first rule. A table the text
    lacks is added (ACCEPT policies)."""
    lines = [ln for ln in normalize_save(save_text).splitlines() if ln]
    chain = rule.split()[1]
    if f"*{table}" not in lines:  # e.g. an empty kernel: the table with its built-in chains
        builtin = _BUILTIN_CHAINS[table]
        lines += [f"*{table}", *(f":{c} ACCEPT [0:0]" for c in builtin)]
        if chain not in builtin:
            lines.append(f":{chain} - [0:0]")
        lines.append("COMMIT")
    start, commit = _table_span(lines, table)
    at = commit
    if first:
        for i in range(start, commit):
            if lines[i].startswith(f"-A {chain} "):
                at = i
                break
    lines.insert(at, rule)
    return "\n".join(lines) + "\n"


def chain_lines(save_text: str, chain: str, *, table: str = "filter") -> list[str]:
    """The policy line (if any) and the `-A chain` lines of `chain` in `table`."""
    lines = normalize_save(save_text).splitlines()
    try:
        start, commit = _table_span(lines, table)
    except ValueError:
        return []
    body = lines[start + 1:commit]
    return [ln for ln in body if ln.startswith((f":{chain} ", f"-A {chain} "))]


def flush_everything(lab: Lab) -> None:
    """What a reboot leaves in the server namespace: no rules, no chains, no tables (iptables
    -F and -X in every table, for IPv4 and IPv6, then `nft flush ruleset`)."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw", "security"):
            lab.srv_exec([tool, "-w", "-t", table, "-F"], check=False)
            lab.srv_exec([tool, "-w", "-t", table, "-X"], check=False)
    lab.srv_exec(["nft", "flush", "ruleset"])


# --------------------------------------------------------------------------- client side


def add_client_addresses(lab: Lab, *, first: int = 50, count: int = 10) -> list[str]:
    """Give the client namespace the extra addresses 10.231.<index>.<first..first+count-1>
    (on its eth0, same /24 as the server): sources that fail2ban can ban one by one."""
    addresses = [f"10.231.{lab.index}.{first + i}" for i in range(count)]
    for address in addresses:
        lab.cli_exec(["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
    return addresses


@dataclass(frozen=True)
class Probe:
    """One client-side probe: `ok`, the error when not, what was read, when it succeeded."""

    ok: bool
    error: str | None
    data: str
    t: float | None
    tries: int


def _client_probe(lab: Lab, params: dict[str, Any], limit: float) -> Probe:
    argv = [sys.executable, "-I", "-c", _CLIENT_SCRIPT, json.dumps(params)]
    result = lab.cli_exec(argv, check=False, timeout=limit + 20)
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise LabError(f"client probe gave no result (exit {result.returncode}): "
                       f"{result.stderr.strip()}") from exc
    return Probe(bool(data["ok"]), data["error"], str(data["data"]), data["t"], int(data["tries"]))


def tcp_probe(lab: Lab, *, src: str = "", port: int = 22, timeout: float = 1.5) -> Probe:
    """A NEW TCP connection from the client namespace (from source address `src`, if given) to
    the server's IPv4 address and `port`, expecting sshd's "SSH-" banner within `timeout`."""
    params = {"mode": "banner", "src": src, "host": lab.srv_ip4, "port": port, "limit": timeout}
    return _client_probe(lab, params, timeout)


def wait_banner(lab: Lab, *, limit: float, src: str = "", port: int = 22,
                attempt: float = 0.25) -> Probe:
    """Open NEW connections (each `attempt` seconds at most) until one gets the "SSH-" banner
    or `limit` seconds passed. `Probe.t` is the wall-clock time of the first success."""
    params = {"mode": "wait", "src": src, "host": lab.srv_ip4, "port": port, "limit": limit,
              "attempt": attempt}
    return _client_probe(lab, params, limit)


@dataclass(frozen=True)
class HttpResult:
    """An HTTP GET from the client namespace: status (None if no answer), body, error."""

    status: int | None
    body: str
    error: str | None


def http_get(lab: Lab, port: int, path: str = "/name", *, timeout: float = 3.0) -> HttpResult:
    """One real TCP connection and `GET path` from the client namespace to the server's IPv4
    address and `port` (a container's published port)."""
    params = {"mode": "http", "src": "", "host": lab.srv_ip4, "port": port, "path": path,
              "limit": timeout}
    probe = _client_probe(lab, params, timeout)
    if not probe.data.startswith("HTTP/"):
        return HttpResult(None, "", probe.error or "no HTTP answer")
    head, _, body = probe.data.partition("\r\n\r\n")
    try:
        status = int(head.split()[1])
    except (IndexError, ValueError):
        return HttpResult(None, body, f"bad status line: {head.splitlines()[0]!r}")
    return HttpResult(status, body, None)


def wait_http(lab: Lab, port: int, path: str = "/name", *, limit: float = 15.0) -> HttpResult:
    """:func:`http_get` until it answers 200 or `limit` seconds passed (the last result)."""
    end = time.monotonic() + limit
    while True:
        result = http_get(lab, port, path, timeout=min(3.0, max(0.5, end - time.monotonic())))
        if result.status == 200 or time.monotonic() >= end:
            return result
        time.sleep(0.2)


# --------------------------------------------------------------------------- fail2ban


class Fail2ban:
    """fail2ban-server in the lab's server namespace with private state.

    Files (all under ``<workdir>/fail2ban``): ``etc/`` a copy of /etc/fail2ban with jail.d and
    fail2ban.d emptied and our own ``fail2ban.local`` and ``jail.d/fwsafe-lab.local``;
    ``auth.log`` the jail's log (:meth:`fail` writes to it); ``fail2ban.sock``,
    ``fail2ban.pid``, ``fail2ban.sqlite3``, ``fail2ban.log`` (the server's log).

    The jail: ``sshd``, ``backend = polling``, ``maxretry = 2``, a day of ``findtime`` and
    ``bantime``, ``banaction = iptables-multiport`` (chain ``f2b-sshd``, jump from INPUT for
    ``-p tcp -m multiport --dports 22``, REJECT per banned source).
    """

    jail = "sshd"
    chain = "f2b-sshd"

    def __init__(self, lab: Lab, *, maxretry: int = 2) -> None:
        self.lab = lab
        self.maxretry = maxretry
        self.dir = lab.workdir / "fail2ban"
        self.conf = self.dir / "etc"
        self.log = self.dir / "auth.log"
        self.sock = self.dir / "fail2ban.sock"
        self.pidfile = self.dir / "fail2ban.pid"
        self.db = self.dir / "fail2ban.sqlite3"
        self.server_log = self.dir / "fail2ban.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 40000
        self._prepare()

    def _prepare(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(mode=0o700)
        shutil.copytree(FAIL2BAN_ETC, self.conf, symlinks=True)
        for sub in ("jail.d", "fail2ban.d"):
            target = self.conf / sub
            if target.exists():
                shutil.rmtree(target)
            target.mkdir()
        for name in ("jail.local", "fail2ban.local", "paths-overrides.local"):
            with contextlib.suppress(FileNotFoundError):
                (self.conf / name).unlink()
        self.log.write_text("")
        (self.conf / "fail2ban.local").write_text(
            "[Definition]\n"
            "loglevel = INFO\n"
            f"logtarget = {_check_config_path(self.server_log)}\n"
            f"socket = {_check_config_path(self.sock)}\n"
            f"pidfile = {_check_config_path(self.pidfile)}\n"
            f"dbfile = {_check_config_path(self.db)}\n"
            "dbpurgeage = 1d\n"
        )
        (self.conf / "jail.d" / "fwsafe-lab.local").write_text(
            "[DEFAULT]\n"
            "ignoreself = true\n"
            "ignoreip = 127.0.0.1/8 ::1\n"
            f"\n[{self.jail}]\n"
            "enabled = true\n"
            "filter = sshd\n"
            "port = ssh\n"
            "backend = polling\n"
            f"logpath = {_check_config_path(self.log)}\n"
            f"maxretry = {self.maxretry}\n"
            "findtime = 1d\n"
            "bantime = 1d\n"
            "banaction = iptables-multiport\n"
        )

    # -- running ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """fail2ban-server's PID while it runs (our child: `ip netns exec` execs it)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def client(self, *args: str, check: bool = True, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
        """`fail2ban-client -c CONF -s SOCK ARGS...` (in the server namespace)."""
        return self.lab.srv_exec([FAIL2BAN_CLIENT, "-c", str(self.conf), "-s", str(self.sock),
                                  *args], check=check, timeout=timeout)

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server (foreground mode, our child) and wait until the jail answers."""
        if self.pid is not None:
            raise LabError(f"fail2ban already runs (pid {self.pid})")
        argv = ["ip", "netns", "exec", self.lab.srv_ns, FAIL2BAN_SERVER, "-f", "-x",
                "-c", str(self.conf), "-s", str(self.sock), "-p", str(self.pidfile)]
        with open(self.dir / "server.out", "ab") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        wait_answering(
            self._proc, lambda: self.client("status", self.jail, check=False,
                                            timeout=15).returncode == 0,
            what="fail2ban-server", timeout=timeout, on_timeout=self.kill,
            details=lambda: f"{tail(self.dir / 'server.out', 40)}\n{tail(self.server_log, 40)}")

    def stop(self, timeout: float = 30) -> None:
        """`fail2ban-client stop`, as `systemctl stop fail2ban` does: fail2ban removes its jump
        and chain on the way out. The server process is waited for (and killed if it hangs)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.client("stop", check=False, timeout=timeout)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_popen(proc, group=False)

    def kill(self) -> None:
        """SIGKILL the server (a crash, or the machine going down): its rules stay as they are."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the server (killing it if stopping fails). Idempotent."""
        try:
            self.stop()
        finally:
            self.kill()
            self._proc = None

    # -- bans ------------------------------------------------------------------------------

    def banned(self) -> list[str]:
        """The jail's "Banned IP list" (fail2ban's own view; see :meth:`chain_has`)."""
        out = self.client("status", self.jail).stdout
        for line in out.splitlines():
            if "Banned IP list:" in line:
                return line.split("Banned IP list:", 1)[1].split()
        raise LabError(f"no banned list in fail2ban's status:\n{out}")

    def chain_has(self, ip: str) -> bool:
        """True if the kernel's f2b-sshd chain holds the REJECT rule for `ip`."""
        res = self.lab.srv_exec(["iptables", "-w", "-S", self.chain], check=False)
        return res.returncode == 0 and f"-s {ip}/32 " in res.stdout

    def fail(self, ip: str, count: int | None = None) -> None:
        """Append `count` (default maxretry) sshd "Failed password" lines for `ip` to the log."""
        lines = []
        for _ in range(self.maxretry if count is None else count):
            self._port += 1
            stamp = time.strftime("%b %d %H:%M:%S")
            lines.append(f"{stamp} {self.lab.srv_ns} sshd[{self._port}]: Failed password for "
                         f"root from {ip} port {self._port} ssh2\n")
        with open(self.log, "a") as log:
            log.writelines(lines)

    def ban(self, ip: str, timeout: float = _BAN_TIMEOUT) -> float:
        """Make fail2ban ban `ip` the way it does in life (failed logins in the log), and wait
        until `status sshd` lists it and its REJECT rule is in the kernel. Seconds taken."""
        start = time.monotonic()
        self.fail(ip)
        while True:
            if self.pid is None:
                raise LabError("fail2ban is not running")
            if ip in self.banned() and self.chain_has(ip):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise LabError(f"fail2ban did not ban {ip} within {timeout:g}s; status:\n"
                               f"{self.client('status', self.jail, check=False).stdout}\n"
                               f"{tail(self.server_log, 40)}")
            time.sleep(0.2)


# --------------------------------------------------------------------------- dockerd


def _cgroup_mounts() -> list[tuple[set[str], Path]]:
    """(controllers, mount point) of this machine's cgroup hierarchies; {""} for cgroup2."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) < 3 or fields[3] != "/":
            continue
        if tail[0] == "cgroup2":
            found.append(({""}, Path(fields[4])))
        elif tail[0] == "cgroup":
            opts = set(tail[2].split(",")) - {"rw", "ro"}
            found.append((opts, Path(fields[4])))
    return found


def _cgroup_dirs_of(pid: int, leaf: str) -> list[Path]:
    """Where runc puts a relative cgroup parent `leaf` for children of `pid`: `leaf` below
    `pid`'s own cgroup in every hierarchy."""
    mounts = _cgroup_mounts()
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        wanted = set(controllers.split(",")) if controllers else {""}
        for opts, mountpoint in mounts:
            if wanted <= opts:
                dirs.append(mountpoint / path.lstrip("/") / leaf)
                break
    return dirs


class Dockerd:
    """dockerd (with its own containerd) in the lab's server namespace, all state private.

    Layout under ``<workdir>/docker``: ``data`` (--data-root), ``exec`` (--exec-root),
    ``docker.sock`` (-H), ``dockerd.pid``, ``dockerd.log``, ``etc`` (bound over /etc/docker in
    dockerd's mount namespace; ``daemon.json`` is ``{}``), ``cli`` (the client's DOCKER_CONFIG).
    Containers run below the cgroup parent ``fwsafe-lab-<prefix>`` (relative: under the
    cgroups of the test process), which is how :meth:`close` finds them.
    """

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.workdir / "docker"
        self.data_root = self.dir / "data"
        self.exec_root = self.dir / "exec"
        self.sock = self.dir / "docker.sock"
        self.pidfile = self.dir / "dockerd.pid"
        self.log = self.dir / "dockerd.log"
        self.etc = self.dir / "etc"
        self.cgroup_parent = f"fwsafe-lab-{lab.prefix}"
        self._cgroup_dirs: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self.image: str | None = None
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for d in (self.dir, self.data_root, self.exec_root, self.etc, self.dir / "cli",
                  self.dir / "cgroup-aside"):
            d.mkdir(mode=0o700)
        (self.etc / "daemon.json").write_text("{}\n")
        self._env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}",
                     "DOCKER_CONFIG": str(self.dir / "cli")}

    @property
    def cgroup_dirs(self) -> list[Path]:
        """This Docker's cgroup parent in every hierarchy (where its containers run)."""
        return list(self._cgroup_dirs)

    @property
    def pid(self) -> int | None:
        """dockerd's PID while it runs (our child: unshare, sh and ip netns exec all exec)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def docker(self, *args: str, check: bool = True, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
        """The docker.io client against this daemon's socket (private client config)."""
        return run([DOCKER, *args], check=check, timeout=timeout, env=self._env)

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start dockerd and wait until it answers; containerd is started by dockerd."""
        if self.pid is not None:
            raise LabError(f"dockerd already runs (pid {self.pid})")
        dockerd = [DOCKERD, "--config-file", str(self.etc / "daemon.json"),
                   "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                   "-H", f"unix://{self.sock}", "--pidfile", str(self.pidfile),
                   "--storage-driver", "vfs", "--iptables=true", "--userland-proxy=false",
                   "--cgroup-parent", self.cgroup_parent, "--log-level", "info"]
        argv = ["unshare", "--mount", "--propagation", "private",
                "sh", "-c", _DOCKER_OUTER, "fwsafe-lab-dockerd-outer",
                str(self.dir / "cgroup-aside"), self.lab.srv_ns, _DOCKER_INNER,
                str(self.etc), *dockerd]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self._cgroup_dirs = _cgroup_dirs_of(self._proc.pid, self.cgroup_parent)
        wait_answering(self._proc,
                       lambda: self.docker("version", check=False, timeout=15).returncode == 0,
                       what="dockerd", timeout=timeout, on_timeout=self.kill,
                       details=lambda: tail(self.log, 40))

    # -- images, networks, containers -----------------------------------------------------

    def import_busybox(self, tag: str = IMAGE) -> str:
        """`docker import` a root made of busybox-static: /bin/busybox, /bin/sh and /bin/httpd
        links, /www/index.html. Returns the tag (also kept as :attr:`image`)."""
        tar_path = self.dir / "busybox-root.tar"
        with tarfile.open(tar_path, "w") as tar:
            for name in ("bin", "www", "tmp"):
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
                tar.addfile(info)
            tar.add(BUSYBOX, "bin/busybox")
            for applet in ("sh", "httpd"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
            page = b"fwsafe lab httpd\n"
            info = tarfile.TarInfo("www/index.html")
            info.size, info.mode = len(page), 0o644
            tar.addfile(info, io.BytesIO(page))
        self.docker("import", str(tar_path), tag)
        tar_path.unlink()
        self.image = tag
        return tag

    def network_create(self, name: str) -> str:
        """`docker network create NAME` (a bridge network); returns its id."""
        return self.docker("network", "create", name).stdout.strip()

    def network_rm(self, name: str) -> None:
        self.docker("network", "rm", name)

    def bridge(self, name: str) -> str:
        """The Linux bridge of network `name`: br-<first 12 characters of its id>."""
        net_id = self.docker("network", "inspect", "-f", "{{.Id}}", name).stdout.strip()
        return f"br-{net_id[:12]}"

    def subnet(self, name: str) -> str:
        return self.docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}",
                           name).stdout.strip()

    def run_httpd(self, name: str, network: str, publish_port: int) -> str:
        """Run `busybox httpd -f -p 80` as container `name` on `network`, port 80 published on
        `publish_port`; GET /name answers the container's name. Returns the container id once
        it runs (the port may need a moment more: see :func:`wait_http`)."""
        if self.image is None:
            self.import_busybox()
        assert self.image is not None
        cid = self.docker("run", "-d", "--name", name, "--network", network,
                          "-p", f"{publish_port}:80", self.image,
                          "/bin/sh", "-c", _HTTPD_SCRIPT, "httpd", name).stdout.strip()
        running = self.docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        if running != "true":
            logs = self.docker("logs", name, check=False).stdout
            raise LabError(f"container {name} is not running: {logs}")
        return cid

    def rm(self, name: str) -> None:
        """`docker rm -f NAME`."""
        self.docker("rm", "-f", name)

    # -- processes -------------------------------------------------------------------------

    def _container_pids(self) -> list[int]:
        pids: set[int] = set()
        for top in self._cgroup_dirs:
            if not top.exists():
                continue
            for dirpath, _, files in os.walk(top):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError):
                        text = (Path(dirpath) / "cgroup.procs").read_text()
                        pids.update(int(x) for x in text.split())
        return sorted(pids)

    def pids(self) -> list[int]:
        """Every live process of this Docker: dockerd, its containerd and shims (their command
        lines name our exec root) and the containers' processes (in our cgroup)."""
        mine = set(self._container_pids())
        if self.pid is not None:
            mine.add(self.pid)
        marker = str(self.exec_root)
        for pid in _all_pids():
            if pid != os.getpid() and marker in _cmdline(pid):
                mine.add(pid)
        return sorted(p for p in mine if _alive(p))

    def _kill_all(self, timeout: float = 15) -> None:
        """SIGKILL dockerd, then containerd and the shims, then the containers, until none is
        left."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        left = kill_until_gone(self.pids, timeout=timeout)
        if left:
            raise LabError(f"docker processes still alive: {left}")

    def kill(self) -> None:
        """Everything Docker runs dies at once (a crash, or the machine going down): dockerd,
        containerd, shims, containers. Its rules and bridges stay as they are."""
        self._kill_all()

    def stop(self, timeout: float = _STOP_GRACE) -> None:
        """Remove every container, then SIGTERM dockerd (it stops its containerd); whatever is
        left after `timeout` is killed."""
        if self.pid is not None:
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
            if self._proc is not None:
                stop_popen(self._proc, group=False, grace=timeout)
        self._kill_all()

    def _remove_cgroups(self, timeout: float = 10) -> None:
        for top in self._cgroup_dirs:
            remove_cgroup_tree(top, timeout=timeout,
                               while_busy=lambda: kill_until_gone(self._container_pids, timeout=0))

    def close(self) -> None:
        """Stop everything (gracefully, else by force), remove our cgroups and the data dirs.
        Idempotent; also after :meth:`kill` or a crash of dockerd."""
        errors = []
        try:
            self.stop()
        except Exception as exc:  # keep cleaning
            errors.append(f"stop: {exc}")
            with contextlib.suppress(Exception):
                self._kill_all()
        try:
            self._remove_cgroups()
        except Exception as exc:
            errors.append(str(exc))
        self._proc = None
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir.exists():
                errors.append(f"could not remove {self.dir}")
        if errors:
            raise LabError("docker teardown incomplete: " + "; ".join(errors))
