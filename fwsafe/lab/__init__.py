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

This module is used by ``fwsafe demo``, the benchmarks and the integration tests. Everything
it starts is tracked and stopped by PID in :meth:`Lab.close`; nothing else is ever signalled.
All external commands are run with argument lists, never through a shell command line built
from input.

The pieces, each usable on its own (the test harnesses of fleets and system containers do):
``network`` (the namespaces, built by the shared fwsafe.check.netns), ``sshd`` (keys,
known_hosts, sshd, the ssh client and banner probe), ``files`` (the private mounts),
``rulesets`` (comparable firewall state), ``procs`` (commands, children stopped by PID) and
``cgroups`` (the cgroup v1 helpers :class:`MemoryCgroup` and :class:`PidsCgroup` that put
processes under memory or process-count pressure).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fwsafe.check.netns import Namespaces, kill_until_gone
from fwsafe.lab.cgroups import MemoryCgroup, PidsCgroup, remove_cgroup_tree
from fwsafe.lab.lab_files import MountHolder, PrivateFiles
from fwsafe.lab.lab_sshd import (
    SSHD,
    SshClient,
    SshServer,
    banner_probe_argv,
    default_session_path,
    known_hosts_line,
    pub_path,
    ssh_client_argv,
    ssh_keygen,
)
from fwsafe.lab.network import LabNetwork, acquire_prefix_lock, require_lab_capable
from fwsafe.lab.procs import (
    Children,
    LabError,
    LabTimeout,
    run,
    stop_popen,
    tail,
    teardown,
    wait_answering,
)
from fwsafe.lab.rulesets import normalize_nft, normalize_save, ruleset_text

__all__ = [
    "SSHD",
    "Children",
    "Lab",
    "LabError",
    "LabTimeout",
    "MemoryCgroup",
    "MountHolder",
    "PidsCgroup",
    "SshClient",
    "SshServer",
    "banner_probe_argv",
    "create_lab",
    "default_session_path",
    "kill_until_gone",
    "known_hosts_line",
    "normalize_nft",
    "normalize_save",
    "remove_cgroup_tree",
    "require_lab_capable",
    "run",
    "ssh_client_argv",
    "ssh_keygen",
    "stop_popen",
    "tail",
    "teardown",
    "wait_answering",
]


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
    private_ufw: bool = False
    ipv6: bool = True
    """Whether the IPv6 addresses were configured (``srv_ip6``/``cli_ip6`` are "" if not)."""
    keep: bool = False
    """Keep the workdir on :meth:`close` (for post-mortem inspection)."""
    private_boot_files: bool = False
    """/etc is a private overlay, with private copies of the firewall's boot files."""

    _owns_workdir: bool = field(init=False, default=False, repr=False, compare=False)
    _lock_fd: int | None = field(init=False, default=None, repr=False, compare=False)
    _closed: bool = field(init=False, default=False, repr=False, compare=False)
    _namespaces: Namespaces = field(init=False, default_factory=Namespaces, repr=False,
                                    compare=False)
    _children: Children = field(init=False, default_factory=Children, repr=False, compare=False)
    _sshd: SshServer = field(init=False, repr=False, compare=False)
    _files: PrivateFiles | None = field(init=False, default=None, repr=False, compare=False)
    _client: SshClient = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        listen = [self.srv_ip4] + ([self.srv_ip6] if self.ipv6 else [])
        self._sshd = SshServer(self.workdir, self.host_key, self.workdir / "authorized_keys",
                               listen, known_hosts=self.known_hosts)
        self._client = SshClient(self._cli_prefix, self.key, self.known_hosts)
        if self.private_ufw:
            self._files = PrivateFiles(self.workdir, self.srv_ns,
                                       boot_files=self.private_boot_files)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ parts' state

    @property
    def ssh_port(self) -> int:
        """The port sshd listens on (set by :meth:`start_sshd`); ssh commands use it."""
        return self._sshd.port

    @property
    def sshd_pid(self) -> int | None:
        """sshd's PID while started (None before and after)."""
        return self._sshd.pid

    @property
    def sshd_log(self) -> Path | None:
        """sshd's log file (``workdir/sshd.log``) once sshd was started."""
        return self._sshd.log

    @property
    def ufw_dir(self) -> Path | None:
        """With ``private_ufw``: the private copy of /etc/ufw (bind-mounted over it)."""
        return self._files.ufw_dir if self._files else None

    @property
    def default_ufw(self) -> Path | None:
        """With ``private_ufw``: the private copy of /etc/default/ufw."""
        return self._files.default_ufw if self._files else None

    @property
    def iptables_dir(self) -> Path | None:
        """With ``private_boot_files``: the private copy of /etc/iptables (bind-mounted)."""
        return self._files.iptables_dir if self._files else None

    @property
    def nftables_conf(self) -> Path | None:
        """With ``private_boot_files``: /etc/nftables.conf in the overlay's upper layer."""
        return self._files.nftables_conf if self._files else None

    @property
    def mount_ns_pid(self) -> int | None:
        """PID whose mount namespace holds the private ufw bind mounts (None without them)."""
        return self._files.holder.pid if self._files else None

    # ------------------------------------------------------------------ running commands

    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _srv_prefix(self) -> list[str]:
        """argv prefix that runs a command in the server namespace(s)."""
        self._check_open()
        if self._files is not None:
            return self._files.holder.enter_argv()
        return self._namespaces.exec_argv(self.srv_ns, [])

    def _cli_prefix(self) -> list[str]:
        self._check_open()
        return self._namespaces.exec_argv(self.cli_ns, [])

    def srv_exec(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the server namespace (and, with ``private_ufw``, in sshd's mount ns).

        Raises :class:`LabError` on a non-zero exit when ``check``, :class:`LabTimeout` on
        timeout.
        """
        return run([*self._srv_prefix(), *argv], check=check, input=input, timeout=timeout)

    def cli_exec(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the client namespace; errors as for :meth:`srv_exec`."""
        return run([*self._cli_prefix(), *argv], check=check, input=input, timeout=timeout)

    def srv_popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the server namespace without waiting; stopped by :meth:`close`."""
        proc = self._children.start([*self._srv_prefix(), *argv], popen_kwargs)
        return cast("subprocess.Popen[bytes]", proc)

    def cli_popen(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the client namespace without waiting; stopped by :meth:`close`."""
        proc = self._children.start([*self._cli_prefix(), *argv], popen_kwargs)
        return cast("subprocess.Popen[bytes]", proc)

    def ruleset(self) -> str:
        """Normalized firewall state of srv_ns: iptables, ip6tables and nft, without counters."""
        return ruleset_text(self.srv_exec)

    # ------------------------------------------------------------------ sshd and ssh

    def start_sshd(self, env: Mapping[str, str] | None = None, port: int = 22) -> None:
        """Write ``workdir/sshd_config`` and run sshd in the server namespace.

        Sessions get every ``env`` item (via ``SetEnv``); ``PATH`` defaults to
        :func:`default_session_path`. Returns once the port answers with an ``SSH-`` banner
        (on both addresses); raises :class:`LabError` with the log tail after 10 s.
        """
        self._sshd.start(self._srv_prefix(), env=env, port=port,
                         answering=lambda host: self._client.banner_ok(host, port, 0.5))

    def stop_sshd(self) -> None:
        """Stop the listening sshd (by PID). Open sessions live on, as after a real restart."""
        self._sshd.stop()

    def _target_ip(self, ipv6: bool) -> str:
        if ipv6 and not self.ipv6:
            raise LabError(f"lab {self.prefix} was created without IPv6")
        return self.srv_ip6 if ipv6 else self.srv_ip4

    def ssh_argv(self, command: str, *, tty: bool = False, ipv6: bool = False,
                 extra_opts: Sequence[str] = ()) -> list[str]:
        """Full argv (run from the root namespace) of an ``ssh root@srv command`` from cli_ns.

        ``command`` is the remote command line, interpreted by root's shell on the server.
        """
        return self._client.argv(self._target_ip(ipv6), command, port=self.ssh_port, tty=tty,
                                 extra_opts=extra_opts)

    def ssh(self, command: str, *, timeout: float = 30, input: str | None = None,
            ipv6: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``command`` over ssh and wait; never raises on a non-zero exit (255: ssh failed).

        Raises :class:`LabTimeout` if it does not finish within ``timeout`` (ssh is killed).
        """
        return self._client.run(self._target_ip(ipv6), command, port=self.ssh_port,
                                timeout=timeout, input=input)

    def ssh_popen(self, command: str, *, tty: bool = True, ipv6: bool = False,
                  **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        """Start an ssh session running ``command`` (with a pty by default) without waiting.

        The session is tracked: :meth:`close` kills it if it still runs. Killing the returned
        process is how a person's session dies.
        """
        proc = self._children.start(self.ssh_argv(command, tty=tty, ipv6=ipv6), popen_kwargs)
        return cast("subprocess.Popen[bytes]", proc)

    def new_connection_ok(self, *, port: int | None = None, ipv6: bool = False,
                          timeout: float = 1.0) -> bool:
        """True if a NEW TCP connection from cli_ns gets the ``SSH-`` banner within ``timeout``
        (a fresh interpreter each time: a new source port, a new conntrack entry). ``port``
        defaults to the sshd port."""
        port = self.ssh_port if port is None else port
        return self._client.banner_ok(self._target_ip(ipv6), port, timeout)

    def new_login_ok(self, *, ipv6: bool = False, timeout: float = 5.0) -> bool:
        """True if a full, new ssh login running ``true`` succeeds within ``timeout``."""
        return self._client.login_ok(self._target_ip(ipv6), self.ssh_port, timeout)

    def wait_new_login(self, *, deadline_s: float, ipv6: bool = False) -> float | None:
        """Poll until a new connection and a new login succeed; seconds waited, or None."""
        return self._client.wait_login(self._target_ip(ipv6), self.ssh_port, deadline_s)

    # ------------------------------------------------------------------ building and teardown

    def _build(self) -> None:
        """The steps of :func:`create_lab` after the Lab object exists."""
        LabNetwork(self.prefix, self.index, self.ipv6).build(self._namespaces)
        ssh_keygen(self.host_key, f"fwsafe-lab-{self.prefix}-host")
        ssh_keygen(self.key, f"fwsafe-lab-{self.prefix}-client")
        auth = self.workdir / "authorized_keys"
        auth.write_text(pub_path(self.key).read_text())
        auth.chmod(0o600)
        self._sshd.write_known_hosts()
        if self._files is not None:
            self._files.prepare()
            self._files.mount(self._namespaces.exec_argv(self.srv_ns, []))

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
        errors = self._children.stop_all()
        steps = [("stopping sshd", self._sshd.stop), ("removing namespaces", self._namespaces.close),
                 ("removing the sandboxes of dead proofs", _remove_dead_proofs)]
        if self._files is not None:
            steps.insert(1, ("stopping mount holder", self._files.holder.stop))
        errors += teardown(steps)
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


def _remove_dead_proofs() -> None:
    """A guard of this lab killed while it proved a revert leaves its proof's sandbox
    (``fwpr<pid>s/c``, global like every named namespace): removed once its owner is gone."""
    # the lockout check's sandbox and analysis are heavy to import: loaded only when used (only to
    # clear a dead sandbox)
    from fwsafe.check.netns import remove_orphans
    from fwsafe.check.sandbox import PROOF_PREFIX

    left = remove_orphans(PROOF_PREFIX)
    if left:
        raise LabError(f"could not remove {', '.join(left)}")


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
    net = LabNetwork(prefix, index, ipv6)  # checks prefix and index
    lock_fd = acquire_prefix_lock(prefix)
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
        srv_ns=net.srv_ns,
        cli_ns=net.cli_ns,
        srv_ip4=net.ip4(1),
        cli_ip4=net.ip4(2),
        srv_ip6=net.ip6(1),
        cli_ip6=net.ip6(2),
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
        lab._build()
    except BaseException as exc:
        try:
            lab.close()
        except LabError as cleanup_exc:
            raise LabError(f"{exc}\n(and cleanup failed: {cleanup_exc})") from exc
        raise
    return lab
