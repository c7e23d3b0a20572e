"""Host key checking for `fwsafe apply --host` against a real (paramiko, loopback) SSH server:
unknown keys refused, accept-new recorded, changed and revoked keys always refused - all before
anything is sent (not even a login attempt)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwsafe.control.flow import ApplyOptions  # noqa: E402
from fwsafe.core.config import HostTarget  # noqa: E402
from fwsafe.errors import ExitCode  # noqa: E402
from fwsafe.remote.hostkeys import (  # noqa: E402
    ChangedHostKeyError,
    KnownHosts,
    RevokedHostKeyError,
    UnknownHostKeyError,
    host_key_name,
)
from fwsafe.remote.remote_apply import RemoteRequest, apply_remote  # noqa: E402
from fwsafe.sshcompat import fingerprint  # noqa: E402
from tests.sshserver import SSHTestServer, TestKey  # noqa: E402


@pytest.fixture
def client_key() -> TestKey:
    return TestKey.generate()


@pytest.fixture
def server(client_key: TestKey) -> Iterator[SSHTestServer]:
    with SSHTestServer(authorized_keys=[client_key]) as srv:
        yield srv


def request(srv: SSHTestServer, key_path: str, known_hosts: Path, *,
            accept_new: bool = False) -> RemoteRequest:
    rules = Path(key_path).parent / "new.rules"
    rules.write_text("*filter\nCOMMIT\n")
    return RemoteRequest(
        target=HostTarget(host=srv.host, port=srv.port, user="root"), rules=str(rules),
        rules6=None, options=ApplyOptions(timeout_s=5), identity=key_path,
        known_hosts=str(known_hosts), accept_new_host_key=accept_new)


def refused(srv: SSHTestServer) -> None:
    """Nothing was sent: no command, not even an authentication attempt."""
    assert srv.commands == []
    assert srv.auth_attempts == []


def test_host_key_name_forms() -> None:
    assert host_key_name("10.0.0.1", 22) == "10.0.0.1"
    assert host_key_name("10.0.0.1", 2222) == "[10.0.0.1]:2222"
    assert host_key_name("fd00::1", 22) == "fd00::1"
    assert host_key_name("fd00::1", 2200) == "[fd00::1]:2200"


def test_unknown_host_is_refused(server: SSHTestServer, client_key: TestKey,
                                 tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    req = request(server, client_key.write(tmp_path / "id"), known)
    with pytest.raises(UnknownHostKeyError) as info:
        apply_remote(req, lambda message: None)
    assert info.value.exit_code == ExitCode.REJECTED
    assert f"[127.0.0.1]:{server.port}" in info.value.message
    assert fingerprint(server.host_key.pkey) in info.value.message
    assert info.value.hint and "--accept-new-host-key" in info.value.hint
    assert known.read_text() == ""
    refused(server)


def test_missing_known_hosts_file_counts_as_empty(server: SSHTestServer, client_key: TestKey,
                                                  tmp_path: Path) -> None:
    known = tmp_path / "sub" / "known_hosts"
    req = request(server, client_key.write(tmp_path / "id"), known)
    (tmp_path / "sub").mkdir()
    with pytest.raises(UnknownHostKeyError):
        apply_remote(req, lambda message: None)
    assert not known.exists()
    refused(server)


def test_changed_key_is_refused_even_with_accept_new(server: SSHTestServer,
                                                    client_key: TestKey, tmp_path: Path) -> None:
    other = TestKey.generate()
    known = tmp_path / "known_hosts"
    line = f"[127.0.0.1]:{server.port} {other.public_line}\n"
    known.write_text(line)
    for accept_new in (False, True):
        req = request(server, client_key.write(tmp_path / "id"), known, accept_new=accept_new)
        with pytest.raises(ChangedHostKeyError) as info:
            apply_remote(req, lambda message: None)
        assert "HOST KEY CHANGED" in info.value.message
        assert fingerprint(other.pkey) in info.value.message
    assert known.read_text() == line
    refused(server)


def test_key_of_another_type_known_is_refused(server: SSHTestServer, client_key: TestKey,
                                              tmp_path: Path) -> None:
    """known_hosts has only an ECDSA key for the host; the host offers ed25519 only."""
    ecdsa = paramiko.ECDSAKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {ecdsa.get_name()} {ecdsa.get_base64()}\n")
    req = request(server, client_key.write(tmp_path / "id"), known, accept_new=True)
    with pytest.raises(ChangedHostKeyError):
        apply_remote(req, lambda message: None)
    refused(server)


def test_revoked_key_is_refused(server: SSHTestServer, client_key: TestKey,
                                tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"@revoked * {server.host_key.public_line}\n")
    req = request(server, client_key.write(tmp_path / "id"), known, accept_new=True)
    with pytest.raises(RevokedHostKeyError):
        apply_remote(req, lambda message: None)
    # Also when the same key is listed as the host's key.
    known.write_text(f"@revoked * {server.host_key.public_line}\n"
                     f"{server.known_hosts_line()}\n")
    with pytest.raises(RevokedHostKeyError):
        apply_remote(req, lambda message: None)
    refused(server)


def test_accept_new_records_the_key_then_goes_on(server: SSHTestServer, client_key: TestKey,
                                                 tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"  # neither the file nor its directory exist
    req = request(server, client_key.write(tmp_path / "id"), known, accept_new=True)
    messages: list[str] = []
    with pytest.raises(Exception):  # noqa: B017 - the fake host cannot run fwsafe
        apply_remote(req, messages.append)
    assert known.read_text() == f"{server.known_hosts_line()}\n"
    assert (known.parent.stat().st_mode & 0o777) == 0o700
    assert any("accepted the new host key" in m for m in messages)
    assert server.commands, "after accepting the key the apply went on"
    assert {method for _, method, _ in server.auth_attempts} == {"publickey"}


def test_accept_new_keeps_a_hashed_file_hashed(server: SSHTestServer, client_key: TestKey,
                                               tmp_path: Path) -> None:
    other = TestKey.generate()
    known = tmp_path / "known_hosts"
    hashed = paramiko.HostKeys.hash_host("elsewhere.example")
    known.write_text(f"{hashed} {other.public_line}")  # and no final newline
    req = request(server, client_key.write(tmp_path / "id"), known, accept_new=True)
    with pytest.raises(Exception):  # noqa: B017 - the fake host cannot run fwsafe
        apply_remote(req, lambda message: None)
    lines = known.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("|1|") and lines[1].startswith("|1|")
    assert f"127.0.0.1]:{server.port}" not in known.read_text()
    again = KnownHosts(str(known))
    assert again.known("127.0.0.1", server.port) == {
        server.host_key.pkey.get_name(): server.host_key.pkey}


def test_hashed_entry_and_port_form_match(server: SSHTestServer, client_key: TestKey,
                                          tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    name = paramiko.HostKeys.hash_host(f"[127.0.0.1]:{server.port}")
    known.write_text(f"# comment\n\n@cert-authority *.example ssh-ed25519 AAAA\n"
                     f"{name} {server.host_key.public_line}\n")
    req = request(server, client_key.write(tmp_path / "id"), known)
    with pytest.raises(Exception) as info:  # noqa: B017 - the fake host cannot run fwsafe
        apply_remote(req, lambda message: None)
    assert not isinstance(info.value, (UnknownHostKeyError, ChangedHostKeyError))
    assert server.commands, "the known key was accepted"


def test_ipv6_loopback_host(client_key: TestKey, tmp_path: Path) -> None:
    try:
        srv = SSHTestServer(authorized_keys=[client_key], bind="::1").start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        known = tmp_path / "known_hosts"
        req = request(srv, client_key.write(tmp_path / "id"), known, accept_new=True)
        with pytest.raises(Exception):  # noqa: B017 - the fake host cannot run fwsafe
            apply_remote(req, lambda message: None)
        assert known.read_text().startswith(f"[::1]:{srv.port} ssh-ed25519 ")
        assert srv.commands
    finally:
        srv.stop()


def test_known_hosts_parsing(tmp_path: Path) -> None:
    a, b, c = TestKey.generate(), TestKey.generate(), TestKey.generate()
    ecdsa = paramiko.ECDSAKey.generate()
    hashed = paramiko.HostKeys.hash_host("[fd00::1]:2222")
    known = tmp_path / "known_hosts"
    known.write_text("\n".join([
        "# comment",
        f"web1,10.0.0.1 {a.public_line} a comment",
        f"10.0.0.1 {ecdsa.get_name()} {ecdsa.get_base64()}",
        f"10.0.0.1 {c.public_line}",  # a second key of a type already known: the first wins
        f"{hashed} {b.public_line}",
        f"@cert-authority *.example {c.public_line}",
        f"@revoked * {c.public_line}",
        "10.0.0.9 ssh-ed25519 not-base64!!",
        "broken line",
        f"!10.0.0.2 {a.public_line}",
        f"|1|bad|hash {a.public_line}",
    ]) + "\n")
    hosts = KnownHosts(str(known))
    assert hosts.known("web1", 22) == {"ssh-ed25519": a.pkey}
    assert hosts.known("10.0.0.1", 22) == {"ssh-ed25519": a.pkey, ecdsa.get_name(): ecdsa}
    assert hosts.known("10.0.0.1", 2222) == {}
    assert hosts.known("fd00::1", 2222) == {"ssh-ed25519": b.pkey}
    assert hosts.known("fd00::1", 22) == {}
    assert hosts.known("10.0.0.2", 22) == {}
    assert hosts.is_revoked(c.pkey) and not hosts.is_revoked(a.pkey)
    assert hosts.hashed


def test_large_known_hosts_file_loads_quickly(tmp_path: Path) -> None:
    import time

    key = TestKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text("".join(f"host{i}.example,10.1.{i // 250}.{i % 250} {key.public_line}\n"
                             for i in range(5000)))
    started = time.monotonic()
    hosts = KnownHosts(str(known))
    assert hosts.known("10.1.19.249", 22) == {"ssh-ed25519": key.pkey}
    assert time.monotonic() - started < 2.0
