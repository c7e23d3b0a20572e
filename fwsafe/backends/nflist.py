"""The names of the nftables tables of this network namespace, straight from the kernel.

``nft list tables`` builds nft's whole cache first: with 50,000 iptables-nft rules that takes
0.6 s, just to learn that there is no native table. One netlink dump (NFT_MSG_GETTABLE) gives
the names in a millisecond. Read only; stdlib only. None when the kernel cannot be asked this
way (no netlink socket, an unexpected answer): the caller falls back to ``nft``. Also the
nf_tables generation (`generation`, `ruleset_stamp`) and a digest of each table of a family
(`digests`, for the fidelity test: see its section below).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator

__all__ = ["FAMILIES", "UNSURE", "DigestError", "digest_main", "digests", "generation",
           "kernel_tables", "ruleset_stamp", "table_handles"]

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
_NFTA_TABLE_HANDLE = 4
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


def _request(message: int, flags: int, family: int = 0) -> tuple[socket.socket, int]:
    seq = os.getpid() & 0xFFFF
    payload = _NFGEN.pack(family, 0, 0)
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


def _dump_once() -> list[tuple[str, str, int | None]] | None:
    sock, seq = _request(_NFT_MSG_GETTABLE, _NLM_F_DUMP)
    tables: list[tuple[str, str, int | None]] = []
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
                attrs = _attrs(body[_NFGEN.size:])
                name, handle = attrs.get(_NFTA_TABLE_NAME), attrs.get(_NFTA_TABLE_HANDLE)
                if family is None or name is None:
                    return None                  # a family or answer this code does not know
                tables.append((family, name.rstrip(b"\0").decode(errors="replace"),
                               struct.unpack(">Q", handle[:8])[0]
                               if handle is not None and len(handle) >= 8 else None))


def kernel_tables() -> list[tuple[str, str]] | None:
    """[(family, name)] of every nftables table, in the kernel's order; None if netlink could
    not answer (then ask ``nft``)."""
    found = _dump_tables()
    return None if found is None else [(family, name) for family, name, _handle in found]


def table_handles() -> dict[str, int | None] | None:
    """{"family name": its handle} of every nftables table (a table deleted and made again,
    as firewalld does at every reload, gets a new handle); None if netlink could not answer."""
    found = _dump_tables()
    return None if found is None else {f"{family} {name}": handle
                                       for family, name, handle in found}


def _dump_tables() -> list[tuple[str, str, int | None]] | None:
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


# --------------------------------------------------------------------------------------------
# A digest of each table of a family as the kernel holds it (fwsafe.backends.fidelity)
# --------------------------------------------------------------------------------------------
# A digest of each nf_tables table of a family as the kernel holds it, from netlink dumps.
#
# The fidelity test (fwsafe.backends.fidelity) compares a table of the host with the same table
# after iptables-save's text of it went through iptables-restore in a scratch namespace. Listing
# both with ``nft -s list table`` takes seconds at 50,000 rules (nft renders every xt match); the
# kernel's own netlink description of the table's chains and rules, compared byte for byte, is a
# hundredth of that. Equal digests prove the round trip exact (the kernel holds the same thing);
# any difference, and every table holding what the digest does not cover (sets, stateful
# objects, flowtables), is decided by nft's listing as before: the digest can only spare work,
# never call a table lossy.
#
# Left out of the comparison, because they differ between two copies of the same rules: handles,
# rule positions and ids, and the values of counters (a rule's ``counter`` expression, a base
# chain's counters). Read only; stdlib only (it also runs as ``python3 -I -S`` in the scratch
# namespace: `main`).

UNSURE = ""   # a table the digest does not decide (nft's listing does)
_FAMILY_CODE = {"ip": 2, "ip6": 10, "inet": 1}
_GETTABLE, _GETCHAIN, _GETRULE, _GETSET, _GETOBJ, _GETFLOWTABLE = 1, 4, 7, 10, 19, 23
_NEW = {_GETTABLE: 0, _GETCHAIN: 3, _GETRULE: 6, _GETSET: 9, _GETOBJ: 18, _GETFLOWTABLE: 22}
_TABLE_NAME, _TABLE_USE, _TABLE_HANDLE = 1, 3, 4
_CHAIN_TABLE, _CHAIN_HANDLE, _CHAIN_NAME, _CHAIN_HOOK, _CHAIN_POLICY = 1, 2, 3, 4, 5
_CHAIN_USE, _CHAIN_COUNTERS, _CHAIN_ID = 6, 8, 11
_ACCEPT = struct.pack(">I", 1)
_RULE_TABLE, _RULE_CHAIN, _RULE_HANDLE, _RULE_EXPRESSIONS = 1, 2, 3, 4
_RULE_COMPAT, _RULE_USERDATA = 5, 7
_EXPR_NAME, _EXPR_DATA = 1, 2


class DigestError(Exception):
    """The kernel could not be asked (or the ruleset kept changing during the dump)."""


def _items(data: bytes) -> list[tuple[int, bytes]]:
    """Every attribute of `data` in order (type, payload), repeated types included."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found.append((kind & 0x3FFF, data[offset + _ATTR.size:offset + length]))
        offset += (length + 3) & ~3
    return found


def _dump(message: int, family: str) -> list[bytes]:
    """The attribute blocks of every object a dump of `message` gives for `family`."""
    sock, seq = _request(message, _NLM_F_DUMP, family=_FAMILY_CODE[family])
    bodies: list[bytes] = []
    with sock:
        while True:
            for mtype, flags, body in _messages(sock.recv(1 << 20), seq):
                if flags & _NLM_F_DUMP_INTR:
                    raise DigestError("the ruleset changed during the dump")
                if mtype == _NLMSG_DONE:
                    return bodies
                if mtype == _NLMSG_ERROR:
                    raise DigestError("the kernel refused the dump")
                if mtype == (_NFNL_SUBSYS_NFTABLES << 8) | _NEW[message] \
                        and len(body) >= _NFGEN.size:
                    bodies.append(body[_NFGEN.size:])


def _name(attrs: dict[int, bytes], kind: int) -> str:
    return attrs.get(kind, b"").rstrip(b"\0").decode(errors="replace")


_COUNTER_NAME = _ATTR.pack(12, _EXPR_NAME) + b"counter\0"


def _expressions(data: bytes) -> bytes:
    """A rule's expressions (NFTA_RULE_EXPRESSIONS) without each counter's values: the data
    attribute after every expression name "counter" cut out (found by its bytes, not parsed:
    the rest is compared as it is)."""
    parts: list[bytes] = []
    start = 0
    at = data.find(_COUNTER_NAME)
    while at >= 0:
        cut = at + len(_COUNTER_NAME)
        if cut + _ATTR.size <= len(data):
            length, kind = _ATTR.unpack_from(data, cut)
            if kind & 0x3FFF == _EXPR_DATA:
                parts.append(data[start:cut])
                start = cut + ((length + 3) & ~3)
        at = data.find(_COUNTER_NAME, cut)
    parts.append(data[start:])
    return b"".join(parts)


def digests(family: str) -> dict[str, str]:
    """{table: digest} for every table of nft family `family` ("ip", "ip6", "inet"); UNSURE for
    a table holding sets, stateful objects or flowtables. Chains are compared by name (the
    order the kernel lists them in is the order they were made), rules in order within each.
    Raises DigestError."""
    try:
        tables: dict[str, bytes] = {}
        for body in _dump(_GETTABLE, family):
            items = _items(body)
            tables[_name(dict(items), _TABLE_NAME)] = repr(sorted(
                (k, v) for k, v in items if k not in (_TABLE_USE, _TABLE_HANDLE))).encode()
        unsure: set[str] = set()
        for message in (_GETSET, _GETOBJ, _GETFLOWTABLE):
            unsure |= {_name(_attrs(body), 1) for body in _dump(message, family)}
        chains: dict[tuple[str, bytes], hashlib._Hash] = {}
        trivial: set[tuple[str, bytes]] = set()   # base chains, policy accept (no rules yet)
        for body in _dump(_GETCHAIN, family):
            items = _items(body)
            attrs = dict(items)
            key = (_name(attrs, _CHAIN_TABLE), attrs.get(_CHAIN_NAME, b""))
            chains[key] = hashlib.sha256(repr(sorted(
                (k, v) for k, v in items
                if k not in (_CHAIN_HANDLE, _CHAIN_USE, _CHAIN_COUNTERS, _CHAIN_ID))).encode())
            if _CHAIN_HOOK in attrs and attrs.get(_CHAIN_POLICY) == _ACCEPT:
                trivial.add(key)
        for body in _dump(_GETRULE, family):
            attrs = _attrs(body)
            key = (_name(attrs, _RULE_TABLE), attrs.get(_RULE_CHAIN, b""))
            chain = chains.get(key)
            if chain is None:   # a rule of a chain made during the dumps
                raise DigestError("the ruleset changed during the dumps")
            trivial.discard(key)
            chain.update(b"\2" + _expressions(attrs.get(_RULE_EXPRESSIONS, b"")) + b"\0"
                         + attrs.get(_RULE_COMPAT, b"") + b"\0" + attrs.get(_RULE_USERDATA, b""))
    except (OSError, ValueError, struct.error) as exc:
        raise DigestError(str(exc)) from exc
    out: dict[str, str] = {}
    for table, head in tables.items():
        whole = hashlib.sha256(head)
        for (owner, name), chain in sorted(chains.items()):
            # An empty base chain with an accept policy is left out, as fidelity.blocks does:
            # iptables-nft makes a built-in chain only once it is used, and iptables-save
            # declares every one.
            if owner == table and (owner, name) not in trivial:
                whole.update(name + b"\0" + chain.digest())
        out[table] = UNSURE if table in unsure else whole.hexdigest()
    return out


def digest_main() -> None:
    """In a scratch namespace: print `digests(argv[1])` as JSON (null when it cannot)."""
    try:
        print(json.dumps(digests(sys.argv[1])))
    except DigestError:
        print("null")
