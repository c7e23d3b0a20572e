"""OpenSSH in the lab: keys, known_hosts, a private sshd (config, start, stop) and the client.

The server is a real ``/usr/sbin/sshd`` run in the foreground with a config file of its own
(root logs in with the lab's key only; sessions get the environment the lab gives them), so its
PID is our child's. The client side is plain ``ssh`` with the lab's key and known_hosts, and a
banner probe: a fresh interpreter opens one NEW TCP connection and expects ``SSH-``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fwsafe.lab.procs import LabError, LabTimeout, run, stop_popen, tail, wait_answering

__all__ = [
    "SSHD",
    "SshClient",
    "SshServer",
    "banner_probe_argv",
    "default_session_path",
    "known_hosts_line",
    "pub_path",
    "ssh_client_argv",
    "ssh_keygen",
    "sshd_config",
]

SSHD = "/usr/sbin/sshd"
"""The OpenSSH server binary run in the server namespace."""

SSHD_START_TIMEOUT = 10.0
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Run by a fresh interpreter (in the client's namespace): open a NEW TCP connection and expect
# the "SSH-" banner within the time limit. Exit 0 on success, 1 otherwise.
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


def default_session_path() -> str:
    """PATH given to ssh sessions by default: the running interpreter's bin dir first.

    The ``fwsafe`` console script is installed next to ``sys.executable``, so sessions find it.
    """
    bindir = os.path.dirname(os.path.abspath(sys.executable))
    return f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"


def banner_probe_argv(host: str, port: int, timeout: float) -> list[str]:
    """argv (to run inside the client's namespace) of one NEW TCP connection to host:port that
    exits 0 if the ``SSH-`` banner arrives within ``timeout`` seconds."""
    return [sys.executable, "-I", "-c", _PROBE_SCRIPT, host, str(port), f"{timeout:.3f}"]


def pub_path(path: Path) -> Path:
    """The public half of the key pair at ``path``."""
    return path.with_name(path.name + ".pub")


def ssh_keygen(path: Path, comment: str) -> None:
    """Create an ed25519 key pair without passphrase at ``path`` / ``path.pub``."""
    for p in (path, pub_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def known_hosts_line(hosts: Sequence[str], host_key: Path, port: int = 22) -> str:
    """The known_hosts line that trusts ``host_key`` for ``hosts`` (on ``port``)."""
    key_type, key_b64 = pub_path(host_key).read_text().split()[:2]
    names = list(hosts)
    if port != 22:
        names += [f"[{h}]:{port}" for h in hosts]
    return f"{','.join(names)} {key_type} {key_b64}\n"


def sshd_config(*, port: int, listen: Sequence[str], host_key: Path, pid_file: Path,
                authorized_keys: Path, env: Mapping[str, str], extra: Sequence[str] = ()) -> str:
    """sshd_config text: root logs in with a key from ``authorized_keys`` only, sessions get
    every ``env`` item (``SetEnv``), the log is verbose (accepted logins are counted)."""
    setenv: list[str] = []
    for name, value in env.items():
        if not _ENV_NAME_RE.match(name):
            raise LabError(f"invalid environment variable name: {name!r}")
        if any(c in value for c in '"\n\r\\'):
            raise LabError(f"unsupported character in value of {name} for sshd SetEnv")
        setenv.append(f'"{name}={value}"')
    lines = [
        f"Port {port}",
        *(f"ListenAddress {a}" for a in listen),
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
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
        *extra,
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
        # sshd honours only the first SetEnv line: all variables go on one.
        "SetEnv " + " ".join(setenv),
    ]
    return "\n".join(lines) + "\n"


def ssh_client_argv(key: Path, known_hosts: Path, target: str, command: str, *,
                    port: int = 22, tty: bool = False, extra_opts: Sequence[str] = ()
                    ) -> list[str]:
    """``ssh root@target command`` with ``key``, trusting only ``known_hosts``, never asking."""
    argv = [
        "ssh", "-i", str(key),
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=3",
        "-o", "ServerAliveInterval=2",
        "-o", "ServerAliveCountMax=2",
    ]  # fmt: skip
    if port != 22:
        argv += ["-p", str(port)]
    if tty:
        argv.append("-tt")
    return [*argv, *extra_opts, "root@" + target, command]


class SshServer:
    """One sshd with its files in ``workdir``: ``sshd_config``, ``sshd.pid``, ``sshd.log``.

    ``known_hosts`` (optional) is rewritten for the port at every start; ``extra`` are more
    config lines.
    """

    def __init__(self, workdir: Path, host_key: Path, authorized_keys: Path,
                 listen: Sequence[str], *, known_hosts: Path | None = None,
                 extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.listen = list(listen)
        self.known_hosts = known_hosts
        self.extra = list(extra)
        self.port = 22
        self.log: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """sshd's PID once started (`ip netns exec` and `nsenter` exec: it is our child)."""
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_known_hosts(self) -> None:
        if self.known_hosts is not None:
            self.known_hosts.write_text(known_hosts_line(self.listen, self.host_key, self.port))

    def start(self, prefix: Sequence[str], *, env: Mapping[str, str] | None = None,
              port: int = 22, answering: Callable[[str], bool],
              timeout: float = SSHD_START_TIMEOUT) -> None:
        """Run sshd under the argv ``prefix`` (the namespace to run in); return once
        ``answering(address)`` is true for every listen address, or raise :class:`LabError`
        with the log's tail. Sessions' ``PATH`` defaults to :func:`default_session_path`."""
        if self.running():
            raise LabError(f"sshd is already running (pid {self.pid})")
        if not 1 <= port <= 65535:
            raise LabError(f"invalid port {port}")
        session_env = dict(env or {})
        session_env.setdefault("PATH", default_session_path())
        cfg = self.workdir / "sshd_config"
        text = sshd_config(port=port, listen=self.listen, host_key=self.host_key,
                           pid_file=self.workdir / "sshd.pid",
                           authorized_keys=self.authorized_keys, env=session_env,
                           extra=self.extra)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.port = port
        self.write_known_hosts()
        cfg.write_text(text)
        self.log = log_path = self.workdir / "sshd.log"
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*prefix, SSHD, "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pending = list(self.listen)

        def all_answer() -> bool:
            while pending and answering(pending[0]):
                pending.pop(0)
            return not pending

        try:
            wait_answering(self._proc, all_answer, what=f"sshd on port {port}", timeout=timeout,
                           details=lambda: "log:\n" + tail(log_path), interval=0.1)
        except LabError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the listening sshd (by PID). Open sessions live on, as after a real restart."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_popen(proc, group=False)

    def accepted_logins(self) -> int:
        """SSH logins sshd accepted so far (from its VERBOSE log)."""
        if self.log is None:
            return 0
        try:
            return self.log.read_text(errors="replace").count("Accepted publickey")
        except FileNotFoundError:
            return 0


class SshClient:
    """``ssh`` as root, and NEW-connection probes, from the client's namespace (``prefix()``
    enters it) with ``key`` and trusting ``known_hosts`` only."""

    def __init__(self, prefix: Callable[[], list[str]], key: Path, known_hosts: Path) -> None:
        self.prefix = prefix
        self.key = key
        self.known_hosts = known_hosts

    def argv(self, target: str, command: str, *, port: int = 22, tty: bool = False,
             extra_opts: Sequence[str] = ()) -> list[str]:
        return [*self.prefix(), *ssh_client_argv(self.key, self.known_hosts, target, command,
                                                  port=port, tty=tty, extra_opts=extra_opts)]

    def run(self, target: str, command: str, *, port: int = 22, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``command`` over ssh and wait; never raises on a non-zero exit (255: ssh failed),
        :class:`LabTimeout` past ``timeout``."""
        return run(self.argv(target, command, port=port), check=False, input=input,
                   timeout=timeout)

    def banner_ok(self, target: str, port: int, timeout: float) -> bool:
        """A NEW TCP connection (a fresh interpreter, so a new source port and conntrack entry)
        gets the ``SSH-`` banner within ``timeout``."""
        argv = [*self.prefix(), *banner_probe_argv(target, port, timeout)]
        try:
            return run(argv, check=False, timeout=timeout + 15).returncode == 0
        except LabTimeout:
            return False

    def login_ok(self, target: str, port: int, timeout: float) -> bool:
        """A full, new ssh login running ``true`` succeeds within ``timeout``."""
        try:
            return self.run(target, "true", port=port, timeout=timeout).returncode == 0
        except LabTimeout:
            return False

    def wait_login(self, target: str, port: int, deadline_s: float) -> float | None:
        """Poll until a new connection and a new login succeed; seconds waited, or None."""
        start = time.monotonic()
        end = start + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if self.banner_ok(target, port, min(1.0, left)):
                left = end - time.monotonic()
                if left > 0 and self.login_ok(target, port, min(5.0, max(left, 0.5))):
                    return time.monotonic() - start
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
