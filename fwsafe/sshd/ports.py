"""Where sshd would listen, and whether another program holds that already.

sshd that cannot bind an address after a reload listens on fewer; one that can bind none exits,
and a reload cannot start it again. So a port taken by another program (on the same address, or
where either side is the wildcard) is refused before anything changes.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from fwsafe.sshd.daemon import TCP_LISTEN, Effective, listening

WILDCARDS = frozenset({"0.0.0.0", "::"})


def _address(text: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(text)
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(swapped)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def listeners(proc_net: str = "/proc/net") -> list[tuple[str, int, int]]:
    """(address, port, socket inode) of every listening TCP socket of this network namespace."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(proc_net, name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            address, _, port = fields[1].rpartition(":")
            try:
                found.append((_address(address), int(port, 16), int(fields[9])))
            except ValueError:
                continue
    return found


def listen_addresses(values: Effective) -> list[tuple[str, int]]:
    """(address, port) of the `listenaddress` lines of `sshd -T`."""
    out = []
    for item in values.get("listenaddress", []):
        words = item.split()
        host, _, port = (words[0] if words else "").rpartition(":")
        if port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def port_conflicts(values: Effective, daemon: int | None,
                   proc_net: str = "/proc/net") -> list[str]:
    """What would keep sshd (PID `daemon`) from listening where `values` say: another
    program's sockets."""
    own = set(listening(daemon)) if daemon is not None else set()
    conflicts = []
    for address, port, inode in listeners(proc_net):
        if inode in own:
            continue
        for wanted, wanted_port in listen_addresses(values):
            if port == wanted_port and _family(address) == _family(wanted) and (
                    address in WILDCARDS or wanted in WILDCARDS or address == wanted):
                text = (f"Port {port}: {address}:{port} is already in use by another program, "
                        "so sshd could not listen there")
                if text not in conflicts:
                    conflicts.append(text)
    return conflicts
