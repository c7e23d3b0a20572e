"""The namespace lab: a real sshd and real netfilter in throwaway network namespaces.

A lab is two network namespaces, ``<prefix>-srv`` and ``<prefix>-cli``, joined by a veth
pair (``eth0`` on each side), with the addresses ``10.231.<index>.1``/``.2`` and
``fd00:231:<index>::1``/``::2``. The server namespace runs a real OpenSSH server that accepts
the lab's own client key for ``root``; the client namespace runs ``ssh``. Each namespace has
its own, initially empty, firewall tables, so rules made in the lab never reach the firewall
of the machine's own (root) network namespace.

With ``private_ufw=True`` the server side additionally lives in a private mount namespace in
which copies of ``/etc/ufw`` and ``/etc/default/ufw`` (kept in the lab's workdir) are
bind-mounted over the real ones, so ``ufw`` run in the lab never touches the host's files.

``private_boot_files=True`` (implies ``private_ufw``) goes further for the files a system loads
its firewall from at boot: inside that mount namespace ``/etc`` is an overlay whose writable
layer is in the workdir (so nothing written to ``/etc`` there reaches the host, and
``/etc/iptables`` can exist even where the host has none). Private copies of the directories
``/etc/iptables``, ``/etc/ufw`` and ``/etc/default`` are bind-mounted over it
(``Lab.iptables_dir``, ``Lab.ufw_dir``, ``Lab.default_ufw`` is the ``ufw`` file in the copy of
``/etc/default``), and ``/etc/nftables.conf`` is a copy placed in the overlay's upper layer
(``Lab.nftables_conf``: read it from the host freely, change it through ``srv_exec``). Only
directories are bind-mounted, so that files can be replaced by rename (a bind-mounted file
cannot). It also creates ``/etc/fwsafe/persist-in-netns`` there, which lets fwsafe write those
boot files although it runs in a network namespace of its own.

This module is used by ``fwsafe demo`` and by the integration tests. Everything it starts is
tracked and stopped by PID in :meth:`Lab.close`; nothing else is ever signalled. All external
commands are run with argument lists, never through a shell command line built from input.

The small cgroup v1 helpers :class:`MemoryCgroup` and :class:`PidsCgroup` put processes under
memory or process-count pressure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, cast

__all__ = [
    "SSHD",
    "Lab",
    "LabError",
    "LabTimeout",
    "MemoryCgroup",
    "PidsCgroup",
    "create_lab",
    "default_session_path",
    "require_lab_capable",
]

SSHD = "/usr/sbin/sshd"
"""The OpenSSH server binary run in the server namespace."""

NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/fwsafe-lab")
CGROUP_ROOT = Path("/sys/fs/cgroup")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,13}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CGROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_CHAIN_COUNTER_RE = re.compile(r"\[\d+:\d+\]")
_NFT_COUNTER_RE = re.compile(r"counter packets \d+ bytes \d+")

_SSHD_START_TIMEOUT = 10.0
_HOLDER_START_TIMEOUT = 10.0
_TERM_GRACE = 3.0

# Run by a fresh interpreter inside the client namespace: open a NEW TCP connection and
# expect the "SSH-" banner within the time limit. Exit 0 on success, 1 otherwise.
_PROBE_SCRIPT = """\
import socket, sys, time
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + limit
try:
    s = socket.create_connection((host, port), timeout=limit)
    buf = b""
    while len(buf) < 4:
        left = end - time.monotonic()
        if left <= 0:
            sys.exit(1)
        s.settimeout(left)
        chunk = s.recv(4 - len(buf))
        if not chunk:
            sys.exit(1)
        buf += chunk
    s.close()
except OSError:
    sys.exit(1)
sys.exit(0 if buf == b"SSH-" else 1)
"""

# Shell program (fixed text; paths are passed as positional parameters, never interpolated):
# bind-mount the private ufw copies, report readiness, then hold the mount namespace open.
_HOLDER_SCRIPT = (
    'mount --bind "$1" /etc/ufw && mount --bind "$2" /etc/default/ufw '
    "&& echo ready && exec sleep infinity"
)

# The same with private boot files: an overlay over /etc (upper layer in the workdir), then the
# private copies of the firewall's boot files and ufw's files bound over it.
_BOOT_HOLDER_SCRIPT = (
    'mount -t overlay fwsafe-lab-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc '
    "&& mkdir -p /etc/iptables /etc/fwsafe /etc/default /etc/ufw "
    "&& : > /etc/fwsafe/persist-in-netns "
    '&& mount --bind "$3" /etc/iptables && mount --bind "$4" /etc/ufw '
    '&& mount --bind "$5" /etc/default '
    "&& echo ready && exec sleep infinity"
)

# Shell program for cgroup wrapping: "$0" is the cgroup.procs file, "$@" the command.
_CGROUP_EXEC_SCRIPT = 'echo $$ > "$0" && exec "$@"'


class LabError(Exception):
    """The lab could not be built, used or torn down as asked."""


class LabTimeout(LabError):
    """A command run in the lab did not finish within its time limit."""


def default_session_path() -> str:
    """PATH given to ssh sessions by default: the running interpreter's bin dir first.

    The ``fwsafe`` console script is installed next to ``sys.executable``, so sessions find it.
    """
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    return f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"


# --------------------------------------------------------------------------- helpers


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (a list, no shell), capture text output, map failures to :class:`LabError`."""
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
        )
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabTimeout(f"timed out after {timeout:g}s: {_fmt(args)}") from exc
    if check and result.returncode != 0:
        raise LabError(
            f"command failed (exit {result.returncode}): {_fmt(args)}\n"
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result


def _fmt(argv: Sequence[str]) -> str:
    """Render an argument list for messages."""
    return " ".join(argv)


def _exited_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for child ``pid`` to exit, leaving it unreaped (a zombie).

    While a zombie, its PID and process-group id cannot be reused, so signalling them still
    reaches only what we started. True if it exited (or was already reaped elsewhere).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return True
        if res is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _stop_popen(proc: subprocess.Popen[Any], *, group: bool, grace: float = _TERM_GRACE) -> None:
    """Stop a child we started: SIGTERM, then SIGKILL; then reap it.

    With ``group`` (the child leads a process group we created for it) the signals go to the
    whole group; the final SIGKILL is sent while the leader is still unreaped, so the group id
    is certainly still ours.
    """
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)

    send(signal.SIGTERM)
    exited = _exited_unreaped(proc.pid, grace)
    if group or not exited:
        send(signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"pid {proc.pid} did not die after SIGKILL") from exc


def _netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _netns_pids(name: str) -> list[int]:
    """PIDs of the processes living in network namespace ``name`` (empty if it is gone)."""
    if not _netns_exists(name):
        return []
    res = _run(["ip", "netns", "pids", name], check=False, timeout=15)
    if res.returncode != 0:
        return []
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _kill_netns_pids(name: str, *, timeout: float = 5.0) -> None:
    """SIGKILL every process still in one of *our* namespaces, until none is left."""
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in _netns_pids(name) if p != me]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise LabError(f"processes still alive in netns {name}: {pids}")
        time.sleep(0.05)


def _destroy_netns(name: str) -> None:
    """Kill what runs in netns ``name`` and delete it; no-op if it does not exist."""
    if not _netns_exists(name):
        return
    _kill_netns_pids(name)
    _run(["ip", "netns", "del", name], check=False, timeout=15)
    if _netns_exists(name):
        # A stale file without a namespace mounted on it (e.g. after a crash mid-creation).
        with contextlib.suppress(OSError):
            (NETNS_DIR / name).unlink()
    if _netns_exists(name):
        raise LabError(f"could not delete network namespace {name}")


def _tail(path: Path, lines: int = 30) -> str:
    """Last ``lines`` lines of a text file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _ssh_keygen(path: Path, comment: str) -> None:
    """Create an ed25519 key pair without passphrase at ``path`` / ``path.pub``."""
    for p in (path, path.with_name(path.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


# --------------------------------------------------------------------------- the lab


@dataclass
class Lab:
    """A server/client network-namespace pair with a real sshd. Build it with :func:`create_lab`.

    Use it as a context manager (or call :meth:`close`) so that everything it started is
    stopped and both namespaces are deleted, also when a test fails.
    """

    prefix: str
    index: int
    workdir: Path
    srv_ns: str
    cli_ns: str
    srv_ip4: str
    cli_ip4: str
    srv_ip6: str
    cli_ip6: str
    key: Path
    host_key: Path
    known_hosts: Path
    sshd_pid: int | None = None
    private_ufw: bool = False
    ipv6: bool = True
    """Whether the IPv6 addresses were configured (``srv_ip6``/``cli_ip6`` are "" if not)."""
    keep: bool = False
    """Keep the workdir on :meth:`close` (for post-mortem inspection)."""
    ssh_port: int = 22
    """The port sshd listens on (set by :meth:`start_sshd`); ssh commands use it."""
    ufw_dir: Path | None = None
    """With ``private_ufw``: the private copy of /etc/ufw (bind-mounted over it)."""
    default_ufw: Path | None = None
    """With ``private_ufw``: the private copy of /etc/default/ufw."""
    sshd_log: Path | None = None
    """sshd's log file (``workdir/sshd.log``) once sshd was started."""
    private_boot_files: bool = False
    """/etc is a private overlay, with private copies of the firewall's boot files."""
    iptables_dir: Path | None = None
    """With ``private_boot_files``: the private copy of /etc/iptables (bind-mounted over it)."""
    nftables_conf: Path | None = None
    """With ``private_boot_files``: /etc/nftables.conf in the overlay's upper layer."""

    _owns_workdir: bool = field(init=False, default=False, repr=False, compare=False)
    _sshd_proc: subprocess.Popen[bytes] | None = field(
        init=False, default=None, repr=False, compare=False
    )
    _holder: subprocess.Popen[bytes] | None = field(
        init=False, default=None, repr=False, compare=False
    )
    _tracked: list[tuple[subprocess.Popen[Any], bool]] = field(
        init=False, default_factory=list, repr=False, compare=False
    )
    _lock_fd: int | None = field(init=False, default=None, repr=False, compare=False)
    _closed: bool = field(init=False, default=False, repr=False, compare=False)

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ namespaces

    @property
    def mount_ns_pid(self) -> int | None:
        """PID whose mount namespace holds the private ufw bind mounts (None without them)."""
        if self._holder is not None and self._holder.poll() is None:
            return self._holder.pid
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _srv_prefix(self) -> list[str]:
        """argv prefix that runs a command in the server namespace(s)."""
        self._check_open()
        if self.private_ufw:
            pid = self.mount_ns_pid
            if pid is None:
                raise LabError(f"lab {self.prefix}: private mount namespace holder is not running")
            return [
                "nsenter",
                f"--net={NETNS_DIR / self.srv_ns}",
                f"--mount=/proc/{pid}/ns/mnt",
                "--",
            ]
        return ["ip", "netns", "exec", self.srv_ns]

    def _cli_prefix(self) -> list[str]:
        self._check_open()
        return ["ip", "netns", "exec", self.cli_ns]

    def srv_exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the server namespace (and, with ``private_ufw``, in sshd's mount ns).

        Raises :class:`LabError` on a non-zero exit when ``check``, :class:`LabTimeout` on
        timeout.
        """
        return _run([*self._srv_prefix(), *argv], check=check, input=input, timeout=timeout)

    def cli_exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the client namespace; errors as for :meth:`srv_exec`."""
        return _run([*self._cli_prefix(), *argv], check=check, input=input, timeout=timeout)

    def _track(self, argv: list[str], popen_kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        """Start a tracked child (in a new session unless the caller chose otherwise)."""
        own_group = "start_new_session" not in popen_kwargs and "process_group" not in popen_kwargs
        if own_group:
            popen_kwargs["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **popen_kwargs)
        self._tracked.append((proc, own_group))
        return proc

    def srv_popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the server namespace without waiting; stopped by :meth:`close`."""
        return cast(
            "subprocess.Popen[bytes]",
            self._track([*self._srv_prefix(), *argv], dict(popen_kwargs)),
        )

    def cli_popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the client namespace without waiting; stopped by :meth:`close`."""
        return cast(
            "subprocess.Popen[bytes]",
            self._track([*self._cli_prefix(), *argv], dict(popen_kwargs)),
        )

    # ------------------------------------------------------------------ sshd

    def _write_known_hosts(self) -> None:
        pub = _pub(self.host_key).read_text().split()
        key_type, key_b64 = pub[0], pub[1]
        hosts = [self.srv_ip4] + ([self.srv_ip6] if self.ipv6 else [])
        names = list(hosts)
        if self.ssh_port != 22:
            names += [f"[{h}]:{self.ssh_port}" for h in hosts]
        self.known_hosts.write_text(f"{','.join(names)} {key_type} {key_b64}\n")

    def start_sshd(self, env: Mapping[str, str] | None = None, port: int = 22) -> None:
        """Write ``workdir/sshd_config`` and run sshd in the server namespace.

        Sessions get every ``env`` item (via ``SetEnv``); ``PATH`` defaults to
        :func:`default_session_path`. Returns once the port answers with an ``SSH-`` banner
        (on both addresses); raises :class:`LabError` with the log tail after 10 s.
        """
        self._check_open()
        if self._sshd_proc is not None and self._sshd_proc.poll() is None:
            raise LabError(f"lab {self.prefix}: sshd is already running (pid {self.sshd_pid})")
        if not 1 <= port <= 65535:
            raise LabError(f"invalid port {port}")
        session_env = dict(env or {})
        session_env.setdefault("PATH", default_session_path())
        setenv: list[str] = []
        for name, value in session_env.items():
            if not _ENV_NAME_RE.match(name):
                raise LabError(f"invalid environment variable name: {name!r}")
            if any(c in value for c in '"\n\r\\'):
                raise LabError(f"unsupported character in value of {name} for sshd SetEnv")
            setenv.append(f'"{name}={value}"')

        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.ssh_port = port
        self._write_known_hosts()
        auth_keys = self.workdir / "authorized_keys"
        cfg = self.workdir / "sshd_config"
        listen = [self.srv_ip4] + ([self.srv_ip6] if self.ipv6 else [])
        lines = [
            f"Port {port}",
            *(f"ListenAddress {a}" for a in listen),
            f"HostKey {self.host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {auth_keys}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "ClientAliveInterval 2",
            "ClientAliveCountMax 2",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "MaxStartups 100:30:200",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            # sshd honours only the first SetEnv line: all variables go on one.
            "SetEnv " + " ".join(setenv),
        ]
        cfg.write_text("\n".join(lines) + "\n")

        self.sshd_log = self.workdir / "sshd.log"
        sshd_argv = [SSHD, "-D", "-e", "-f", str(cfg)]
        with open(self.sshd_log, "ab") as log:
            self._sshd_proc = subprocess.Popen(
                [*self._srv_prefix(), *sshd_argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # `ip netns exec` and `nsenter` (without --fork) exec: the child PID is sshd's.
        self.sshd_pid = self._sshd_proc.pid

        deadline = time.monotonic() + _SSHD_START_TIMEOUT
        pending = [False] + ([True] if self.ipv6 else [])
        while pending:
            if self._sshd_proc.poll() is not None:
                rc = self._sshd_proc.returncode
                self.sshd_pid = None
                self._sshd_proc = None
                raise LabError(f"sshd exited with {rc} at start; log:\n{_tail(self.sshd_log)}")
            if self.new_connection_ok(port=port, ipv6=pending[0], timeout=0.5):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.stop_sshd()
                raise LabError(
                    f"sshd did not answer on port {port} within {_SSHD_START_TIMEOUT:g}s; "
                    f"log:\n{_tail(self.sshd_log)}"
                )
            time.sleep(0.1)

    def stop_sshd(self) -> None:
        """Stop the listening sshd (by PID). Open sessions live on, as after a real restart."""
        proc, self._sshd_proc = self._sshd_proc, None
        self.sshd_pid = None
        if proc is not None:
            _stop_popen(proc, group=False)

    # ------------------------------------------------------------------ ssh client

    def _target_ip(self, ipv6: bool) -> str:
        if ipv6 and not self.ipv6:
            raise LabError(f"lab {self.prefix} was created without IPv6")
        return self.srv_ip6 if ipv6 else self.srv_ip4

    def ssh_argv(
        self,
        command: str,
        *,
        tty: bool = False,
        ipv6: bool = False,
        extra_opts: Sequence[str] = (),
    ) -> list[str]:
        """Full argv (run from the root namespace) of an ``ssh root@srv command`` from cli_ns.

        ``command`` is the remote command line, interpreted by root's shell on the server.
        """
        argv = [
            *self._cli_prefix(),
            "ssh",
            "-i",
            str(self.key),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
            "-o",
            "ServerAliveInterval=2",
            "-o",
            "ServerAliveCountMax=2",
        ]
        if self.ssh_port != 22:
            argv += ["-p", str(self.ssh_port)]
        if tty:
            argv.append("-tt")
        argv += [*extra_opts, "root@" + self._target_ip(ipv6), command]
        return argv

    def ssh(
        self,
        command: str,
        *,
        timeout: float = 30,
        input: str | None = None,
        ipv6: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` over ssh and wait; never raises on a non-zero exit (255: ssh failed).

        Raises :class:`LabTimeout` if it does not finish within ``timeout`` (ssh is killed).
        """
        return _run(self.ssh_argv(command, ipv6=ipv6), check=False, input=input, timeout=timeout)

    def ssh_popen(
        self,
        command: str,
        *,
        tty: bool = True,
        ipv6: bool = False,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start an ssh session running ``command`` (with a pty by default) without waiting.

        The session is tracked: :meth:`close` kills it if it still runs. Killing the returned
        process is how a person's session dies.
        """
        return cast(
            "subprocess.Popen[bytes]",
            self._track(self.ssh_argv(command, tty=tty, ipv6=ipv6), dict(popen_kwargs)),
        )

    # ------------------------------------------------------------------ probes

    def new_connection_ok(
        self, *, port: int | None = None, ipv6: bool = False, timeout: float = 1.0
    ) -> bool:
        """True if a NEW TCP connection from cli_ns gets the ``SSH-`` banner within ``timeout``.

        A fresh interpreter runs in the client namespace for every probe, so each probe is a
        genuinely new connection (new source port, new conntrack entry). ``port`` defaults to
        the sshd port.
        """
        probe_port = self.ssh_port if port is None else port
        argv = [
            sys.executable,
            "-I",
            "-c",
            _PROBE_SCRIPT,
            self._target_ip(ipv6),
            str(probe_port),
            f"{timeout:.3f}",
        ]
        try:
            res = self.cli_exec(argv, check=False, timeout=timeout + 15)
        except LabTimeout:
            return False
        return res.returncode == 0

    def new_login_ok(self, *, ipv6: bool = False, timeout: float = 5.0) -> bool:
        """True if a full, new ssh login running ``true`` succeeds within ``timeout``."""
        try:
            return self.ssh("true", timeout=timeout, ipv6=ipv6).returncode == 0
        except LabTimeout:
            return False

    def wait_new_login(self, *, deadline_s: float, ipv6: bool = False) -> float | None:
        """Poll until a new connection and a new login succeed; seconds waited, or None."""
        start = time.monotonic()
        end = start + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if self.new_connection_ok(ipv6=ipv6, timeout=min(1.0, left)):
                left = end - time.monotonic()
                if left > 0 and self.new_login_ok(ipv6=ipv6, timeout=min(5.0, max(left, 0.5))):
                    return time.monotonic() - start
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    # ------------------------------------------------------------------ firewall view

    def ruleset(self) -> str:
        """Normalized firewall state of srv_ns: iptables, ip6tables and nft, without counters."""
        parts = ["== ipv4 =="]
        parts += _normalize_save(self.srv_exec(["iptables-save"]).stdout)
        parts.append("== ipv6 ==")
        parts += _normalize_save(self.srv_exec(["ip6tables-save"]).stdout)
        if shutil.which("nft") is not None:
            parts.append("== nft ==")
            nft = self.srv_exec(["nft", "list", "ruleset"]).stdout
            lines = [
                _NFT_COUNTER_RE.sub("counter packets 0 bytes 0", ln)
                for ln in nft.splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")
            ]
            # Tables, and the chains and sets in a table, are listed in creation order, which
            # carries no meaning (iptables-restore on nf_tables re-creates the tables it
            # loads): compare them as sorted sets.
            blocks: list[list[str]] = []
            for ln in lines:
                if not ln.startswith((" ", "\t", "}")) or not blocks:
                    blocks.append([])
                blocks[-1].append(ln)
            parts += [ln for block in sorted(_sorted_members(b) for b in blocks) for ln in block]
        return "\n".join(parts) + "\n"

    # ------------------------------------------------------------------ teardown

    def close(self, keep: bool | None = None) -> None:
        """Stop everything this lab started and delete its namespaces. Idempotent.

        Order: tracked children (their own process groups, by PID), sshd, the mount-namespace
        holder, any process still inside the two namespaces, then ``ip netns del`` and the
        workdir (kept if ``keep`` — argument or field — is true, or if the caller supplied an
        existing directory). Nothing global is unmounted: private mounts vanish with their
        namespace.
        """
        if self._closed:
            return
        errors: list[str] = []
        for proc, group in self._tracked:
            try:
                _stop_popen(proc, group=group)
            except Exception as exc:  # keep tearing down
                errors.append(f"stopping pid {proc.pid}: {exc}")
        self._tracked.clear()
        try:
            self.stop_sshd()
        except Exception as exc:
            errors.append(f"stopping sshd: {exc}")
        holder, self._holder = self._holder, None
        if holder is not None:
            try:
                _stop_popen(holder, group=True)
                if holder.stdout is not None:
                    holder.stdout.close()
            except Exception as exc:
                errors.append(f"stopping mount holder: {exc}")
        for ns in (self.srv_ns, self.cli_ns):
            try:
                _destroy_netns(ns)
            except Exception as exc:
                errors.append(str(exc))
        self._closed = True
        keep_dir = self.keep if keep is None else keep
        if not keep_dir and self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise LabError(f"lab {self.prefix} teardown incomplete: " + "; ".join(errors))

    # ------------------------------------------------------------------ building (internal)

    def _start_mount_holder(self) -> None:
        """Start the process whose private mount namespace carries the ufw bind mounts."""
        assert self.ufw_dir is not None and self.default_ufw is not None
        if self.private_boot_files:
            assert self.iptables_dir is not None and self.nftables_conf is not None
            args = [str(self.nftables_conf.parent), str(self.workdir / "etc-overlay-work"),
                    str(self.iptables_dir), str(self.ufw_dir), str(self.default_ufw.parent)]
            script = _BOOT_HOLDER_SCRIPT
        else:
            args, script = [str(self.ufw_dir), str(self.default_ufw)], _HOLDER_SCRIPT
        argv = [
            "ip", "netns", "exec", self.srv_ns,
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "fwsafe-lab-mounts", *args,
        ]  # fmt: skip
        err_path = self.workdir / "mount-holder.err"
        with open(err_path, "wb") as err:
            self._holder = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        stdout = cast(IO[bytes], self._holder.stdout)
        ready, _, _ = select.select([stdout], [], [], _HOLDER_START_TIMEOUT)
        line = os.read(stdout.fileno(), 64) if ready else b""
        if line.strip() != b"ready":
            raise LabError(f"private ufw mount namespace failed: {_tail(err_path).strip()}")


def _sorted_members(block: list[str]) -> list[str]:
    """A table block with its members (chains, sets, maps: one tab deep) in sorted order."""
    if len(block) < 2:
        return block
    members: list[list[str]] = []
    for ln in block[1:-1]:
        if ln.startswith("\t") and not ln.startswith("\t\t") and ln.strip() != "}":
            members.append([])
        if members:
            members[-1].append(ln)
    return [block[0], *[ln for m in sorted(members) for ln in m], block[-1]]


def _normalize_save(text: str) -> list[str]:
    """iptables-save output without comments and with chain counters zeroed."""
    out: list[str] = []
    for ln in text.splitlines():
        if not ln.strip() or ln.startswith("#"):
            continue
        if ln.startswith(":"):
            ln = _CHAIN_COUNTER_RE.sub("[0:0]", ln)
        out.append(ln)
    return out


def _acquire_prefix_lock(prefix: str) -> int:
    """Hold ``/run/fwsafe-lab/<prefix>.lock`` for the lab's lifetime.

    A live lab with the same prefix (this process or another) makes this fail, so that the
    stale-namespace cleanup of :func:`create_lab` never destroys a lab that is in use. The lock
    dies with its process, so a crashed run leaves nothing that blocks the next.
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


def create_lab(
    prefix: str,
    index: int,
    *,
    workdir: Path | None = None,
    private_ufw: bool = False,
    ipv6: bool = True,
    keep: bool = False,
    private_boot_files: bool = False,
) -> Lab:
    """Build a lab: namespaces, veth, addresses, keys, known_hosts. Does not start sshd.

    Stale namespaces of the same names (left by a crashed run) are removed first. On any
    failure everything made so far is removed again before the error propagates.

    ``workdir`` defaults to a new temporary directory; a directory the caller supplies is
    removed on close only if this function created it. ``keep`` keeps it in any case.

    ``private_boot_files`` (implies ``private_ufw``): see the module's documentation.
    """
    private_ufw = private_ufw or private_boot_files
    if not _PREFIX_RE.match(prefix):
        raise LabError(f"invalid lab prefix {prefix!r} (1-14 of [A-Za-z0-9_-])")
    if not 1 <= index <= 250:
        raise LabError(f"lab index must be in 1..250, got {index}")

    lock_fd = _acquire_prefix_lock(prefix)
    try:
        if workdir is None:
            wd = Path(tempfile.mkdtemp(prefix=f"fwsafe-lab-{prefix}-"))
            owns = True
        else:
            wd = Path(workdir).resolve()
            owns = not wd.exists()
            wd.mkdir(mode=0o700, parents=True, exist_ok=True)
    except BaseException:
        os.close(lock_fd)
        raise

    lab = Lab(
        prefix=prefix,
        index=index,
        workdir=wd,
        srv_ns=f"{prefix}-srv",
        cli_ns=f"{prefix}-cli",
        srv_ip4=f"10.231.{index}.1",
        cli_ip4=f"10.231.{index}.2",
        srv_ip6=f"fd00:231:{index}::1" if ipv6 else "",
        cli_ip6=f"fd00:231:{index}::2" if ipv6 else "",
        key=wd / "id_ed25519",
        host_key=wd / "ssh_host_ed25519_key",
        known_hosts=wd / "known_hosts",
        private_ufw=private_ufw,
        ipv6=ipv6,
        keep=keep,
        private_boot_files=private_boot_files,
    )
    lab._owns_workdir = owns
    lab._lock_fd = lock_fd
    try:
        _build(lab)
    except BaseException as exc:
        try:
            lab.close()
        except LabError as cleanup_exc:
            raise LabError(f"{exc}\n(and cleanup failed: {cleanup_exc})") from exc
        raise
    return lab


def _build(lab: Lab) -> None:
    """The steps of :func:`create_lab` after the Lab object exists."""
    for ns in (lab.srv_ns, lab.cli_ns):
        _destroy_netns(ns)
    for ns in (lab.srv_ns, lab.cli_ns):
        _run(["ip", "netns", "add", ns])
    # Create the veth pair directly inside the two namespaces: it never exists in the root
    # namespace, so names cannot collide with the host's or with another lab's interfaces.
    _run(
        ["ip", "link", "add", "eth0", "netns", lab.srv_ns,
         "type", "veth", "peer", "name", "eth0", "netns", lab.cli_ns]
    )  # fmt: skip
    sides = ((lab.srv_ns, lab.srv_ip4, lab.srv_ip6), (lab.cli_ns, lab.cli_ip4, lab.cli_ip6))
    for ns, ip4, ip6 in sides:
        _run(["ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", "eth0"])
        if lab.ipv6:
            _run(["ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    _ssh_keygen(lab.host_key, f"fwsafe-lab-{lab.prefix}-host")
    _ssh_keygen(lab.key, f"fwsafe-lab-{lab.prefix}-client")
    auth = lab.workdir / "authorized_keys"
    auth.write_text(_pub(lab.key).read_text())
    auth.chmod(0o600)
    lab._write_known_hosts()

    if lab.private_ufw:
        lab.ufw_dir = lab.workdir / "etc-ufw"
        lab.default_ufw = lab.workdir / "default-ufw"
        if lab.ufw_dir.exists():
            shutil.rmtree(lab.ufw_dir)
        if os.path.isdir("/etc/ufw"):
            shutil.copytree("/etc/ufw", lab.ufw_dir, symlinks=True)
        else:
            lab.ufw_dir.mkdir(mode=0o755)
        if os.path.isfile("/etc/default/ufw"):
            shutil.copy2("/etc/default/ufw", lab.default_ufw)
        else:
            lab.default_ufw.touch(mode=0o644)
        if lab.private_boot_files:
            _prepare_boot_files(lab)
        lab._start_mount_holder()


def _prepare_boot_files(lab: Lab) -> None:
    """Private copies of /etc/iptables and /etc/default, and the overlay's upper layer holding
    /etc/nftables.conf (placed before the overlay is mounted, so the namespace sees it)."""
    lab.iptables_dir = lab.workdir / "etc-iptables"
    default_dir = lab.workdir / "etc-default"
    upper = lab.workdir / "etc-overlay"
    for path in (lab.iptables_dir, default_dir, upper, lab.workdir / "etc-overlay-work"):
        if path.exists():
            shutil.rmtree(path)
    if os.path.isdir("/etc/iptables"):
        shutil.copytree("/etc/iptables", lab.iptables_dir, symlinks=True)
    else:
        lab.iptables_dir.mkdir(mode=0o755)
    shutil.copytree("/etc/default", default_dir, symlinks=True)
    assert lab.default_ufw is not None
    if lab.default_ufw.exists():
        shutil.copy2(lab.default_ufw, default_dir / "ufw")
    lab.default_ufw = default_dir / "ufw"
    upper.mkdir(mode=0o755)
    (lab.workdir / "etc-overlay-work").mkdir(mode=0o755)
    lab.nftables_conf = upper / "nftables.conf"
    if os.path.isfile("/etc/nftables.conf"):
        shutil.copy2("/etc/nftables.conf", lab.nftables_conf)
    else:
        lab.nftables_conf.touch(mode=0o755)


# --------------------------------------------------------------------------- capability


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
    probe = f"fwsafe-probe-{os.getpid()}"
    try:
        res = _run(["ip", "netns", "add", probe], check=False, timeout=15)
        if res.returncode != 0:
            return f"`ip netns add` failed: {res.stderr.strip()}"
    finally:
        if _netns_exists(probe):
            _run(["ip", "netns", "del", probe], check=False, timeout=15)
    return None


# --------------------------------------------------------------------------- cgroups (v1)


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in the v1 hierarchy of ``controller`` ("/" if unknown)."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return "/"
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2] or "/"
    return "/"


class _CgroupV1:
    """A child cgroup in one cgroup v1 controller hierarchy.

    It is created below the cgroup this process already belongs to (the hierarchy root when
    that is "/"), so processes put into it stay inside their enclosing cgroup's accounting.
    """

    controller: ClassVar[str] = ""

    def __init__(self, name: str, *, parent: str | None = None) -> None:
        if not _CGROUP_NAME_RE.match(name):
            raise LabError(f"invalid cgroup name {name!r}")
        root = CGROUP_ROOT / self.controller
        if not (root / "cgroup.procs").exists():
            raise LabError(f"cgroup v1 {self.controller} controller not mounted at {root}")
        rel = _own_cgroup(self.controller) if parent is None else parent
        self.name = name
        self.parent_path: Path = root / rel.strip("/") if rel.strip("/") else root
        self.path: Path = self.parent_path / name
        self._closed = False
        if self.path.exists():  # stale, from a crashed run
            self._evacuate()
            self._rmdir()
        self.path.mkdir()

    def _write(self, fname: str, value: str) -> None:
        try:
            (self.path / fname).write_text(value)
        except OSError as exc:
            raise LabError(f"cannot write {value!r} to {self.path / fname}: {exc}") from exc

    def _read(self, fname: str) -> str:
        return (self.path / fname).read_text()

    def pids(self) -> list[int]:
        """PIDs currently in this cgroup."""
        try:
            return [int(x) for x in self._read("cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        if self._closed:
            raise LabError(f"cgroup {self.path} is closed")
        self._write("cgroup.procs", str(pid))

    def wrap_argv(self, argv: Sequence[str]) -> list[str]:
        """argv that joins this cgroup and then execs ``argv`` (same PID): no race at start."""
        return ["sh", "-c", _CGROUP_EXEC_SCRIPT, str(self.path / "cgroup.procs"), *argv]

    def _evacuate(self, timeout: float = 5.0) -> None:
        """Move every process back to the parent cgroup (retrying while they fork)."""
        deadline = time.monotonic() + timeout
        target = self.parent_path / "cgroup.procs"
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    target.write_text(str(pid))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise LabError(f"cannot move pid {pid} out of {self.path}: {exc}") from exc
            if time.monotonic() > deadline:
                raise LabError(f"processes keep appearing in {self.path}: {pids}")
            time.sleep(0.02)

    def _rmdir(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise LabError(f"cannot remove cgroup {self.path}: {exc}") from exc
                self._evacuate()
                time.sleep(0.05)

    def close(self) -> None:
        """Move remaining processes back to the parent cgroup and remove this one. Idempotent."""
        if self._closed:
            return
        self._evacuate()
        self._rmdir()
        self._closed = True

    def __enter__(self) -> _CgroupV1:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MemoryCgroup(_CgroupV1):
    """cgroup v1 memory controller group with a hard limit (``memory.limit_in_bytes``).

    A process that allocates past the limit is killed by the cgroup's OOM killer (SIGKILL).
    Swap accounting (``memory.memsw.*``) is left alone: on a machine with swap, pages may be
    swapped out instead.
    """

    controller: ClassVar[str] = "memory"

    def __init__(self, name: str, limit_bytes: int, *, parent: str | None = None) -> None:
        if limit_bytes <= 0:
            raise LabError(f"memory limit must be positive, got {limit_bytes}")
        super().__init__(name, parent=parent)
        try:
            self._write("memory.limit_in_bytes", str(limit_bytes))
        except BaseException:
            self.close()
            raise
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryCgroup:
        return self

    def oom_kills(self) -> int:
        """Number of OOM kills in this cgroup.

        Read from ``oom_kill N`` in ``memory.oom_control`` (kernels >= 4.13); on older kernels a
        best effort: 1 if the limit was ever hit (``memory.failcnt`` > 0) and the group is or was
        under OOM, else 0.
        """
        ctl: dict[str, int] = {}
        for line in self._read("memory.oom_control").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                ctl[k] = int(v)
        if "oom_kill" in ctl:
            return ctl["oom_kill"]
        failcnt = int(self._read("memory.failcnt").strip() or "0")
        return 1 if failcnt > 0 and ctl.get("under_oom", 0) else 0

    def usage_bytes(self) -> int:
        """Current memory usage of the group."""
        return int(self._read("memory.usage_in_bytes"))

    def max_usage_bytes(self) -> int:
        """Peak memory usage of the group."""
        return int(self._read("memory.max_usage_in_bytes"))


class PidsCgroup(_CgroupV1):
    """cgroup v1 pids controller group: caps how many tasks may exist (fork fails past it)."""

    controller: ClassVar[str] = "pids"

    def __init__(self, name: str, max_pids: int | None, *, parent: str | None = None) -> None:
        super().__init__(name, parent=parent)
        try:
            self.set_max(max_pids)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PidsCgroup:
        return self

    def set_max(self, max_pids: int | None) -> None:
        """Set ``pids.max``; None means unlimited ("max")."""
        if max_pids is not None and max_pids < 0:
            raise LabError(f"max_pids must be >= 0, got {max_pids}")
        self._write("pids.max", "max" if max_pids is None else str(max_pids))

    def current(self) -> int:
        """Number of tasks now in the group (``pids.current``)."""
        return int(self._read("pids.current"))
