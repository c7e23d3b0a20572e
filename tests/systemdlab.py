"""A real-systemd lab: a Debian system container booted with systemd-nspawn (systemd as PID 1).

The guard's ``systemd-run`` mode, logind, the boot recovery unit and reboots while a change is
pending can only be tested under a real systemd; this machine has none, so each test boots a
throwaway system container (see /work/shared/notes/systemd-lab.md for the recipe):

* **Root fs** (:func:`cached_rootfs`): built once with mmdebstrap from the host's own apt
  sources, cached under /var/tmp keyed by a hash of the package list and the recipe, built
  under a lock (two test processes never build it at once), retried once, time-bounded. It is
  never changed after the build: every instance reads it as the lower layer of an overlay.
  Two generations: the host's suite (bookworm: Debian 12) from the host's sources, and trixie
  (Debian 13: Python 3.13, systemd 257, OpenSSH 10, socket-activatable sshd) from the host's
  Debian sources with the suite names replaced; each has its own cache entry.
  ``Image.build(extra=("firewalld",))`` boots a variant with more packages (its own cache entry,
  never swept by the others' builds; firewalld installed but not enabled: a test that needs it
  starts it), so that the others' root fs stays as it is.
* **fwsafe layer** (:class:`Image`, once per test session): a wheel of this repository, built on
  the host, installed inside into a venv at ``/opt/fwsafe`` (``--system-site-packages``: it uses
  Debian's python3-click and python3-paramiko) with ``pip install --no-index --no-deps``, and
  ``/usr/local/bin/fwsafe``. It is the upper directory of an overlay mounted in a private mount
  namespace while it is built, and a second lower layer of every instance afterwards.
* **Instance** (:class:`SystemdLab`): an overlayfs (upper and work in a temp dir) with its own
  machine-id, hostname, SSH host key and the test's client key for root; two network namespaces
  made here, the container's and the client's, joined by a veth pair created directly inside
  them (nothing in the root namespace); addresses set from outside before boot. systemd-nspawn
  runs in a cgroup of its own: ``fwsafe-sdlab/NAME`` in the cgroup v1 ``name=systemd``
  hierarchy and, on a hybrid host like this one, in the unified one too (nspawn takes its own
  cgroup from there: without it, it puts every container in ``/payload`` at the root). A
  supervisor thread boots it again when it asks for a reboot (nspawn exits 133, graceful or
  ``reboot -ff``), each time in a FRESH container network namespace (empty netfilter, same
  addresses) on the same disk.

The image has two stand-ins for what a Debian server has and the container lacks: a
``networking.service`` that only orders (pulls in network.target after network-pre.target, as
ifupdown does, so sshd starts after the firewall loaders), and in the tests that need it a
``netfilter-persistent.service`` that loads /etc/iptables/rules.v4/v6 at boot.

Use: the ``sdlab`` fixture (a booted :class:`SystemdLab`, SSH answering; torn down after the
test), parametrized over the two generations: a test that takes it runs once on bookworm and
once on trixie (``-k bookworm`` or ``-k trixie`` picks one); ``sdlab_generation_image`` is the
session-wide image of each generation in turn (for a test that starts its containers itself),
``sdlab_image`` / ``sdlab_trixie_image`` one generation's, ``sdlab_trixie`` a trixie container
alone (the socket-activated sshd tests); ``sdlab_bare_image`` is the root fs without the
fwsafe layer (no /opt/fwsafe), for tests that install fwsafe themselves (tests/lab/test_deb.py:
``SystemdLab.start(sdlab_bare_image)``, then ``dpkg -i``). ``exec(argv)`` runs in the container (nsenter),
``ssh(cmd)`` is a NEW login from the client namespace, ``ssh_popen(cmd)`` a session left open,
``wait_ssh(limit)``, ``reboot(hard)``, ``wait_booted()``, ``status()`` (fwsafe status --json),
``ruleset()``, ``close()``. Outside CI a missing capability skips; with CI=true it fails.

Everything an instance starts is tracked and stopped by PID in :meth:`SystemdLab.close` (the
container first by poweroff, then by SIGKILL to its init); its overlay is unmounted, its
namespaces, cgroups and temp dirs are removed, also when a test fails. An instance whose test
process died without close() (its lock in /run/fwsafe-sdlab is free, its PID gone) is cleaned
up by the next session. The firewall of the machine's own network namespace and the host's
/etc are never touched. External commands are run with argument lists only.

Environment: FWSAFE_SDLAB_CACHE (default /var/tmp/fwsafe-systemd-lab), FWSAFE_SDLAB_BUILD_TIMEOUT
(seconds per mmdebstrap attempt, default 600), FWSAFE_SDLAB_KEEP=1 keeps an instance's temp dir
(its overlay upper: the container's changed files) after close().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from fwsafe.check.netns import Namespaces, NetnsError, destroy_netns, run_command
from fwsafe.lab import (
    Children,
    LabError,
    banner_probe_argv,
    kill_until_gone,
    known_hosts_line,
    normalize_nft,
    normalize_save,
    remove_cgroup_tree,
    require_lab_capable,
    ssh_client_argv,
    ssh_keygen,
    stop_popen,
    tail,
)

__all__ = [
    "PACKAGES",
    "Image",
    "SystemdLab",
    "TRIXIE",
    "SystemdLabError",
    "cached_rootfs",
    "require_systemd_lab_capable",
    "sdlab",
    "sdlab_bare_image",
    "sdlab_generation_image",
    "sdlab_image",
    "sdlab_trixie",
    "sdlab_trixie_bare_image",
    "sdlab_trixie_image",
]

REPO = Path(__file__).resolve().parent.parent
"""The repository under test: the parent of tests/ (never a fixed path)."""

PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server", "iptables",
    "nftables", "ufw", "python3", "python3-venv", "python3-click", "python3-paramiko",
    "iproute2", "procps", "kmod", "sudo",
)  # fmt: skip
SUITE_PACKAGES: dict[str, tuple[str, ...]] = {"trixie": ("python3-pytest", "python3-hypothesis")}
"""More packages for one suite: trixie also runs the unit tests on its Python (3.13)."""
TRIXIE = "trixie"
"""The second generation (Debian 13): its root fs is built from the host's Debian mirror."""
RECIPE = "4"
"""Bump when the customization of the root fs changes (part of the cache key)."""

CACHE_DIR = Path(os.environ.get("FWSAFE_SDLAB_CACHE", "/var/tmp/fwsafe-systemd-lab"))
BUILD_TIMEOUT = float(os.environ.get("FWSAFE_SDLAB_BUILD_TIMEOUT", "600"))
"""Seconds one mmdebstrap attempt may take (download included); there are at most two."""
VENV = "/opt/fwsafe"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSPAWN_REBOOT = 133
NETNS_DIR = Path("/run/netns")
NSPAWN_RUN = Path("/run/systemd/nspawn")
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")

# Units that have no business in a test container: consoles and periodic jobs.
_MASK_ALWAYS = ("getty@.service", "serial-getty@.service", "console-getty.service",
                "container-getty@.service", "getty.target", "systemd-networkd-wait-online.service")

# What ifupdown's networking.service does on a Debian server, for ordering only (eth0 is
# configured from outside): it pulls in network.target and is ordered after network-pre.target,
# so that sshd (After=network.target) starts after the firewall loaders (Before=network-pre).
_NETWORKING_UNIT = """\
[Unit]
Description=fwsafe lab stand-in for ifupdown's networking.service (ordering only)
DefaultDependencies=no
Wants=network.target
After=local-fs.target network-pre.target systemd-sysctl.service systemd-modules-load.service
Before=network.target network-online.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true

[Install]
WantedBy=multi-user.target network-online.target
"""

_SSHD_DROPIN = """\
# fwsafe systemd lab: root logs in with the test's key only
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
ClientAliveInterval 2
ClientAliveCountMax 2
MaxStartups 100:30:200
"""


class SystemdLabError(Exception):
    """The systemd lab could not be built, used or torn down as asked."""


def _say(message: str) -> None:
    print(f"[systemdlab] {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
         timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an argument list (no shell); text output captured; failures raise SystemdLabError."""
    return run_command(argv, check=check, input=input, timeout=timeout, env=env,
                       error=SystemdLabError)


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace (deepest first)."""
    prefix = str(path.resolve()) if path.exists() else str(path)
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _unmount_below(path: Path) -> None:
    for point in mounts_below(path):
        _run(["umount", point], check=False, timeout=30)
    for point in mounts_below(path):  # still busy: detach it
        _run(["umount", "-l", point], check=False, timeout=30)
    left = mounts_below(path)
    if left:
        raise SystemdLabError(f"cannot unmount {left}")


def _safe_rmtree(path: Path) -> None:
    """Remove a directory tree of ours, never through a mount point left inside it."""
    if not path.exists():
        return
    _unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- capability


def require_systemd_lab_capable() -> str | None:
    """None if the systemd lab can run here; else the reason."""
    reason = require_lab_capable()
    if reason:
        return reason
    missing = [tool for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "ssh", "ssh-keygen",
                                 "unshare", "chroot", "mount", "umount") if not shutil.which(tool)]
    if missing:
        return ("missing tools: " + ", ".join(missing)
                + " (`bash scripts/setup.sh --test` installs systemd-container and mmdebstrap)")
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "overlay" not in filesystems.split():
        _run(["modprobe", "overlay"], check=False, timeout=30)
        if "overlay" not in Path("/proc/filesystems").read_text().split():
            return "the kernel has no overlayfs"
    if not _cgroup_roots():
        return "no cgroup hierarchy for systemd-nspawn (v1 name=systemd or v2) under /sys/fs/cgroup"
    return None


def _require_capable() -> None:
    """Follow tests/conftest.py's `require_capable()`: skip outside CI, fail in CI."""
    reason = require_systemd_lab_capable()
    if reason:
        if IN_CI:
            pytest.fail(f"the systemd lab must run in CI, but: {reason}")
        pytest.skip(f"systemd lab unavailable: {reason}")


# --------------------------------------------------------------------------- root fs (cached)


def _os_release() -> dict[str, str]:
    values: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip().strip('"')
    return values


def _host_sources() -> list[Path]:
    """The host's apt sources, as apt itself reads them."""
    found: list[Path] = []
    main = Path("/etc/apt/sources.list")
    if main.is_file() and any(ln.strip() and not ln.lstrip().startswith("#")
                              for ln in main.read_text(errors="replace").splitlines()):
        found.append(main)
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        found += sorted(p for p in parts.iterdir()
                        if p.is_file() and p.suffix in (".list", ".sources") and p.stat().st_size)
    return found


def packages(suite: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The packages of `suite`'s root fs (`extra`: a variant's, e.g. firewalld)."""
    return PACKAGES + SUITE_PACKAGES.get(suite, ()) + tuple(extra)


def host_suite() -> str:
    """The host's Debian suite (its apt sources name it): the first generation's."""
    return _os_release().get("VERSION_CODENAME", "bookworm")


def rootfs_key(suite: str | None = None, extra: Sequence[str] = ()) -> str:
    suite = suite or host_suite()
    text = json.dumps({"packages": sorted(packages(suite, extra)), "suite": suite,
                       "recipe": RECIPE})
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    if extra:   # a variant (firewalld installed): a cache entry of its own, named so
        return f"{suite}+{'+'.join(extra)}-{key}"
    # The host's suite keeps the name it always had (a cache made before suites were a
    # parameter is reused); another suite's name says which it is.
    return key if suite == host_suite() else f"{suite}-{key}"


def _suite_sources(suite: str, out_dir: Path) -> list[Path]:
    """The apt sources to build `suite` from. The host's suite: the host's own sources. Another
    suite: the host's Debian sources (deb.debian.org and the security archive, the files that
    name the host's suite) with the suite names replaced (bookworm -> trixie, bookworm-security
    -> trixie-security, bookworm-updates -> trixie-updates), written to `out_dir`. Third-party
    repositories of the host (cloud SDKs, node) are left out: they are not needed and may not
    exist for that suite."""
    sources = _host_sources()
    if suite == host_suite():
        return sources
    old = re.compile(rf"(?<![\w.-]){re.escape(host_suite())}(?=$|[\s/-])", re.MULTILINE)
    found: list[Path] = []
    for path in sources:
        text = path.read_text(errors="replace")
        if "debian.org" not in text or not old.search(text):
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{suite}-{path.name}"
        target.write_text(old.sub(suite, text))
        found.append(target)
    if not found:
        raise SystemdLabError(f"no Debian apt source of the host names {host_suite()!r}: "
                              f"cannot derive the sources of {suite!r}")
    return found


def _rootfs_suite(root: Path) -> str:
    """The suite a cached root fs was built from (before suites were recorded: the host's)."""
    try:
        info = json.loads((root / "etc/fwsafe-sdlab-rootfs").read_text())
    except (OSError, ValueError):
        return host_suite()
    return str(info.get("suite", host_suite())) if isinstance(info, dict) else host_suite()


def _rootfs_extra(root: Path) -> list[str]:
    """The extra packages of a cached root fs's variant ([] for the plain one)."""
    try:
        info = json.loads((root / "etc/fwsafe-sdlab-rootfs").read_text())
    except (OSError, ValueError):
        return []
    return list(info.get("extra", [])) if isinstance(info, dict) else []


def _customize_rootfs(root: Path, suite: str, extra: Sequence[str] = ()) -> None:
    """File-level changes to a freshly built root fs (nothing runs inside it)."""
    system = root / "etc/systemd/system"
    system.mkdir(parents=True, exist_ok=True)
    units = set(_MASK_ALWAYS)
    for unit_dir in (root / "usr/lib/systemd/system", root / "lib/systemd/system"):
        if unit_dir.is_dir() and not unit_dir.is_symlink():
            units.update(p.name for p in unit_dir.glob("*.timer"))
    for unit in sorted(units):
        link = system / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
        for wants in system.glob("*.wants"):
            with contextlib.suppress(FileNotFoundError):
                (wants / unit).unlink()
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every instance gets a key of its own
    dropin = root / "etc/ssh/sshd_config.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "fwsafe-lab.conf").write_text(_SSHD_DROPIN)
    # firewalld (in a variant) stays off unless a test starts it (its package enables it)
    for link in [*system.glob("*.wants/firewalld.service"),
                 system / "dbus-org.fedoraproject.FirewallD1.service"]:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    (system / "networking.service").write_text(_NETWORKING_UNIT)
    for target in ("multi-user.target", "network-online.target"):
        wants = system / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        (wants / "networking.service").symlink_to("/etc/systemd/system/networking.service")
    (root / "etc/machine-id").write_text("")  # written per instance
    (root / "etc/hostname").write_text("fwsafe-sdlab\n")
    for stale in ("var/lib/dbus/machine-id",):
        with contextlib.suppress(FileNotFoundError):
            (root / stale).unlink()
    # The container's PID 1 is told by nspawn that it runs in a container; nothing else needed.
    (root / "etc/fwsafe-sdlab-rootfs").write_text(
        json.dumps({"packages": list(packages(suite, extra)), "recipe": RECIPE, "suite": suite,
                    "extra": list(extra)}) + "\n")


def _build_once(target: Path, log: Path, timeout: float, suite: str,
                extra: Sequence[str] = ()) -> None:
    """One mmdebstrap run of `suite` into `target` (which must not exist) in a private mount
    and pid namespace, so that nothing it mounts or starts can outlive it, even when killed."""
    sources = [str(p) for p in _suite_sources(suite, target.with_name(target.name + ".sources"))]
    argv = [
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
        "--", "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
        "--include=" + ",".join(packages(suite, extra)),
        "--aptopt=Acquire::Check-Valid-Until \"false\"",
        "--aptopt=Acquire::Retries \"3\"",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        suite, str(target), *sources,
    ]  # fmt: skip
    with open(log, "ab") as out:
        out.write(f"\n=== {time.ctime()}: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env={
                                    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                    "LANG": "C.UTF-8", "HOME": "/root",
                                    "DEBIAN_FRONTEND": "noninteractive"})
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            stop_popen(proc, group=True)
            raise SystemdLabError(f"mmdebstrap took longer than {timeout:g} s") from exc
        except BaseException:
            stop_popen(proc, group=True)
            raise
    if code != 0:
        raise SystemdLabError(f"mmdebstrap failed (exit {code}); log {log}:\n{tail(log, 40)}")
    if not (target / "usr/lib/systemd/systemd").exists():
        raise SystemdLabError(f"mmdebstrap made no systemd in {target}; log {log}")


def cached_rootfs(timeout: float = BUILD_TIMEOUT, suite: str | None = None,
                  extra: Sequence[str] = ()) -> Path:
    """The root fs of `suite` (default: the host's) for this package list (and `extra`): built
    once (retried once), then reused."""
    suite = suite or host_suite()
    key = rootfs_key(suite, extra)
    final = CACHE_DIR / f"rootfs-{key}"
    if (final / "etc/fwsafe-sdlab-rootfs").exists():
        return final
    CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    lock_fd = os.open(CACHE_DIR / "build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        waited_until = time.monotonic() + 2 * timeout + 120
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                if time.monotonic() > waited_until:
                    raise SystemdLabError("another process holds the root fs build lock "
                                          f"{CACHE_DIR / 'build.lock'} for too long") from exc
                time.sleep(1)
        if (final / "etc/fwsafe-sdlab-rootfs").exists():  # built by another process meanwhile
            return final
        for stale in CACHE_DIR.glob(f"rootfs-{key}.*"):  # from a crashed or killed build
            _safe_rmtree(stale)
        _safe_rmtree(final)
        log = CACHE_DIR / f"build-{key}.log"
        errors = []
        for attempt in (1, 2):
            tmp = CACHE_DIR / f"rootfs-{key}.tmp{os.getpid()}"
            _safe_rmtree(tmp)
            _safe_rmtree(tmp.with_name(tmp.name + ".sources"))
            started = time.monotonic()
            _say(f"building the root fs {final} (attempt {attempt}; log {log}) ...")
            try:
                _build_once(tmp, log, timeout, suite, extra)
                _customize_rootfs(tmp, suite, extra)
            except (SystemdLabError, OSError) as exc:
                errors.append(f"attempt {attempt}: {exc}")
                _safe_rmtree(tmp)
                continue
            finally:
                _safe_rmtree(tmp.with_name(tmp.name + ".sources"))
            os.rename(tmp, final)
            _say(f"root fs built in {time.monotonic() - started:.1f} s")
            _sweep_old_rootfs(keep=final)
            return final
        raise SystemdLabError("could not build the systemd lab's root fs:\n" + "\n".join(errors))
    finally:
        os.close(lock_fd)  # releases the lock


def _live_session_rootfs() -> set[str]:
    """The root fs that live test sessions (their lock is held) are using."""
    used: set[str] = set()
    for session in CACHE_DIR.glob("session-*"):
        try:
            fd = os.open(session / "lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: alive
            with contextlib.suppress(OSError):
                used.add((session / "rootfs").read_text().strip())
        finally:
            os.close(fd)
    return used


def _sweep_old_rootfs(keep: Path) -> None:
    """Remove root fs of the same suite but other package lists or recipes, unless something
    still uses them (a mounted overlay, or a live session). Called with the build lock held."""
    with open("/proc/self/mountinfo") as handle:
        mounts = handle.read()
    used = _live_session_rootfs()
    for old in CACHE_DIR.glob("rootfs-*"):
        if old == keep or not old.is_dir() or str(old) in mounts or str(old) in used:
            continue
        if _rootfs_suite(old) != _rootfs_suite(keep) or _rootfs_extra(old) != _rootfs_extra(keep):
            continue  # the other generation's, or another variant's
        _say(f"removing the outdated root fs {old}")
        _safe_rmtree(old)
        with contextlib.suppress(FileNotFoundError):
            (CACHE_DIR / f"build-{old.name.removeprefix('rootfs-')}.log").unlink()


# --------------------------------------------------------------------------- fwsafe wheel + layer


def build_wheel(repo: Path, out_dir: Path) -> Path:
    """A wheel of `repo` built here, without a build backend: the project is pure Python, and the
    host's setuptools may be too old to build wheels (65.x needs the `wheel` package) while a
    fresh CI machine may not reach an index. Metadata, packages and console scripts come from
    pyproject.toml, the files from the working tree."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    import base64
    import fnmatch
    import zipfile

    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    project = pyproject["project"]
    name, version = str(project["name"]), str(project["version"])
    dist = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    patterns = (pyproject.get("tool", {}).get("setuptools", {}).get("packages", {})
                .get("find", {}).get("include", [name]))
    top = sorted(p for p in repo.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
                 and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    if not top:
        raise SystemdLabError(f"no package matching {patterns} in {repo}")
    files: list[tuple[str, bytes]] = []
    for package in top:
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append((path.relative_to(repo).as_posix(), path.read_bytes()))
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
                f"Summary: {project.get('description', '')}"]
    if "requires-python" in project:
        metadata.append(f"Requires-Python: {project['requires-python']}")
    metadata += [f"Requires-Dist: {dep}" for dep in project.get("dependencies", [])]
    scripts = project.get("scripts", {})
    info = f"{dist}.dist-info"
    files += [
        (f"{info}/METADATA", ("\n".join(metadata) + "\n").encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: fwsafe-tests-systemdlab\n"
                          b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", ("[console_scripts]\n" + "".join(
            f"{k} = {v}\n" for k, v in scripts.items())).encode()),
        (f"{info}/top_level.txt", "".join(f"{p.name}\n" for p in top).encode()),
    ]
    record = []
    for arcname, data in files:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{arcname},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for arcname, data in files:
            archive.writestr(zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0)), data,
                             compress_type=zipfile.ZIP_DEFLATED)
    return wheel


# Fixed shell program; every path is a positional parameter. In a private mount namespace:
# mount the layer's overlay, create the venv and install the wheel inside it (chroot), link
# the command onto root's PATH. The mount vanishes with the namespace.
_LAYER_SCRIPT = """\
set -eu
lower=$1 upper=$2 work=$3 mnt=$4 wheel=$5 venv=$6
mount -t overlay fwsafe-sdlab-layer -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$mnt"
mkdir -p "$mnt/tmp/fwsafe-wheel"
cp "$wheel" "$mnt/tmp/fwsafe-wheel/"
run() { chroot "$mnt" env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"; }
run python3 -m venv --system-site-packages "$venv"
run "$venv/bin/pip" install --quiet --no-index --no-deps --disable-pip-version-check \
    "/tmp/fwsafe-wheel/$(basename "$wheel")"
rm -rf "$mnt/tmp/fwsafe-wheel"
ln -sf "$venv/bin/fwsafe" "$mnt/usr/local/bin/fwsafe"
run fwsafe --version
"""


class Image:
    """What every instance boots: the cached root fs plus this session's fwsafe layer, or the
    root fs alone (``with_fwsafe=False``: no /opt/fwsafe, for tests that install fwsafe
    themselves, such as the .deb's)."""

    def __init__(self, rootfs: Path, session_dir: Path, layer: Path | None, wheel: Path | None,
                 lock_fd: int) -> None:
        self.rootfs = rootfs
        self.session_dir = session_dir
        self.layer = layer
        self.wheel = wheel
        self.suite = _rootfs_suite(rootfs)
        self._lock_fd: int | None = lock_fd

    @property
    def lowerdir(self) -> str:
        return f"{self.layer}:{self.rootfs}" if self.layer is not None else str(self.rootfs)

    @classmethod
    def build(cls, *, with_fwsafe: bool = True, suite: str | None = None,
              extra: Sequence[str] = ()) -> Image:
        rootfs = cached_rootfs(suite=suite, extra=extra)
        _sweep_stale_instances()
        _sweep_stale_sessions()
        session_dir = Path(tempfile.mkdtemp(prefix="session-", dir=CACHE_DIR))
        lock_fd = os.open(session_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            (session_dir / "rootfs").write_text(f"{rootfs}\n")
            if not with_fwsafe:
                return cls(rootfs, session_dir, None, None, lock_fd)
            started = time.monotonic()
            wheel = build_wheel(REPO, session_dir / "wheels")
            layer, work, mnt = (session_dir / n for n in ("layer", "layer-work", "layer-mnt"))
            for path in (layer, work, mnt):
                path.mkdir()
            result = _run(["unshare", "--mount", "--propagation", "private", "--",
                           "sh", "-c", _LAYER_SCRIPT, "fwsafe-sdlab-layer", str(rootfs),
                           str(layer), str(work), str(mnt), str(wheel), VENV], timeout=300)
            shutil.rmtree(work, ignore_errors=True)
            _say(f"fwsafe layer ({result.stdout.strip()}, {wheel.name}) built in "
                 f"{time.monotonic() - started:.1f} s")
            return cls(rootfs, session_dir, layer, wheel, lock_fd)
        except BaseException:
            os.close(lock_fd)
            _safe_rmtree(session_dir)
            raise

    def close(self) -> None:
        _safe_rmtree(self.session_dir)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _sweep_stale_sessions() -> None:
    """Remove session dirs of test processes that are gone (their lock is free) and that no
    mounted overlay still reads."""
    with open("/proc/self/mountinfo") as handle:
        mounts = handle.read()
    for stale in CACHE_DIR.glob("session-*"):
        if str(stale) in mounts:
            continue
        try:
            fd = os.open(stale / "lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # alive
        finally:
            if fd is not None:
                os.close(fd)
        _safe_rmtree(stale)


# --------------------------------------------------------------------------- cgroups


def _cgroup_roots() -> list[Path]:
    """The hierarchies an instance needs a cgroup of its own in: v1 name=systemd (its own, or
    two instances collide at its root) and, where present, the unified one (nspawn on a hybrid
    host picks its cgroup there)."""
    base = Path("/sys/fs/cgroup")
    roots = [base / "systemd", base / "unified"]
    if (base / "cgroup.controllers").exists():  # pure cgroup v2
        roots = [base]
    return [r for r in roots if (r / "cgroup.procs").exists()]


class _InstanceCgroups:
    """fwsafe-sdlab/NAME in each hierarchy; everything in them descends from our nspawn."""

    def __init__(self, name: str) -> None:
        self.paths = [root / "fwsafe-sdlab" / name for root in _cgroup_roots()]
        if not self.paths:
            raise SystemdLabError("no cgroup hierarchy to run systemd-nspawn in")
        self.remove()  # stale, from a crashed run of the same name
        for path in self.paths:
            path.mkdir(parents=True, exist_ok=True)

    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths:
            if not path.exists():
                continue
            for procs in path.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    found.update(int(x) for x in procs.read_text().split())
        return found

    def _cgroup_kill_then_pids(self) -> set[int]:
        for path in self.paths:
            kill = path / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
        return self.pids()

    def kill_all(self, limit: float = 10.0) -> None:
        """SIGKILL what is left inside (only descendants of our nspawn can be there)."""
        left = kill_until_gone(self._cgroup_kill_then_pids, timeout=limit)
        if left:
            raise SystemdLabError(f"processes survive in {self.paths}: {sorted(left)}")

    def remove(self) -> None:
        for path in self.paths:
            if not path.exists():
                continue
            self.kill_all()
            remove_cgroup_tree(path, while_busy=self.kill_all)


# Joins the cgroups given before "--", then execs the command after it (same PID).
_CGROUP_EXEC = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


# --------------------------------------------------------------------------- the instance


def _ns_pid_one(pid: int) -> bool:
    """True if `pid` is PID 1 of a pid namespace one level below ours."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                fields = line.split()[1:]
                return len(fields) == 2 and fields[1] == "1"
    except OSError:
        pass
    return False


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(x) for x in (task / "children").read_text().split()]
    return found


_COUNTER = iter(range(1, 10_000))
_LOCK_DIR = Path("/run/fwsafe-sdlab")


def _remove_nspawn_leftovers(name: str, lock: str) -> None:
    """What a killed nspawn leaves in /run/systemd/nspawn for machine `name`."""
    prop = NSPAWN_RUN / "propagate" / name
    if prop.is_dir() and not mounts_below(prop):
        shutil.rmtree(prop, ignore_errors=True)
    if lock and Path(lock).parent == NSPAWN_RUN / "locks":
        with contextlib.suppress(FileNotFoundError):
            Path(lock).unlink()


def _sweep_stale_instances() -> None:
    """Clean up after instances whose test process died without close() (killed by a CI
    timeout, say): their lock in /run/fwsafe-sdlab is free and their process is gone. What
    runs in their cgroups descends from the nspawn they started; it is killed, then their
    overlay is unmounted and their namespaces, cgroups and temp dir are removed."""
    if not _LOCK_DIR.is_dir():
        return
    for lock in _LOCK_DIR.glob("*.lock"):
        name = lock.name.removesuffix(".lock")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,12}", name):
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its process lives
        try:
            info = json.loads(lock.read_text() or "{}")
            owner = int(info.get("pid", 0))
            if owner and Path(f"/proc/{owner}").exists():
                continue  # lock free but the process is there: leave it alone
            _say(f"cleaning up instance {name}, left by dead process {owner}")
            _InstanceCgroups(name).remove()  # kills what is left of its container
            for ns in info.get("netns", []):
                if isinstance(ns, str) and ns.startswith(f"{name}-"):
                    destroy_netns(ns)
            workdir = Path(str(info.get("workdir", "")))
            if workdir.name.startswith(f"fwsafe-sdlab-{name}-"):
                _safe_rmtree(workdir)
            _remove_nspawn_leftovers(name, str(info.get("nspawn_lock", "")))
            lock.unlink()
        except (OSError, ValueError, SystemdLabError, LabError, NetnsError) as exc:
            _say(f"could not clean up instance {name}: {exc}")
        finally:
            os.close(fd)


class SystemdLab:
    """One booted system container with a client network namespace in front of it.

    Addresses: the container is ``ip4``/``ip6`` on its eth0, the client ``cli_ip4``/``cli_ip6``.
    ``boots`` counts the boots so far (1 after start); ``leader`` is the container's PID 1 as
    seen from the host (None between boots).
    """

    def __init__(self, image: Image, name: str | None = None) -> None:
        index = next(_COUNTER)
        self.image = image
        self.name = name or f"sd{os.getpid() % 100000}x{index}"
        if not re.fullmatch(r"[a-z][a-z0-9]{0,12}", self.name):
            raise SystemdLabError(f"invalid instance name {self.name!r}")
        net = index % 250 + 1
        self.ip4, self.cli_ip4 = f"10.232.{net}.1", f"10.232.{net}.2"
        self.ip6, self.cli_ip6 = f"fd00:232:{net}::1", f"fd00:232:{net}::2"
        self.ns = f"{self.name}-c"
        self.cli_ns = f"{self.name}-k"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fwsafe-sdlab-{self.name}-"))
        self.root = self.workdir / "root"
        self.key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.console_log = self.workdir / "console.log"
        self.boots = 0
        self.leader: int | None = None
        self.exit_codes: list[int] = []
        self.boot_started: list[float] = []   # monotonic, per boot: nspawn started
        self.boot_leader: list[float] = []    # monotonic, per boot: PID 1 seen
        self.prepare_s = 0.0  # start(): overlay, keys, namespaces, cgroups
        self.boot_s = 0.0     # start(): nspawn started -> SSH answers
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._finished = False
        self._error: BaseException | None = None
        self._children = Children()
        self._net = Namespaces()
        self._mounted = False
        self._closed = False
        self._cgroups: _InstanceCgroups | None = None
        _LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        self._lock_fd: int | None = os.open(_LOCK_DIR / f"{self.name}.lock",
                                            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise SystemdLabError(f"instance {self.name} is in use by a live process") from exc
        self._nspawn_lock: Path | None = None
        self._record_owner()

    def _record_owner(self) -> None:
        """What a later run needs to clean up after us if this process dies without close()."""
        assert self._lock_fd is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, json.dumps({
            "pid": os.getpid(), "workdir": str(self.workdir), "netns": [self.ns, self.cli_ns],
            "nspawn_lock": str(self._nspawn_lock or "")}).encode(), 0)

    # ------------------------------------------------------------------ building

    @classmethod
    def start(cls, image: Image, boot_limit: float = 60.0) -> SystemdLab:
        """Build the instance and boot it; return once SSH answers. Cleans up on failure."""
        lab = cls(image)
        try:
            started = time.monotonic()
            lab._prepare()
            booting = time.monotonic()
            lab._start_supervisor()
            lab.wait_boot(1, boot_limit)
            lab.wait_ssh(boot_limit)
            lab.prepare_s = booting - started
            lab.boot_s = time.monotonic() - booting
        except BaseException as exc:
            console = tail(lab.console_log, 30)
            try:
                lab.close()
            except SystemdLabError as cleanup:
                raise SystemdLabError(f"{exc}\n(and cleanup failed: {cleanup})") from exc
            if isinstance(exc, (SystemdLabError, LabError, NetnsError)):
                raise SystemdLabError(f"{exc}\nconsole:\n{console}") from exc
            raise
        return lab

    def _prepare(self) -> None:
        for ns in (self.ns, self.cli_ns):  # stale, from a crashed run of the same name
            destroy_netns(ns)
        prop = NSPAWN_RUN / "propagate" / self.name
        for sub in ("upper", "work", "root"):
            (self.workdir / sub).mkdir()
        _run(["mount", "-t", "overlay", f"fwsafe-sdlab-{self.name}", "-o",
              f"lowerdir={self.image.lowerdir},upperdir={self.workdir / 'upper'},"
              f"workdir={self.workdir / 'work'}", str(self.root)])
        self._mounted = True
        if prop.is_dir() and not mounts_below(prop):
            shutil.rmtree(prop, ignore_errors=True)
        # nspawn's lock on the directory; it removes it itself unless it is killed.
        root_stat = os.stat(self.root)
        self._nspawn_lock = NSPAWN_RUN / "locks" / f"inode-{root_stat.st_dev}:{root_stat.st_ino}"
        self._record_owner()
        # Identity: machine-id, hostname, SSH host key, root's authorized key.
        (self.root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
        (self.root / "etc/hostname").write_text(self.name + "\n")
        hosts = self.root / "etc/hosts"
        hosts.write_text(hosts.read_text() + f"{self.ip4}\t{self.name}\n")
        host_key = self.workdir / "ssh_host_ed25519_key"
        for path, comment in ((host_key, f"{self.name}-host"), (self.key, f"{self.name}-client")):
            ssh_keygen(path, comment)
        for suffix, mode in (("", 0o600), (".pub", 0o644)):
            target = self.root / f"etc/ssh/ssh_host_ed25519_key{suffix}"
            shutil.copyfile(f"{host_key}{suffix}", target)
            target.chmod(mode)
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        self.known_hosts.write_text(known_hosts_line([self.ip4, self.ip6], host_key))
        # Network: the client namespace lives as long as the instance, the container's is new
        # at every boot.
        self._net.create(self.cli_ns)
        self._cgroups = _InstanceCgroups(self.name)

    def _fresh_netns(self) -> None:
        """A new, empty container namespace (as after a real reboot), wired as before."""
        with contextlib.suppress(SystemdLabError):  # the old pair goes with either end
            _run(["ip", "-n", self.cli_ns, "link", "del", "eth0"], check=False, timeout=15)
        self._net.destroy(self.ns)
        self._net.create(self.ns)
        self._net.pair(self.ns, self.cli_ns, [f"{self.ip4}/24", f"{self.ip6}/64"],
                       [f"{self.cli_ip4}/24", f"{self.cli_ip6}/64"])

    def _nspawn_argv(self) -> list[str]:
        assert self._cgroups is not None
        return [
            "sh", "-c", _CGROUP_EXEC, "fwsafe-sdlab-cgroup", *self._cgroups.procs_files(), "--",
            "systemd-nspawn", "--quiet", "--boot", f"--directory={self.root}",
            f"--machine={self.name}", f"--network-namespace-path={NETNS_DIR / self.ns}",
            "--register=no", "--keep-unit", "--capability=CAP_NET_ADMIN",
            "--console=read-only", "--link-journal=no", "--resolv-conf=off", "--timezone=off",
        ]  # fmt: skip

    # ------------------------------------------------------------------ the supervisor

    def _start_supervisor(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name=f"sdlab-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        try:
            while True:
                self._fresh_netns()
                with self._cond:
                    if self._stopping:
                        break
                    with open(self.console_log, "ab") as log:
                        log.write(f"\n===== boot {self.boots + 1} ({time.ctime()}) =====\n".encode())
                        log.flush()
                        self._proc = subprocess.Popen(
                            self._nspawn_argv(), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={
                                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"})
                    self.boot_started.append(time.monotonic())
                proc = self._proc
                leader = self._find_leader(proc, limit=30)
                with self._cond:
                    self.leader = leader
                    if leader is not None:
                        self.boots += 1
                        self.boot_leader.append(time.monotonic())
                        if self._stopping:  # close() came while it was starting
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(leader, signal.SIGRTMIN + 4)
                    self._cond.notify_all()
                code = proc.wait()
                with self._cond:
                    self.leader = None
                    self.exit_codes.append(code)
                    self._cond.notify_all()
                    if leader is None:
                        raise SystemdLabError(f"the container never started (nspawn exit {code})")
                    if code != NSPAWN_REBOOT or self._stopping:
                        break
        except BaseException as exc:  # reported to whoever waits
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    @staticmethod
    def _find_leader(proc: subprocess.Popen[bytes], limit: float) -> int | None:
        """The container's PID 1: the child of nspawn that is PID 1 in a new pid namespace."""
        end = time.monotonic() + limit
        while time.monotonic() < end and proc.poll() is None:
            for child in _children(proc.pid):
                if _ns_pid_one(child):
                    return child
            time.sleep(0.01)
        return None

    @property
    def nspawn_pid(self) -> int | None:
        """The PID of the current (or last) systemd-nspawn."""
        return self._proc.pid if self._proc is not None else None

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise SystemdLabError(f"the supervisor failed: {self._error!r}") from self._error
        if self._finished:
            raise SystemdLabError(f"the container is down (nspawn exit codes {self.exit_codes})")

    def wait_boot(self, boot: int, limit: float = 60.0) -> float:
        """Wait until boot number `boot` has a PID 1; seconds waited."""
        started = time.monotonic()
        end = started + limit
        with self._cond:
            while not (self.boots >= boot and self.leader is not None):
                self._raise_if_dead()
                left = end - time.monotonic()
                if left <= 0:
                    raise SystemdLabError(f"boot {boot} did not start within {limit:g} s "
                                          f"(boots {self.boots}, exits {self.exit_codes})")
                self._cond.wait(min(left, 0.5))
        return time.monotonic() - started

    # ------------------------------------------------------------------ using it

    def _leader(self) -> int:
        with self._cond:
            self._raise_if_dead()
            if self.leader is None:
                raise SystemdLabError("the container is between boots")
            return self.leader

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self._leader()), "-a", "--", "env", "-i",
                f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "HOME=/root", *map(str, argv)]

    def exec(self, argv: Sequence[str], *, check: bool = True, input: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the container (all its namespaces, as root), not over SSH."""
        return _run(self.exec_argv(argv), check=check, input=input, timeout=timeout)

    def _trust_port(self, port: int) -> None:
        """known_hosts trusts the container's host key on `port` too (`[ip]:port`)."""
        if port == 22:
            return
        names = [f"[{self.ip4}]:{port}", f"[{self.ip6}]:{port}"]
        line = known_hosts_line([self.ip4, self.ip6], self.workdir / "ssh_host_ed25519_key")
        known = self.known_hosts.read_text()
        if names[0] not in known:
            key = line.split(" ", 1)[1]
            self.known_hosts.write_text(known + f"{','.join(names)} {key}")

    def ssh_argv(self, command: str, *, tty: bool = False, ipv6: bool = False,
                 port: int = 22) -> list[str]:
        """An `ssh root@container command` (to `port`) run from the client namespace."""
        self._trust_port(port)
        return self._net.exec_argv(self.cli_ns, ssh_client_argv(
            self.key, self.known_hosts, self.ip6 if ipv6 else self.ip4, command, tty=tty,
            port=port,
            extra_opts=["-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]))

    def ssh(self, command: str, *, timeout: float = 60, input: str | None = None,
            check: bool = False, port: int = 22) -> subprocess.CompletedProcess[str]:
        """Run `command` over a NEW SSH login from the client; 255 means ssh itself failed."""
        return _run(self.ssh_argv(command, port=port), check=check, input=input, timeout=timeout)

    def ssh_popen(self, command: str, *, tty: bool = True, port: int = 22,
                  **kwargs: Any) -> subprocess.Popen[bytes]:
        """An SSH session left running (a pty by default); killing it ends the admin's session.
        Tracked: close() stops it."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = self._children.start(
            self.ssh_argv(command, tty=tty, port=port), kwargs)
        return proc

    def new_connection_ok(self, timeout: float = 1.0, ipv6: bool = False, port: int = 22) -> bool:
        """A NEW TCP connection from the client to `port` gets the SSH banner in time."""
        argv = self._net.exec_argv(self.cli_ns, banner_probe_argv(
            self.ip6 if ipv6 else self.ip4, port, timeout))
        try:
            return _run(argv, check=False, timeout=timeout + 10).returncode == 0
        except SystemdLabError:
            return False

    def wait_ssh(self, limit: float = 60.0, port: int = 22) -> float:
        """Wait for the first NEW connection (to `port`) that gets the SSH banner; seconds
        waited."""
        started = time.monotonic()
        end = started + limit
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise SystemdLabError(f"SSH did not answer within {limit:g} s; console:\n"
                                      f"{tail(self.console_log, 25)}")
            if self.new_connection_ok(timeout=min(1.0, max(left, 0.05)), port=port):
                return time.monotonic() - started
            with self._cond:
                if self._finished:
                    self._raise_if_dead()
            time.sleep(0.05)

    def reboot(self, hard: bool, limit: float = 60.0) -> float:
        """Reboot: graceful (`systemctl reboot`) or hard (`reboot -ff`: no shutdown at all).
        Returns once the next boot has a PID 1 (SSH is not waited for: see wait_ssh);
        the seconds from the request to that."""
        with self._cond:
            boot = self.boots
        started = time.monotonic()
        argv = ["reboot", "-ff"] if hard else ["systemctl", "reboot"]
        with contextlib.suppress(SystemdLabError):  # the caller dies with the container
            self.exec(argv, check=False, timeout=30)
        self.wait_boot(boot + 1, limit)
        return time.monotonic() - started

    def wait_booted(self, limit: float = 60.0) -> str:
        """Wait until the boot has finished (every start-up job done); the system state
        (`running`, or `degraded` when a unit failed)."""
        result = self.exec(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=limit)
        return result.stdout.strip()

    def boot_id(self) -> str:
        return self.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()

    def read(self, path: str) -> str:
        return self.exec(["cat", path]).stdout

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        """Write a file inside the container (parents created)."""
        self.exec(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                   "write", path, mode], input=text)

    def status(self) -> dict[str, Any]:
        """`fwsafe status --json` inside the container (not over SSH: works in a lockout)."""
        result = self.exec(["fwsafe", "status", "--json"], check=False)
        if result.returncode != 0:
            raise SystemdLabError(f"fwsafe status failed ({result.returncode}): {result.stderr}")
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def wait_state(self, states: set[str], limit: float) -> dict[str, Any]:
        end = time.monotonic() + limit
        while True:
            info = self.status()
            if info["state"] in states or time.monotonic() > end:
                return info
            time.sleep(0.1)

    def ruleset(self) -> str:
        """iptables-save, ip6tables-save and nft list ruleset, comparable across reloads:
        without comments and counters, nft tables (and the chains, sets, ... in each) sorted
        (their listing order is creation order, which iptables-restore on nf_tables changes)."""
        parts = [f"== {tool} ==\n" + normalize_save(self.exec([tool]).stdout)
                 for tool in ("iptables-save", "ip6tables-save")]
        parts.append("== nft ==\n" + normalize_nft(self.exec(["nft", "list", "ruleset"]).stdout))
        return "".join(parts)

    def journal(self, *args: str, lines: int = 60) -> str:
        result = self.exec(["journalctl", "--no-pager", "-n", str(lines), *args], check=False)
        return result.stdout + result.stderr

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Power the container off (SIGKILL to its PID 1 if that takes too long), stop what we
        started, unmount the overlay, delete namespaces, cgroups and the temp dir. Idempotent;
        raises after doing all it can if something could not be removed."""
        if self._closed:
            return
        errors: list[str] = []
        with self._cond:
            self._stopping = True
            leader = self.leader
        if leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGRTMIN + 4)  # systemd: poweroff
        if self._thread is not None:
            self._thread.join(timeout=20)
            if self._thread.is_alive():
                with self._cond:
                    leader = self.leader
                if leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)  # the whole pid namespace goes
                if self._proc is not None:
                    try:
                        stop_popen(self._proc, group=True)
                    except Exception as exc:  # noqa: BLE001 - keep tearing down
                        errors.append(f"nspawn {self._proc.pid}: {exc}")
                self._thread.join(timeout=20)
                if self._thread.is_alive():
                    errors.append("the supervisor thread does not end")
        errors += self._children.stop_all()
        if self._cgroups is not None:
            try:
                self._cgroups.remove()
            except Exception as exc:  # noqa: BLE001
                errors.append(str(exc))
        try:
            self._net.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
        try:
            _unmount_below(self.root)
            self._mounted = False
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
        _remove_nspawn_leftovers(self.name, str(self._nspawn_lock or ""))
        if not self._mounted and not os.environ.get("FWSAFE_SDLAB_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (_LOCK_DIR / f"{self.name}.lock").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        self._closed = True
        if errors:
            raise SystemdLabError(f"instance {self.name}: teardown incomplete: " + "; ".join(errors))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sdlab_image() -> Iterator[Image]:
    """The root fs (cached across runs) and this session's fwsafe layer."""
    yield from _session_image()


@pytest.fixture(scope="session")
def sdlab_bare_image() -> Iterator[Image]:
    """The root fs alone, without this session's fwsafe layer (no /opt/fwsafe venv, no
    /usr/local/bin/fwsafe): for tests that install fwsafe in the container themselves."""
    yield from _session_image(with_fwsafe=False)


def _session_image(*, with_fwsafe: bool = True, suite: str | None = None) -> Iterator[Image]:
    _require_capable()
    image = Image.build(with_fwsafe=with_fwsafe, suite=suite)
    try:
        yield image
    finally:
        image.close()


def side_by_side(image: Image, cases: Mapping[str, Callable[[SystemdLab], Any]],
                 prepare: Callable[[SystemdLab], None] = lambda _lab: None,
                 close: Callable[[SystemdLab], None] = SystemdLab.close,
                 ) -> Iterator[dict[str, Any]]:
    """Every case at the same time, each in a container of its own booted from `image` and
    prepared by `prepare`: yields {name: what the case returned, or what it raised} (see
    `case_outcome`), then closes the containers (with `close`) and the image. For a module
    fixture, so that the cases' waits overlap."""
    labs: dict[str, SystemdLab] = {}
    found: dict[str, Any] = {}

    def one(name: str) -> None:
        try:
            lab = SystemdLab.start(image)
            labs[name] = lab
            prepare(lab)
            found[name] = cases[name](lab)
        except BaseException as exc:  # noqa: BLE001 - reported by the case's test
            found[name] = exc

    threads = [threading.Thread(target=one, args=(name,)) for name in cases]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        yield found
    finally:
        for lab in labs.values():
            close(lab)
        image.close()


def case_outcome(outcomes: dict[str, Any], name: str) -> dict[str, Any]:
    """One case's result from `side_by_side`: what it raised is raised again here."""
    found = outcomes.get(name)
    if isinstance(found, BaseException):
        raise found
    assert isinstance(found, dict), f"case {name} did not run"
    return found


def _booted(image: Image) -> Iterator[SystemdLab]:
    lab = SystemdLab.start(image)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def sdlab_trixie_image() -> Iterator[Image]:
    """The second generation: a Debian 13 (trixie) root fs (cached like the first) and this
    session's fwsafe layer in it (a venv on trixie's Python 3.13 with its python3-click and
    python3-paramiko)."""
    yield from _session_image(suite=TRIXIE)


@pytest.fixture
def sdlab_trixie(sdlab_trixie_image: Image) -> Iterator[SystemdLab]:
    """A booted Debian 13 (trixie) system container answering SSH; torn down after the test."""
    yield from _booted(sdlab_trixie_image)


@pytest.fixture(scope="session")
def sdlab_trixie_bare_image() -> Iterator[Image]:
    """The trixie root fs alone, without this session's fwsafe layer (see sdlab_bare_image)."""
    yield from _session_image(with_fwsafe=False, suite=TRIXIE)


_GENERATION_IMAGES = {"bookworm": "sdlab_image", TRIXIE: "sdlab_trixie_image"}
GENERATIONS = tuple(sorted(_GENERATION_IMAGES))
"""The suites of the two generations (a parameter of a module fixture that builds its own image
variant, e.g. firewalld's: `Image.build(suite=..., extra=...)`)."""


@pytest.fixture(params=sorted(_GENERATION_IMAGES))
def sdlab_generation_image(request: pytest.FixtureRequest) -> Image:
    """The image of each generation in turn (a test using it runs once on bookworm, once on
    trixie; `-k trixie` or `-k bookworm` picks one)."""
    image: Image = request.getfixturevalue(_GENERATION_IMAGES[request.param])
    return image


@pytest.fixture
def sdlab(sdlab_generation_image: Image) -> Iterator[SystemdLab]:
    """A booted system container (systemd as PID 1) answering SSH, on each generation in turn
    (a test that takes it runs on bookworm and on trixie); torn down after the test."""
    yield from _booted(sdlab_generation_image)

