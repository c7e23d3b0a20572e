# ruff: noqa: E501  (the /proc/net lines below are real, and long)
"""`fwsafe audit` reads the listening sockets from /proc: real /proc/net lines (captured on
x86-64, little-endian, from a namespace with known listeners), the owners from a /proc tree
of fds, IPV6_V6ONLY from sock_diag answers or, without them, from the neighbours."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

import pytest

from fwsafe.audit.listeners import (
    Listener,
    SocketLine,
    decode_address,
    group_listeners,
    parse_proc_net,
    parse_sock_diag,
    read_listeners,
    socket_owners,
    v6only_flags,
)

# python3 in a fresh namespace: tcp 0.0.0.0:5678, 127.0.0.1:8081, 10.9.8.7:443, [::]:8082
# (dual-stack), [::]:8083 (v6only), [::1]:631, [fd00:1::5]:22; udp 0.0.0.0:9999,
# 127.0.0.53:53, [::]:5353; plus a connected UDP socket and an established TCP connection.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:162E 00000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 1648316 2 00000000ded5c4de 100 0 0 10 0
   1: 0708090A:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1648318 1 00000000b082e52f 100 0 0 10 0
   2: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1648317 1 0000000019a7e575 100 0 0 10 0
   3: 0100007F:DD42 0100007F:162E 01 00000000:00000000 00:00000000 00000000     0        0 1648327 2 00000000ebcba501 20 0 0 10 -1
   4: 0100007F:162E 0100007F:DD42 01 00000000:00000000 00:00000000 00000000     0        0 0 1 00000000c3635daa 20 0 0 10 -1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1648319 1 00000000c2a942f1 100 0 0 10 0
   1: 00000000000000000000000000000000:1F93 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1648320 1 000000003dfccefd 100 0 0 10 0
   2: 010000FD000000000000000005000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1648322 1 00000000183dabd3 100 0 0 10 0
   3: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1648321 1 0000000070cfe827 100 0 0 10 0
   4: 00000000000000000000000001000000:8D3F 00000000000000000000000001000000:AE7C 06 00000000:00000000 03:000001D7 00000000     0        0 0 3 0000000001df443b
"""
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 6280: 00000000:270F 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1648323 2 0000000009137907 0
10414: 0100007F:B735 0100007F:270F 01 00000000:00000000 00:00000000 00000000     0        0 1648326 2 00000000e6f801a7 0
12718: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1648324 2 000000008cd5cbd9 0
"""
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1634: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1648325 2 00000000968be90b 0
"""


def test_addresses_decode_as_the_kernel_prints_them() -> None:
    assert decode_address("0100007F", "little") == "127.0.0.1"
    assert decode_address("7F000001", "big") == "127.0.0.1"
    assert decode_address("0708090A", "little") == "10.9.8.7"
    assert decode_address("010000FD000000000000000005000000", "little") == "fd00:1::5"
    assert decode_address("00000000000000000000000001000000", "little") == "::1"
    mapped = decode_address("0000000000000000FFFF00000100007F", "little")
    assert ipaddress.ip_address(mapped) == ipaddress.ip_address("::ffff:127.0.0.1")
    with pytest.raises(ValueError):
        decode_address("0100", "little")


def test_tcp_listeners_only_in_state_listen() -> None:
    found = parse_proc_net(TCP, "tcp", 4, "little")
    assert found == [SocketLine("tcp", 4, "0.0.0.0", 5678, 1648316),
                     SocketLine("tcp", 4, "10.9.8.7", 443, 1648318),
                     SocketLine("tcp", 4, "127.0.0.1", 8081, 1648317)]
    six = parse_proc_net(TCP6, "tcp", 6, "little")
    assert [(s.address, s.port) for s in six] == [("::", 8082), ("::", 8083), ("fd00:1::5", 22),
                                                  ("::1", 631)]   # not the TIME_WAIT one


def test_udp_listeners_are_the_unconnected_sockets() -> None:
    found = parse_proc_net(UDP, "udp", 4, "little")
    assert [(s.address, s.port, s.inode) for s in found] == [("0.0.0.0", 9999, 1648323),
                                                             ("127.0.0.53", 53, 1648324)]
    assert [(s.address, s.port) for s in parse_proc_net(UDP6, "udp", 6, "little")] == [("::", 5353)]


def test_garbage_lines_are_skipped() -> None:
    text = TCP.splitlines()[0] + "\n   9: zz:zz 00000000:0000 0A\n  10: nonsense\n"
    assert parse_proc_net(text, "tcp", 4, "little") == []


def _fake_proc(tmp_path: Path, pids: dict[int, tuple[str, list[int]]]) -> Path:
    for pid, (comm, inodes) in pids.items():
        fd = tmp_path / str(pid) / "fd"
        fd.mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        for n, inode in enumerate(inodes, start=3):
            os.symlink(f"socket:[{inode}]", fd / str(n))
        os.symlink("/dev/null", fd / "0")
    (tmp_path / "self").mkdir()
    return tmp_path


def test_owners_are_the_lowest_pid_holding_the_socket(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {812: ("sshd", [1648316]), 1203: ("nginx", [1648319, 1648320]),
                                 1204: ("nginx", [1648319]), 77: ("systemd", [1648319])})
    owners = socket_owners([1648316, 1648319, 1648320, 999], proc)
    assert owners == {1648316: (812, "sshd"), 1648319: (77, "systemd"),
                      1648320: (1203, "nginx")}


def _lines() -> list[SocketLine]:
    return (parse_proc_net(TCP, "tcp", 4, "little") + parse_proc_net(TCP6, "tcp", 6, "little")
            + parse_proc_net(UDP, "udp", 4, "little") + parse_proc_net(UDP6, "udp", 6, "little"))


def test_grouping_families_and_loopback() -> None:
    owners = {1648316: (40, "node"), 1648319: (41, "python3")}
    flags = {"tcp": {1648319: False, 1648320: True}, "udp": {1648325: False}}
    listeners = {(x.proto, x.address, x.port): x for x in group_listeners(_lines(), owners, flags)}
    node = listeners[("tcp", "0.0.0.0", 5678)]
    assert (node.process, node.pid, node.families, node.loopback) == ("node", 40, [4], False)
    assert listeners[("tcp", "::", 8082)].families == [4, 6]          # dual-stack
    assert listeners[("tcp", "::", 8083)].families == [6]             # v6only
    assert listeners[("udp", "::", 5353)].families == [4, 6]
    assert listeners[("tcp", "fd00:1::5", 22)].families == [6]
    assert listeners[("tcp", "::1", 631)].loopback
    assert listeners[("udp", "127.0.0.53", 53)].loopback
    assert listeners[("tcp", "127.0.0.1", 8081)].loopback
    assert listeners[("tcp", "::", 8082)].to_json() == {
        "proto": "tcp", "family": "ipv6", "address": "::", "port": 8082, "process": "python3",
        "pid": 41, "v6only": False}
    assert listeners[("tcp", "10.9.8.7", 443)].owner == "?"


def test_v6only_without_sock_diag() -> None:
    """An IPv4 socket on the same port means the IPv6 wildcard cannot take IPv4; else unknown,
    and then it is tried as dual-stack (the default), the side that reports more."""
    lines = [SocketLine("tcp", 6, "::", 80, 10), SocketLine("tcp", 4, "0.0.0.0", 80, 11),
             SocketLine("tcp", 6, "::", 8080, 12), SocketLine("udp", 6, "::", 80, 13)]
    found = {(x.proto, x.family, x.port): x for x in group_listeners(lines, {}, {})}
    assert found[("tcp", 6, 80)].v6only is True
    assert found[("tcp", 6, 8080)].v6only is None and found[("tcp", 6, 8080)].families == [4, 6]
    assert found[("udp", 6, 80)].v6only is None      # the IPv4 socket is TCP


def test_reuseport_sockets_are_one_listener() -> None:
    lines = [SocketLine("tcp", 4, "0.0.0.0", 443, 5), SocketLine("tcp", 4, "0.0.0.0", 443, 6)]
    (one,) = group_listeners(lines, {6: (900, "nginx"), 5: (901, "nginx")}, {})
    assert one.inodes == [5, 6] and one.pid == 900


def test_kernel_sockets_have_no_process() -> None:
    (wg,) = group_listeners([SocketLine("udp", 4, "0.0.0.0", 51820, 0)], {}, {})
    assert wg.process == "(kernel)" and wg.pid is None


def test_mapped_ipv4_addresses() -> None:
    listener = Listener("tcp", 6, "::ffff:127.0.0.1", 25)
    assert listener.loopback and listener.families == [4]
    public = Listener("tcp", 6, "::ffff:192.0.2.7", 25)
    assert not public.loopback and public.mapped == "192.0.2.7"
    assert public.endpoint == "[::ffff:192.0.2.7]:25"


def _diag_message(inode: int, v6only: int | None) -> bytes:
    body = bytearray(72)
    body[0] = socket.AF_INET6
    struct.pack_into("=I", body, 68, inode)
    if v6only is not None:
        body += struct.pack("=HHB", 5, 11, v6only) + b"\0\0\0"
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + bytes(body)


def test_sock_diag_answers_are_parsed() -> None:
    flags: dict[int, bool] = {}
    data = _diag_message(1648319, 0) + _diag_message(1648320, 1) + _diag_message(7, None)
    assert parse_sock_diag(data, flags) is False
    assert flags == {1648319: False, 1648320: True}
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0" * 4
    assert parse_sock_diag(done, flags) is True
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + b"\0" * 20
    assert parse_sock_diag(error, {}) is None


def test_this_process_sees_its_own_listeners() -> None:
    """The real thing, in this namespace: listeners on ephemeral loopback ports (IPv6 too,
    where this namespace has it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        mine = [x for x in read_listeners() if x.port == port and x.proto == "tcp"]
        assert [(x.address, x.family, x.loopback) for x in mine] == [("127.0.0.1", 4, True)]
        assert (mine[0].pid, mine[0].process) == (os.getpid(), Path("/proc/self/comm")
                                                  .read_text().strip())
    try:
        six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return   # no IPv6 in this kernel: the IPv4 half above is the test
    with six:
        six.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            six.bind(("::", 0))
        except OSError:
            return   # IPv6 disabled in this namespace
        port = six.getsockname()[1]
        (mine6,) = [x for x in read_listeners() if x.port == port and x.proto == "udp"]
        assert (mine6.address, mine6.family, mine6.loopback) == ("::", 6, False)
        if v6only_flags("udp") is not None:     # sock_diag for UDP (udp_diag) is loaded
            assert mine6.v6only is True and mine6.families == [6]
