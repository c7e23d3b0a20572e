"""The audit's half of the sandbox agent (fwsafe/netns_agent/reach_probes.py): its tap reads
the probes' packets from raw IPv4 and IPv6 headers, and a batch of connects is settled without
waiting out the timeout for the probes the server did not answer (loopback sockets here; the
sandbox's tap in the lab tests)."""

from __future__ import annotations

import socket
import struct
import time

from fwsafe.netns_agent import reach_probes


def ipv4(proto: int, src: str, dst: str, transport: bytes, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(transport), 1, frag, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + transport


def ipv6(proto: int, src: str, dst: str, transport: bytes) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(transport), proto, 64,
                         socket.inet_pton(socket.AF_INET6, src),
                         socket.inet_pton(socket.AF_INET6, dst))
    return header + transport


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def test_a_syn_a_syn_ack_and_a_datagram_are_read_from_their_headers() -> None:
    syn = ipv4(6, "1.2.3.4", "10.0.0.1", tcp(20001, 22, 0x02))
    assert reach_probes._parse(syn) == ("tcp", "1.2.3.4", 20001, "10.0.0.1", 22, 0x02)
    syn_ack = ipv6(6, "fd00::1", "2a00:f00d::4", tcp(443, 20002, 0x12))
    assert reach_probes._parse(syn_ack) == ("tcp", "fd00::1", 443, "2a00:f00d::4", 20002, 0x12)
    datagram = ipv4(17, "1.2.3.4", "10.0.0.1", struct.pack("!HHHH", 67, 68, 8, 0))
    assert reach_probes._parse(datagram) == ("udp", "1.2.3.4", 67, "10.0.0.1", 68, 0)


def test_fragments_echoes_and_short_packets_are_not_probes() -> None:
    later = ipv4(6, "1.2.3.4", "10.0.0.1", tcp(1, 2, 0x02), frag=0x0010)
    assert reach_probes._parse(later) is None
    assert reach_probes._parse(ipv4(1, "1.2.3.4", "10.0.0.1", b"\x08\x00" + bytes(6))) is None
    assert reach_probes._parse(b"\x45\x00") is None


def test_an_icmp_error_names_the_probe_it_quotes() -> None:
    quoted = ipv6(17, "2a00:f00d::4", "fd00::1", struct.pack("!HHHH", 20002, 53, 8, 0))
    error = ipv6(58, "fd00::1", "2a00:f00d::4", bytes([1, 4, 0, 0, 0, 0, 0, 0]) + quoted)
    assert reach_probes._parse(error) == ("icmp", "2a00:f00d::4", 20002, "fd00::1", 53, 0)


class Tap:
    """The packet socket's recvfrom: (packet, (ifname, proto, pkttype)); 4: outgoing."""

    def __init__(self, queue: list[tuple[bytes, tuple[str, int, int]]]) -> None:
        self.queue = queue

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int, int]]:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop(0)


def test_the_tap_records_probes_in_and_what_left_for_them() -> None:
    """SYNs and datagrams in; SYN-ACKs (reached), RSTs and ICMP errors (refused) out: every
    probe decided, the batch ends at once, without the grace."""
    a = reach_probes.ProbeTargets()
    udp = struct.pack("!HHHH", 20002, 53, 8, 0)
    quoted = ipv4(17, "1.2.3.4", "10.0.0.1", udp)
    a.tap_socket = Tap([   # type: ignore[assignment]
        (ipv4(6, "1.2.3.4", "10.0.0.1", tcp(20001, 22, 0x02)), ("eth0", 0x800, 0)),
        (ipv4(6, "10.0.0.1", "1.2.3.4", tcp(22, 20001, 0x12)), ("eth0", 0x800, 4)),
        (ipv4(6, "1.2.3.4", "10.0.0.1", tcp(20001, 22, 0x10)), ("eth0", 0x800, 0)),
        (ipv4(6, "1.2.3.4", "10.0.0.1", tcp(20003, 80, 0x02)), ("lo", 0x800, 0)),
        (ipv4(6, "1.2.3.4", "10.0.0.1", tcp(20004, 81, 0x02)), ("eth0", 0x800, 0)),
        (ipv4(6, "10.0.0.1", "1.2.3.4", tcp(81, 20004, 0x14)), ("eth0", 0x800, 4)),
        (quoted, ("eth1", 0x800, 0)),
        (ipv4(1, "10.0.0.1", "1.2.3.4", bytes([3, 3, 0, 0, 0, 0, 0, 0]) + quoted),
         ("eth1", 0x800, 4))])
    probes = [("t1", ("tcp", "1.2.3.4", 20001, "10.0.0.1", 22)),
              ("t2", ("tcp", "1.2.3.4", 20004, "10.0.0.1", 81)),
              ("u1", ("udp", "1.2.3.4", 20002, "10.0.0.1", 53))]
    began = time.monotonic()
    answer = a.settle(probes, 1.0, 5.0)
    assert time.monotonic() - began < 2.0
    assert answer["arrived"] is True and answer["heard"] == []
    assert answer["answered"] == [["tcp", "1.2.3.4", 20001, "10.0.0.1", 22]]
    assert ("tcp", "1.2.3.4", 20003, "10.0.0.1", 80) not in a.arrived   # lo is not a link


def test_a_dropped_probe_is_waited_for_the_grace_only() -> None:
    a = reach_probes.ProbeTargets()
    a.tap_socket = Tap([   # type: ignore[assignment]
        (ipv6(6, "2a00:f00d::4", "fd00::1", tcp(20001, 22, 0x02)), ("eth0", 0x86DD, 0))])
    began = time.monotonic()
    answer = a.settle([("t1", ("tcp", "2a00:f00d::4", 20001, "fd00::1", 22))], 5.0, 0.3)
    assert 0.3 <= time.monotonic() - began < 2.0
    assert answer == {"ok": True, "arrived": True, "answered": [], "heard": []}
    missing = a.settle([("t2", ("tcp", "2a00:f00d::4", 20002, "fd00::1", 22))], 0.2, 0.1)
    assert missing["arrived"] is False


def test_finish_waits_for_the_expected_connects_only() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port, closed_port = server.getsockname()[1], closed.getsockname()[1]
    a = reach_probes.Prober()
    started = a.start([
        {"id": "open", "proto": "tcp", "src": "127.0.0.1", "sport": 0, "dst": "127.0.0.1",
         "port": port},
        {"id": "closed", "proto": "tcp", "src": "127.0.0.1", "sport": 0, "dst": "127.0.0.1",
         "port": closed_port},
        {"id": "dgram", "proto": "udp", "src": "127.0.0.1", "sport": 0, "dst": "127.0.0.1",
         "port": closed_port}])
    assert started["ok"] and started["results"] == {"dgram": None}
    began = time.monotonic()
    finished = a.finish(["open"], 5.0)
    assert time.monotonic() - began < 2.0
    assert finished["results"]["open"] is None
    assert finished["results"]["closed"] is not None   # refused (or, not expected: settled)
    assert a.pending == {}
    server.close()
    closed.close()
