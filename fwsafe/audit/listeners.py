"""Every listening socket of this network namespace, read from /proc, and who holds it.

``/proc/net/{tcp,tcp6,udp,udp6}`` list the sockets of the namespace of the process that reads
them: TCP sockets in state LISTEN, and UDP sockets that are not connected to a peer (state
CLOSE with no remote address: those receive datagrams from anyone). The process holding each
one is found through the socket inodes of ``/proc/PID/fd/*``; a socket that no process holds
(WireGuard's, the kernel NFS server's) is the kernel's.

Whether an IPv6 wildcard socket (``[::]``) also takes IPv4 (IPV6_V6ONLY off, the usual
default) is not in /proc: it is asked of the kernel's socket diagnostics (sock_diag, what
``ss`` shows as ``v6only``); where those are not available, such a socket is taken as
dual-stack unless an IPv4 socket holds the same port (they could not coexist otherwise).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Listener",
    "SocketLine",
    "bound_devices",
    "decode_address",
    "group_listeners",
    "parse_proc_net",
    "parse_sock_diag",
    "read_listeners",
    "socket_owners",
    "v6only_flags",
]

PROC = Path("/proc")
TABLES = (("tcp", 4, "tcp"), ("tcp", 6, "tcp6"), ("udp", 4, "udp"), ("udp", 6, "udp6"))
TCP_LISTEN = 0x0A
UDP_UNCONNECTED = 0x07   # TCP_CLOSE: a UDP socket with no peer


@dataclass(frozen=True)
class SocketLine:
    """One listening socket as /proc/net/* lists it."""

    proto: str          # "tcp" or "udp"
    family: int         # 4 or 6 (the socket's own family)
    address: str
    port: int
    inode: int


@dataclass
class Listener:
    """A listening service: the sockets of one protocol, family, address and port (several
    with SO_REUSEPORT), the first process holding them, and whether an IPv6 wildcard one takes
    IPv4 too (`v6only`: None when it could not be asked)."""

    proto: str
    family: int
    address: str
    port: int
    inodes: list[int] = field(default_factory=list)
    process: str | None = None
    pid: int | None = None
    v6only: bool | None = None
    device: str | None = None    # SO_BINDTODEVICE: only packets arriving on it reach it

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.address)

    @property
    def wildcard(self) -> bool:
        return self.ip.is_unspecified

    @property
    def mapped(self) -> str | None:
        """The IPv4 address of an IPv6 socket bound to an IPv4-mapped one (::ffff:a.b.c.d)."""
        ip = self.ip
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return None

    @property
    def loopback(self) -> bool:
        """Bound to a loopback address: only this host reaches it."""
        mapped = self.mapped
        return ipaddress.ip_address(mapped).is_loopback if mapped else self.ip.is_loopback

    @property
    def families(self) -> list[int]:
        """The families of the packets it takes (an IPv6 wildcard socket: both, unless
        v6only)."""
        if self.family == 4 or self.mapped:
            return [4]
        if self.wildcard and self.v6only is not True:
            return [4, 6]
        return [6]

    @property
    def label(self) -> str:
        return f"{self.port}/{self.proto}"

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if self.family == 6 else \
            f"{self.address}:{self.port}"

    @property
    def owner(self) -> str:
        """"sshd (812)", or the process alone where no PID is known."""
        if self.pid is None:
            return self.process or "?"
        return f"{self.process} ({self.pid})"

    @property
    def held_by(self) -> str:
        """"sshd, PID 812" (for sentences)."""
        if self.pid is None:
            return self.process or "process unknown"
        return f"{self.process}, PID {self.pid}"

    def key(self) -> tuple[str, int, str, int]:
        return (self.proto, self.family, self.address, self.port)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "proto": self.proto, "family": f"ipv{self.family}", "address": self.address,
            "port": self.port, "process": self.process, "pid": self.pid,
        }
        if self.family == 6 and self.wildcard:
            data["v6only"] = self.v6only
        if self.device:
            data["device"] = self.device
        return data


ByteOrder = Literal["little", "big"]


def decode_address(text: str, byteorder: ByteOrder = sys.byteorder) -> str:
    """An address as /proc/net/* prints it: the network-order bytes read as native 32-bit
    words, each printed in hex (so 127.0.0.1 is 0100007F on a little-endian machine)."""
    if len(text) not in (8, 32):
        raise ValueError(f"not a /proc/net address: {text!r}")
    raw = b"".join(int(text[i:i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(text), 8))
    return str(ipaddress.ip_address(raw))


def parse_proc_net(text: str, proto: str, family: int,
                   byteorder: ByteOrder = sys.byteorder) -> list[SocketLine]:
    """The listening sockets of one /proc/net table (tcp: LISTEN; udp: unconnected)."""
    found: list[SocketLine] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1]:
            continue
        try:
            local_hex, port_hex = fields[1].rsplit(":", 1)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            state = int(fields[3], 16)
            inode = int(fields[9])
            port = int(port_hex, 16)
            address = decode_address(local_hex, byteorder)
        except (ValueError, IndexError):
            continue
        if proto == "tcp" and state != TCP_LISTEN:
            continue
        if proto == "udp" and (state != UDP_UNCONNECTED or remote_port != 0 or port == 0):
            continue
        found.append(SocketLine(proto, family, address, port, inode))
    return found


def socket_owners(inodes: Iterable[int], proc: Path = PROC) -> dict[int, tuple[int, str]]:
    """inode -> (PID, command name) of the lowest PID holding each socket (those found)."""
    wanted = {i for i in inodes if i}
    owners: dict[int, tuple[int, str]] = {}
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        return owners
    for pid in pids:
        if len(owners) == len(wanted):
            break
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue   # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            try:
                inode = int(target[8:-1])
            except ValueError:
                continue
            if inode in wanted and inode not in owners:
                owners[inode] = (pid, _command_name(proc, pid))
    return owners


def _command_name(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


# --------------------------------------------------------------------------------------------
# IPV6_V6ONLY, from the kernel's socket diagnostics (NETLINK_SOCK_DIAG)
# --------------------------------------------------------------------------------------------
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_SKV6ONLY = 11
_DIAG_MSG_SIZE = 72          # struct inet_diag_msg
_INODE_OFFSET = 68
_IF_OFFSET = 40              # inet_diag_sockid.idiag_if: the bound device (0: none)


def v6only_flags(proto: str) -> dict[int, bool] | None:
    """inode -> IPV6_V6ONLY of every IPv6 `proto` socket of this namespace; None when the
    kernel does not answer (no sock_diag for it)."""
    return _dump(proto, socket.AF_INET6, {})


def bound_devices(proto: str) -> dict[int, int]:
    """inode -> the interface index a `proto` socket is bound to (SO_BINDTODEVICE: it takes
    only packets arriving there), for the sockets of both families bound to one."""
    devices: dict[int, int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        _dump(proto, family, devices)
    return devices


def _dump(proto: str, family: int, devices: dict[int, int]) -> dict[int, bool] | None:
    protocol = socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP
    states = 1 << TCP_LISTEN if proto == "tcp" else 0xFFFFFFFF
    request = struct.pack("=BBBxI", family, protocol, 0, states) + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                         _NLM_F_REQUEST_DUMP, 1, 0)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return None
    flags: dict[int, bool] = {}
    try:
        sock.settimeout(5)
        sock.sendto(header + request, (0, 0))
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return None
            done = parse_sock_diag(data, flags, devices)
            if done is None:
                return None
            if done:
                return flags
    except OSError:
        return None
    finally:
        sock.close()


def parse_sock_diag(data: bytes, flags: dict[int, bool],
                    devices: dict[int, int] | None = None) -> bool | None:
    """Add one netlink answer's sockets to `flags` (and the interface index of those bound
    to one to `devices`); True at the end of the dump, None on an error."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return None
        if kind == _NLMSG_DONE:
            return True
        if kind == _NLMSG_ERROR:
            return None
        body = data[offset + 16:offset + length]
        if len(body) >= _DIAG_MSG_SIZE:
            (inode,) = struct.unpack_from("=I", body, _INODE_OFFSET)
            (ifindex,) = struct.unpack_from("=I", body, _IF_OFFSET)
            if ifindex and devices is not None:
                devices[inode] = ifindex
            attr = _DIAG_MSG_SIZE
            while attr + 4 <= len(body):
                attr_len, attr_type = struct.unpack_from("=HH", body, attr)
                if attr_len < 4:
                    break
                if attr_type == _INET_DIAG_SKV6ONLY and attr_len >= 5:
                    flags[inode] = bool(body[attr + 4])
                attr += (attr_len + 3) & ~3
        offset += (length + 3) & ~3
    return False


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------
def group_listeners(lines: Iterable[SocketLine], owners: dict[int, tuple[int, str]],
                    v6only: dict[str, dict[int, bool] | None]) -> list[Listener]:
    """One Listener per protocol, family, address and port, sorted; `v6only` maps a protocol
    to what sock_diag said (None: it could not be asked)."""
    grouped: dict[tuple[str, int, str, int], Listener] = {}
    for item in lines:
        key = (item.proto, item.family, item.address, item.port)
        listener = grouped.setdefault(key, Listener(*key))
        listener.inodes.append(item.inode)
        owner = owners.get(item.inode)
        if owner and (listener.pid is None or owner[0] < listener.pid):
            listener.pid, listener.process = owner
    for listener in grouped.values():
        if listener.process is None and not any(listener.inodes):
            listener.process = "(kernel)"
        if listener.family == 6 and listener.wildcard:
            listener.v6only = _v6only(listener, v6only.get(listener.proto), grouped.values())
    return sorted(grouped.values(), key=lambda x: (x.proto, x.port, x.family, x.address))


def _v6only(listener: Listener, flags: dict[int, bool] | None,
            everyone: Iterable[Listener]) -> bool | None:
    if flags is not None:
        known = [flags[i] for i in listener.inodes if i in flags]
        if known:
            return all(known)
    if any(o.family == 4 and o.proto == listener.proto and o.port == listener.port
           for o in everyone):
        return True    # an IPv4 socket holds the port too: this one cannot take IPv4
    return None


def read_listeners(proc: Path = PROC) -> list[Listener]:
    """Every listening socket of this network namespace, with its owner."""
    lines: list[SocketLine] = []
    for proto, family, name in TABLES:
        try:
            text = (proc / "net" / name).read_text()
        except OSError:
            continue   # no IPv6 here
        lines += parse_proc_net(text, proto, family)
    owners = socket_owners((line.inode for line in lines), proc)
    v6 = {proto: v6only_flags(proto) for proto in ("tcp", "udp")
          if any(line.family == 6 and line.proto == proto for line in lines)}
    found = group_listeners(lines, owners, v6)
    devices = {i: d for proto in ("tcp", "udp") for i, d in bound_devices(proto).items()}
    for listener in found:
        index = next((devices[i] for i in listener.inodes if i in devices), None)
        if index is not None:
            try:
                listener.device = socket.if_indextoname(index)
            except OSError:
                listener.device = f"#{index}"
    return found
