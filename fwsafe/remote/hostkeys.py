"""SSH host keys for `fwsafe apply --host`: known_hosts checking as OpenSSH does it.

The workstation verifies the host's key against a known_hosts file (``~/.ssh/known_hosts`` or
``--known-hosts``) before it sends anything:

* a known host with the same key: go on;
* a known host with another key (of any type): refused, always (`ChangedHostKeyError`);
* a key listed under ``@revoked``: refused, always;
* an unknown host: refused (`UnknownHostKeyError`), unless ``accept_new`` is set; then the
  key is appended to the known_hosts file (hashed if the file already uses hashed names, like
  OpenSSH's ``HashKnownHosts``) and the connection goes on, like OpenSSH's
  ``StrictHostKeyChecking=accept-new``.

Host names are looked up as OpenSSH writes them: ``host`` for port 22, ``[host]:port``
otherwise; hashed (``|1|...``) entries match too (paramiko's `HostKeys`). Host name patterns
with wildcards (``*.example.com``) are not supported: such lines never match.

Both refusals subclass `fwsafe.errors.RejectedError` (exit 3): nothing has been changed.
paramiko is imported only inside the functions that need it.
"""

from __future__ import annotations

import binascii
import hmac
import os
import threading
from collections.abc import Callable
from typing import Any

from fwsafe.errors import RejectedError
from fwsafe.sshcompat import fingerprint

__all__ = [
    "DEFAULT_KNOWN_HOSTS",
    "ChangedHostKeyError",
    "HostKeyError",
    "KnownHosts",
    "RevokedHostKeyError",
    "UnknownHostKeyError",
    "describe_key",
    "host_key_name",
]

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


class HostKeyError(RejectedError):
    """The host key was not accepted; nothing was sent to the host."""


class UnknownHostKeyError(HostKeyError):
    """The host is not in known_hosts (and accept-new was not asked for)."""


class ChangedHostKeyError(HostKeyError):
    """known_hosts has another key for this host: possibly a man in the middle."""


class RevokedHostKeyError(HostKeyError):
    """The host presented a key that known_hosts marks ``@revoked``."""


def host_key_name(host: str, port: int) -> str:
    """The name OpenSSH files a host under: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def describe_key(key: Any) -> str:
    """``ssh-ed25519 SHA256:...`` for a paramiko key."""
    return f"{key.get_name()} {fingerprint(key)}"


class KnownHosts:
    """A known_hosts file, read once; `prepare()` sets a paramiko client up to apply it.

    `path` None means ``~/.ssh/known_hosts``. A missing file counts as empty (as for OpenSSH);
    with accept-new it is created (and its directory, mode 0700).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.expanduser(path if path else DEFAULT_KNOWN_HOSTS)
        self._plain: dict[str, dict[str, Any]] = {}    # name -> key type -> key (first wins)
        self._hashed: list[tuple[str, Any]] = []       # ("|1|salt|hash", key)
        self.revoked: list[Any] = []
        self.hashed = False
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        """Read the file line by line (paramiko's own loader stops at marker lines)."""
        # paramiko takes long to import: loaded only when an SSH connection is made
        from paramiko.hostkeys import HostKeyEntry

        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise HostKeyError(f"known_hosts {self.path} is a directory") from None
        except OSError as exc:
            raise HostKeyError(
                f"cannot read known_hosts {self.path}: {exc.strerror or exc}") from None
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if fields[0] == "@revoked":
                key = _parse_key(fields[2], fields[3]) if len(fields) >= 4 else None
                if key is not None:
                    self.revoked.append(key)
                continue
            if fields[0].startswith("@"):
                continue  # @cert-authority: host certificates are not supported
            try:
                entry = HostKeyEntry.from_line(" ".join(fields[:3]), lineno)
            except Exception:  # noqa: BLE001 - a bad line is skipped, as OpenSSH does
                continue
            if entry is None or entry.key is None:
                continue
            for name in entry.hostnames:
                self._remember(name, entry.key)

    def _remember(self, name: str, key: Any) -> None:
        if name.startswith("|1|"):
            self.hashed = True
            self._hashed.append((name, key))
        elif name and not name.startswith("!"):  # negated patterns are not supported
            self._plain.setdefault(name, {}).setdefault(key.get_name(), key)

    def known(self, host: str, port: int) -> dict[str, Any]:
        """The keys known for ``host:port``, by key type (empty if the host is unknown)."""
        # paramiko takes long to import: loaded only when an SSH connection is made
        import paramiko

        name = host_key_name(host, port)
        with self._lock:
            found = dict(self._plain.get(name, {}))
            for hashed, key in self._hashed:
                if key.get_name() in found:
                    continue
                try:
                    match = hmac.compare_digest(paramiko.HostKeys.hash_host(name, hashed), hashed)
                except (AssertionError, ValueError, binascii.Error):
                    continue  # a malformed hashed name
                if match:
                    found[key.get_name()] = key
            return found

    def is_revoked(self, key: Any) -> bool:
        return any(key == revoked for revoked in self.revoked)

    def record(self, host: str, port: int, key: Any) -> None:
        """Append ``key`` for ``host:port`` to the file (and remember it)."""
        name = host_key_name(host, port)
        # paramiko takes long to import: loaded only when an SSH connection is made
        import paramiko

        with self._lock:
            stored = paramiko.HostKeys.hash_host(name) if self.hashed else name
            line = f"{stored} {key.get_name()} {key.get_base64()}\n"
            directory = os.path.dirname(self.path) or "."
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="utf-8") as handle:
                    if handle.tell() > 0 and not _ends_with_newline(self.path):
                        handle.write("\n")
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise HostKeyError(
                    f"cannot record the host key of {name} in {self.path}: "
                    f"{exc.strerror or exc}") from None
            self._remember(name, key)

    def prepare(self, client: Any, host: str, port: int, *, accept_new: bool,
                on_accept: Callable[[str], None] | None = None) -> None:
        """Give a fresh paramiko `SSHClient` the known keys of ``host:port`` and our policy.

        paramiko then prefers the known key type in the key exchange, raises
        `BadHostKeyException` for another key (see `translate`) and calls the policy only for
        a host it knows nothing about.
        """
        store = client.get_host_keys()
        name = host_key_name(host, port)
        for key_type, key in self.known(host, port).items():
            if not self.is_revoked(key):  # a revoked key must never match
                store.add(name, key_type, key)
        client.set_missing_host_key_policy(
            _Policy(self, host, port, accept_new=accept_new, on_accept=on_accept))

    def unknown_error(self, host: str, port: int, key: Any) -> UnknownHostKeyError:
        name = host_key_name(host, port)
        return UnknownHostKeyError(
            f"host key of {name} is not in {self.path}: {describe_key(key)}; refused before "
            "anything was sent (nothing changed)",
            hint="check the fingerprint with the host's owner (ssh-keygen -lf "
                 "/etc/ssh/ssh_host_*_key.pub on the host), then add it to known_hosts "
                 "or run again with --accept-new-host-key",
        )

    def changed_error(self, host: str, port: int, got: Any,
                      expected: Any | None) -> ChangedHostKeyError:
        name = host_key_name(host, port)
        known = (describe_key(expected) if expected is not None
                 else ", ".join(sorted(self.known(host, port))) or "another key")
        return ChangedHostKeyError(
            f"HOST KEY CHANGED for {name}: it presented {describe_key(got)}, but {self.path} "
            f"has {known}; refused before anything was sent (nothing changed). Someone may be "
            "intercepting the connection, or the host was reinstalled",
            hint=f"if the change is expected, remove the old entry (ssh-keygen -R '{name}' "
                 f"-f {self.path}) and verify the new fingerprint; --accept-new-host-key "
                 "never replaces a changed key",
        )

    def translate(self, exc: BaseException, host: str, port: int) -> HostKeyError | None:
        """The typed error for a paramiko host key exception (None if it is none)."""
        # paramiko takes long to import: loaded only when an SSH connection is made
        import paramiko

        if isinstance(exc, HostKeyError):
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            if self.is_revoked(exc.key):
                return self.revoked_error(host, port, exc.key)
            return self.changed_error(host, port, exc.key, exc.expected_key)
        return None

    def revoked_error(self, host: str, port: int, key: Any) -> RevokedHostKeyError:
        return RevokedHostKeyError(
            f"host {host_key_name(host, port)} presented a REVOKED key ({describe_key(key)}, "
            f"marked @revoked in {self.path}); refused before anything was sent")


def _ends_with_newline(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except OSError:
        return True


def _parse_key(key_type: str, data: str) -> Any | None:
    # paramiko takes long to import: loaded only when an SSH connection is made
    from paramiko.hostkeys import HostKeyEntry

    try:  # the known_hosts parser of every paramiko version (PKey.from_type_string is 3.2+)
        entry = HostKeyEntry.from_line(f"revoked {key_type} {data}")
    except Exception:  # noqa: BLE001 - a bad key is skipped, as in _load
        return None
    return entry.key if entry is not None else None


class _Policy:
    """paramiko's missing-host-key hook: refuse, or record the key (accept-new).

    It is called only for a host without any known key; a host with other keys fails earlier
    in paramiko with `BadHostKeyException`. A revoked key is refused in both paths.
    """

    def __init__(self, known: KnownHosts, host: str, port: int, *, accept_new: bool,
                 on_accept: Callable[[str], None] | None) -> None:
        self.known = known
        self.host = host
        self.port = port
        self.accept_new = accept_new
        self.on_accept = on_accept

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        if self.known.is_revoked(key):
            raise self.known.revoked_error(self.host, self.port, key)
        if self.known.known(self.host, self.port):
            # Another key of ours was recorded meanwhile (another thread): never overwrite.
            raise self.known.changed_error(self.host, self.port, key, None)
        if not self.accept_new:
            raise self.known.unknown_error(self.host, self.port, key)
        self.known.record(self.host, self.port, key)
        if self.on_accept is not None:
            self.on_accept(
                f"accepted the new host key of {host_key_name(self.host, self.port)} "
                f"({describe_key(key)}) and recorded it in {self.known.path}")
