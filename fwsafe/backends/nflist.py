"""The names of the nftables tables of this network namespace, straight from the kernel.

``nft list tables`` builds nft's whole cache first: with 50,000 iptables-nft rules that takes
0.6 s, just to learn that there is no native table. One netlink dump (NFT_MSG_GETTABLE) gives
the names in a millisecond. Read only; stdlib only. None when the kernel cannot be asked this
way (no netlink socket, an unexpected answer): the caller falls back to ``nft``.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

__all__ = ["FAMILIES", "generation", "kernel_tables", "ruleset_stamp"]

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_GETTABLE = 1
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETGEN = 16
_NFT_MSG_NEWGEN = 15
_NFTA_GEN_ID = 1
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLM_F_DUMP_INTR = 0x10
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NFTA_TABLE_NAME = 1
_HEADER = struct.Struct("=IHHII")    # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")       # nfgenmsg: family, version, res_id
_ATTR = struct.Struct("=HH")         # nlattr: len, type
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _ATTR.size:offset + length]
        offset += _align(length)
    return found


def _request(message: int, flags: int) -> tuple[socket.socket, int]:
    seq = os.getpid() & 0xFFFF
    payload = _NFGEN.pack(0, 0, 0)
    request = _HEADER.pack(_HEADER.size + len(payload), (_NFNL_SUBSYS_NFTABLES << 8) | message,
                           _NLM_F_REQUEST | flags, seq, 0) + payload
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        sock.send(request)
    except OSError:
        sock.close()
        raise
    return sock, seq


def _messages(data: bytes, seq: int) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, body) of each netlink message in `data` that answers request `seq`;
    ValueError for a malformed one."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, mtype, flags, mseq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            raise ValueError("malformed netlink message")
        body = data[offset + _HEADER.size:offset + length]
        offset += _align(length)
        if mseq == seq:
            yield mtype, flags, body


def generation() -> int | None:
    """The nf_tables ruleset generation of this network namespace: every committed change
    (nft, iptables-nft, anyone's) moves it on. None if it cannot be read."""
    try:
        sock, seq = _request(_NFT_MSG_GETGEN, 0)
        with sock:
            data = sock.recv(1 << 12)
        for mtype, _, body in _messages(data, seq):
            if mtype == (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWGEN \
                    and len(body) >= _NFGEN.size:
                value = _attrs(body[_NFGEN.size:]).get(_NFTA_GEN_ID)
                return struct.unpack(">I", value[:4])[0] if value and len(value) >= 4 else None
    except (OSError, ValueError, struct.error):
        return None
    return None


def _dump_once() -> list[tuple[str, str]] | None:
    sock, seq = _request(_NFT_MSG_GETTABLE, _NLM_F_DUMP)
    tables: list[tuple[str, str]] = []
    with sock:
        while True:
            for mtype, flags, body in _messages(sock.recv(1 << 16), seq):
                if flags & _NLM_F_DUMP_INTR:
                    return None                  # the ruleset changed meanwhile: ask again
                if mtype == _NLMSG_DONE:
                    return tables
                if mtype == _NLMSG_ERROR:
                    return None
                if mtype != (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWTABLE \
                        or len(body) < _NFGEN.size:
                    continue
                family = FAMILIES.get(_NFGEN.unpack_from(body)[0])
                name = _attrs(body[_NFGEN.size:]).get(_NFTA_TABLE_NAME)
                if family is None or name is None:
                    return None                  # a family or answer this code does not know
                tables.append((family, name.rstrip(b"\0").decode(errors="replace")))


def kernel_tables() -> list[tuple[str, str]] | None:
    """[(family, name)] of every nftables table, in the kernel's order; None if netlink could
    not answer (then ask ``nft``)."""
    for _ in range(3):
        try:
            found = _dump_once()
        except (OSError, ValueError, struct.error):
            return None
        if found is not None:
            return found
    return None


def ruleset_stamp() -> str | None:
    """This boot, this network namespace and its nf_tables generation, as one string: while it
    stays the same, nothing in nf_tables has changed. None if it cannot be read."""
    gen = generation()
    if gen is None:
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{boot}/{netns}/{gen}"
