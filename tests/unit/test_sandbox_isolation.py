"""The sandbox's tripwires and its reading of the host (fwsafe.check.isolation), with real
sockets: a connection is answered by a hang-up and recorded, also when it was still waiting to
be accepted when asked."""

from __future__ import annotations

import socket
from pathlib import Path

from fwsafe.check.isolation import Tripwires, describe, host_sockets, visible_mounts


def _connect(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        return conn.recv(16)


def test_a_connection_is_closed_at_once_and_recorded(tmp_path: Path) -> None:
    wires = Tripwires()
    wires.add("/run/dbus/system_bus_socket", "stream", bind_at=str(tmp_path / "bus"))
    wires.add("/run/other.sock", "stream", bind_at=str(tmp_path / "other"))
    wires.start()
    try:
        assert wires.hits() == []
        assert _connect(tmp_path / "bus") == b""   # the "daemon" hangs up
        assert wires.stop() == ["/run/dbus/system_bus_socket"]
    finally:
        wires.stop()


def test_a_connection_not_yet_accepted_counts(tmp_path: Path) -> None:
    wires = Tripwires()   # not started: nothing accepts
    wires.add("/run/x.sock", "stream", bind_at=str(tmp_path / "x"))
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(tmp_path / "x"))
    assert wires.hits() == ["/run/x.sock"]


def test_listening_sockets_of_this_host_are_found(tmp_path: Path) -> None:
    path = Path("/tmp") / f"fwsafe-unit-{tmp_path.name}.sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        server.listen(1)
        assert host_sockets().get(str(path)) == "stream"
    finally:
        server.close()
        path.unlink(missing_ok=True)


def test_mounts_parents_first() -> None:
    points = [point for point, _ in visible_mounts()]
    assert points[0] == "/"
    assert all(points.index(p) > points.index("/proc") for p in points if p.startswith("/proc/"))


def test_describe_names_the_daemon() -> None:
    assert "firewalld" in describe(["/run/dbus/system_bus_socket"])
    assert describe(["/x.sock"]) == "/x.sock"
