"""Who manages this host over SSH, and on which port: the defaults of `fwsafe check`.

Inside an SSH session: the client and the server port in ``$SSH_CONNECTION``. Outside one:
the clients of the established connections to sshd's port (read from /proc/net/tcp and
/proc/net/tcp6 of the current network namespace) and the ``Port``/``ListenAddress`` of
/etc/ssh/sshd_config (and the files it includes); port 22 when none is configured.
"""

from __future__ import annotations

import glob
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fwsafe.errors import UsageError
from fwsafe.sshd.sshd_config import parse_line

SSHD_CONFIG = "/etc/ssh/sshd_config"
PROC_NET = "/proc/net"
TCP_ESTABLISHED = "01"


@dataclass(frozen=True)
class Session:
    client: str
    client_port: int
    server: str
    server_port: int


def normalize_address(text: str) -> str:
    """A canonical IP address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4.

    Raises ValueError if `text` is not an address.
    """
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    address = ipaddress.ip_address(value.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def parse_ssh_connection(value: str | None) -> Session | None:
    """``$SSH_CONNECTION`` is "CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT"."""
    if not value:
        return None
    parts = value.split()
    if len(parts) != 4:
        return None
    try:
        return Session(normalize_address(parts[0]), int(parts[1]),
                       normalize_address(parts[2]), int(parts[3]))
    except ValueError:
        return None


def _hex_address(text: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(text)
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return normalize_address(str(ipaddress.ip_address(swapped)))


def parse_proc_net_tcp(text: str) -> list[Session]:
    """Established TCP connections listed in /proc/net/tcp or /proc/net/tcp6."""
    sessions = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
            continue
        try:
            local, local_port = fields[1].split(":")
            remote, remote_port = fields[2].split(":")
            sessions.append(Session(_hex_address(remote), int(remote_port, 16),
                                    _hex_address(local), int(local_port, 16)))
        except ValueError:
            continue
    return sessions


def _config_lines(path: str, depth: int = 0) -> list[tuple[str, str]]:
    """(keyword in lower case, value) of an sshd_config, following Include, up to Match."""
    if depth > 8:
        return []
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    out: list[tuple[str, str]] = []
    for raw in text.splitlines():
        parsed = parse_line(raw)
        if parsed is None:
            continue
        keyword, value = parsed[0].lower(), parsed[1]
        if keyword == "match":
            break  # Port and ListenAddress are not allowed in Match blocks
        if keyword == "include":
            for pattern in value.split():
                if not os.path.isabs(pattern):
                    pattern = os.path.join("/etc/ssh", pattern)
                for name in sorted(glob.glob(pattern)):
                    out.extend(_config_lines(name, depth + 1))
            continue
        out.append((keyword, value))
    return out


def _listen_port(value: str) -> int | None:
    """The port of a ``ListenAddress`` value (host, host:port, [v6]:port), None if none."""
    address = value.split()[0] if value.split() else ""
    if address.startswith("["):
        _, _, rest = address.partition("]")
        return int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if address.count(":") == 1:
        port = address.split(":", 1)[1]
        return int(port) if port.isdigit() else None
    return None


def sshd_ports(config: str = SSHD_CONFIG) -> list[int]:
    """The ports sshd listens on: those of its socket unit when systemd starts it from one
    (ssh.socket), else those of its configuration (default [22])."""
    # sshd's socket unit is read only when sshd's ports are asked (the check starts faster)
    from fwsafe.sshd.socketunit import detect

    sock = detect(config)
    if sock is not None and sock.ports():
        return sock.ports()
    return config_ports(config)


def config_ports(config: str = SSHD_CONFIG) -> list[int]:
    """The ports sshd listens on according to its configuration (default [22])."""
    ports: list[int] = []
    listen_ports: list[int] = []
    listen_plain = False
    for keyword, value in _config_lines(config):
        if keyword == "port":
            for word in value.split():
                if word.isdigit() and int(word) not in ports:
                    ports.append(int(word))
        elif keyword == "listenaddress":
            port = _listen_port(value)
            if port is None:
                listen_plain = True
            elif port not in listen_ports:
                listen_ports.append(port)
    base = ports or [22]
    if not listen_ports:
        return base
    result = list(listen_ports)
    if listen_plain:
        result += [p for p in base if p not in result]
    return result


def established_sessions(ports: list[int], proc_net: str = PROC_NET) -> list[Session]:
    """Established connections whose local port is one of `ports` (SSH sessions)."""
    sessions: list[Session] = []
    for name in ("tcp", "tcp6"):
        try:
            text = Path(proc_net, name).read_text()
        except OSError:
            continue
        sessions.extend(s for s in parse_proc_net_tcp(text) if s.server_port in ports)
    return sessions


def default_sessions(env: Mapping[str, str] | None = None, *, sshd_config: str = SSHD_CONFIG,
                     proc_net: str = PROC_NET, port: int | None = None
                     ) -> tuple[list[Session], int]:
    """The SSH sessions to protect and the management port.

    Inside an SSH session: that session alone. Otherwise: the established connections to
    sshd's port (the most used one when sshd listens on several; `port`: that one, given).
    """
    environ = os.environ if env is None else env
    own = parse_ssh_connection(environ.get("SSH_CONNECTION"))
    if own is not None:
        return [own], own.server_port
    ports = [port] if port is not None else sshd_ports(sshd_config)
    sessions = established_sessions(ports, proc_net)
    if not sessions:
        return [], ports[0]
    counts = {p: sum(1 for s in sessions if s.server_port == p) for p in ports}
    port = max(ports, key=lambda p: counts[p])
    seen: set[str] = set()
    chosen = []
    for session in sessions:
        if session.server_port == port and session.client not in seen:
            seen.add(session.client)
            chosen.append(session)
    return chosen, port


def default_clients_and_port(env: Mapping[str, str] | None = None, *,
                             sshd_config: str = SSHD_CONFIG,
                             proc_net: str = PROC_NET) -> tuple[list[str], int]:
    """(client addresses, management port) that `fwsafe check` protects by default.

    The client list is empty when no SSH client is known (not in an SSH session and no
    established connection to sshd's port).
    """
    sessions, port = default_sessions(env, sshd_config=sshd_config, proc_net=proc_net)
    return [s.client for s in sessions], port


def parse_clients(values: list[str]) -> list[str]:
    """``--client`` values (repeatable, comma-separated) as canonical addresses."""
    clients: list[str] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                address = normalize_address(part)
            except ValueError as exc:
                raise UsageError(f"--client {part.strip()!r} is not an IP address") from exc
            if address not in clients:
                clients.append(address)
    return clients
