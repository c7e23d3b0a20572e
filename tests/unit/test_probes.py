"""Tests for fwsafe.core.probes (and its kinds, fwsafe.core.probe_kinds, and the host syntax,
fwsafe.core.endpoints): URL parsing, and real probes against loopback servers."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) run from elsewhere
    sys.path.insert(0, str(ROOT))

from fwsafe.core.endpoints import format_host_port, split_endpoint  # noqa: E402
from fwsafe.core.probes import (  # noqa: E402
    PROBE_KINDS,
    Probe,
    ProbeResult,
    parse_probe,
    run_probe,
    run_probes,
)
from fwsafe.errors import UsageError  # noqa: E402
from fwsafe.sshcompat import fingerprint  # noqa: E402
from tests.sshserver import CommandResult, SSHTestServer, TestKey  # noqa: E402

# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "host", "port", "user"),
    [
        ("tcp://127.0.0.1:22", "tcp", "127.0.0.1", 22, None),
        ("tcp://[fd00::1]:22", "tcp", "fd00::1", 22, None),
        ("TCP://example.org:443", "tcp", "example.org", 443, None),
        ("ssh://127.0.0.1", "ssh", "127.0.0.1", 22, None),
        ("ssh://admin@web1.example:2222", "ssh", "web1.example", 2222, "admin"),
        ("ssh://[::1]", "ssh", "::1", 22, None),
        ("ssh://[fe80::1%eth0]:22", "ssh", "fe80::1%eth0", 22, None),
        ("ssh-auth://root@127.0.0.1", "ssh-auth", "127.0.0.1", 22, "root"),
        ("ssh-auth://root@[fd00::1]:2222", "ssh-auth", "fd00::1", 2222, "root"),
        ("  tcp://localhost:80  ", "tcp", "localhost", 80, None),
    ],
)
def test_parse_network_forms(url: str, kind: str, host: str, port: int, user: str | None) -> None:
    probe = parse_probe(url)
    assert probe.kind == kind
    assert probe.host == host
    assert probe.port == port
    assert probe.user == user
    assert probe.url == url.strip()
    assert probe.command is None


def test_parse_http_forms() -> None:
    probe = parse_probe("http://127.0.0.1:8080/health?full=1")
    assert (probe.kind, probe.host, probe.port, probe.path) == (
        "http",
        "127.0.0.1",
        8080,
        "/health?full=1",
    )
    assert probe.url == "http://127.0.0.1:8080/health?full=1"  # the full URL is kept
    probe = parse_probe("https://example.org")
    assert (probe.kind, probe.host, probe.port, probe.path) == ("https", "example.org", 443, "/")
    probe = parse_probe("http://[fd00::1]/x")
    assert (probe.host, probe.port, probe.path) == ("fd00::1", 80, "/x")


def test_parse_cmd() -> None:
    probe = parse_probe("cmd:true")
    assert probe.kind == "cmd" and probe.command == ("true",) and probe.host is None
    probe = parse_probe("cmd:ping -c 1 -W 1 'a b' \"c d\"")
    assert probe.command == ("ping", "-c", "1", "-W", "1", "a b", "c d")
    # A shell metacharacter is just an argument: there is no shell.
    assert parse_probe("cmd:echo hi; rm -rf /").command == ("echo", "hi;", "rm", "-rf", "/")


def test_probe_is_frozen_and_hashable() -> None:
    probe = parse_probe("tcp://127.0.0.1:22")
    assert probe == parse_probe("tcp://127.0.0.1:22")
    assert len({probe, parse_probe("tcp://127.0.0.1:22")}) == 1
    with pytest.raises(AttributeError):
        probe.port = 23  # type: ignore[misc]
    assert str(probe) == "tcp://127.0.0.1:22"
    assert set(PROBE_KINDS) == {"tcp", "ssh", "ssh-auth", "http", "https", "cmd"}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("tcp://127.0.0.1", "port is required"),
        ("tcp://127.0.0.1:", "invalid port"),
        ("tcp://127.0.0.1:0", "out of range"),
        ("tcp://127.0.0.1:65536", "out of range"),
        ("tcp://127.0.0.1:ssh", "invalid port"),
        ("tcp://127.0.0.1:22/path", "no path"),
        ("tcp://root@127.0.0.1:22", "no user"),
        ("tcp://fd00::1:22", "brackets"),
        ("tcp://[fd00::1:22", "missing ']'"),
        ("tcp://[web1]:22", "invalid IPv6"),
        ("tcp://[fd00::1]22", "after ']'"),
        ("tcp://bad_host!:22", "invalid host name"),
        ("tcp://300.1.1.1:22", "invalid IPv4"),
        ("tcp://:22", "empty host"),
        ("ssh://@127.0.0.1", "empty user"),
        ("ssh://ro ot@127.0.0.1", "whitespace"),
        ("ssh-auth://127.0.0.1", "user is required"),
        ("ssh-auth://[::1]:22", "user is required"),
        ("http://", "no host"),
        ("http://[::1/", "IPv6"),
        ("http://127.0.0.1:99999/", "out of range"),
        ("https://exa mple.org/", "whitespace"),
        ("https://user:secret@example.org/", "passwords in the URL are not supported"),
        ("cmd:", "empty command"),
        ("cmd:   ", "empty command"),
        ("cmd:echo 'unbalanced", "cannot split"),
        ("cmd://true", "cmd:COMMAND"),
        ("udp://127.0.0.1:53", "unknown probe type 'udp'"),
        ("127.0.0.1:22", "no scheme"),
    ],
)
def test_parse_rejects(url: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_probe(url)
    message = info.value.message
    assert why in message
    assert repr(url.strip()) in message  # the message names the URL


def test_parse_no_scheme_suggests_tcp() -> None:
    with pytest.raises(UsageError) as info:
        parse_probe("10.0.0.1:22")
    assert info.value.hint == "did you mean tcp://10.0.0.1:22?"


def test_split_endpoint_and_format() -> None:
    assert split_endpoint("host") == (None, "host", None)
    assert split_endpoint("u@host:2") == ("u", "host", 2)
    assert split_endpoint("root@[fd00::1]:2222") == ("root", "fd00::1", 2222)
    assert split_endpoint("[::1]") == (None, "::1", None)
    with pytest.raises(ValueError, match="brackets"):
        split_endpoint("fd00::1")
    assert format_host_port("fd00::1", 22) == "[fd00::1]:22"
    assert format_host_port("10.0.0.1", 22) == "10.0.0.1:22"


# --------------------------------------------------------------------------------------------
# Helpers: loopback servers
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 that never accepts (the kernel completes the handshake)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """GET /NNN answers with status NNN; /redirect answers 302 to a closed port."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{_free_port()}/")
        else:
            code = int(self.path.strip("/") or "200")
            self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _serve(server: http.server.ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return thread


@pytest.fixture
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    server.daemon_threads = True
    _serve(server)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fwsafe test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture
def https_base(tmp_path: Path) -> Iterator[str]:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    _serve(server)
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client_key() -> TestKey:
    return TestKey.generate()


@pytest.fixture
def ssh_server(client_key: TestKey) -> Iterator[SSHTestServer]:
    with SSHTestServer(authorized_keys=[client_key], users=["root", "admin"]) as server:
        yield server


@pytest.fixture
def key_file(client_key: TestKey, tmp_path: Path) -> str:
    return client_key.write(tmp_path / "id_ed25519")


def probe(url: str, **kwargs: Any) -> ProbeResult:
    kwargs.setdefault("timeout", 3.0)
    return run_probe(parse_probe(url), **kwargs)


# --------------------------------------------------------------------------------------------
# tcp
# --------------------------------------------------------------------------------------------


def test_tcp_ok(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = probe(f"tcp://127.0.0.1:{port}")
    assert result.ok, result
    assert result.error is None
    assert 0 <= result.latency_s < 1
    assert result.detail == f"connected to 127.0.0.1:{port}"


def test_tcp_refused() -> None:
    result = probe(f"tcp://127.0.0.1:{_free_port()}")
    assert not result.ok
    assert result.error is not None and "refused" in result.error


def test_tcp_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sock = socket.socket(socket.AF_INET6)
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with sock:
        sock.listen(4)
        result = probe(f"tcp://[::1]:{sock.getsockname()[1]}")
    assert result.ok, result


def test_tcp_timeout_with_full_backlog() -> None:
    """A listener whose accept queue is full drops new SYNs: the connect times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            client = socket.socket()
            client.settimeout(0.2)
            fillers.append(client)
            try:
                client.connect(("127.0.0.1", port))
            except (TimeoutError, socket.timeout):
                break  # the queue is full
            except OSError:
                pytest.skip("the kernel refuses instead of dropping (tcp_abort_on_overflow)")
        else:
            pytest.skip("could not fill the accept queue on this kernel")
        start = time.monotonic()
        result = probe(f"tcp://127.0.0.1:{port}", timeout=0.4)
        elapsed = time.monotonic() - start
    finally:
        for client in fillers:
            client.close()
        server.close()
    assert not result.ok
    assert result.error == "timed out after 0.4s"
    assert 0.3 < elapsed < 2.0


# --------------------------------------------------------------------------------------------
# http / https
# --------------------------------------------------------------------------------------------


def test_http_200_ok(http_base: str) -> None:
    result = probe(f"{http_base}/200")
    assert result.ok, result
    assert result.detail == "HTTP 200 OK"


def test_http_4xx_counts_as_up(http_base: str) -> None:
    result = probe(f"{http_base}/404")
    assert result.ok, result
    assert result.detail is not None and result.detail.startswith("HTTP 404")


def test_http_503_fails(http_base: str) -> None:
    result = probe(f"{http_base}/503")
    assert not result.ok
    assert result.error == "HTTP 503 Service Unavailable"


def test_http_redirect_not_followed(http_base: str) -> None:
    # The redirect points at a closed port: following it would fail.
    result = probe(f"{http_base}/redirect")
    assert result.ok, result
    assert result.detail is not None and result.detail.startswith("HTTP 302")


def test_http_ignores_proxy_settings(http_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = f"http://127.0.0.1:{_free_port()}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, bogus)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert probe(f"{http_base}/200").ok


def test_http_refused() -> None:
    result = probe(f"http://127.0.0.1:{_free_port()}/")
    assert not result.ok
    assert result.error is not None and "refused" in result.error


def test_http_timeout(listener: socket.socket) -> None:
    # Connected, but nobody ever answers.
    port = listener.getsockname()[1]
    result = probe(f"http://127.0.0.1:{port}/", timeout=0.3)
    assert not result.ok
    assert result.error is not None and "timed out" in result.error
    assert result.latency_s < 2


def test_https_verifies_certificates(https_base: str) -> None:
    result = probe(f"{https_base}/200")
    assert not result.ok
    assert result.error is not None and "certificate" in result.error


def test_https_without_verification(https_base: str) -> None:
    result = probe(f"{https_base}/200", verify_tls=False)
    assert result.ok, result
    assert result.detail == "HTTP 200 OK"


# --------------------------------------------------------------------------------------------
# cmd
# --------------------------------------------------------------------------------------------


def test_cmd_true_false() -> None:
    ok = probe("cmd:true")
    assert ok.ok and ok.error is None and ok.detail == "exit status 0"
    bad = probe("cmd:false")
    assert not bad.ok
    assert bad.error == "exit status 1"


def test_cmd_error_is_last_stderr_line() -> None:
    result = probe("cmd:sh -c 'echo first >&2; echo last words >&2; echo out; exit 3'")
    assert not result.ok
    assert result.error == "last words"
    assert result.detail == "exit status 3"


def test_cmd_stdout_in_detail() -> None:
    result = probe("cmd:echo hello world")
    assert result.ok
    assert result.detail == "exit status 0: hello world"


def test_cmd_not_found() -> None:
    result = probe("cmd:/nonexistent/fwsafe-no-such-command")
    assert not result.ok
    assert result.error == "command not found: /nonexistent/fwsafe-no-such-command"


def test_cmd_timeout_kills_the_process_group() -> None:
    # The background `sleep` keeps the pipes open: only killing the group ends it quickly.
    start = time.monotonic()
    result = probe("cmd:sh -c 'sleep 30 & sleep 30'", timeout=0.3)
    assert not result.ok
    assert result.error == "command timed out after 0.3s"
    assert time.monotonic() - start < 3


# --------------------------------------------------------------------------------------------
# ssh (banner + key exchange, no login)
# --------------------------------------------------------------------------------------------


def test_ssh_ok(ssh_server: SSHTestServer) -> None:
    result = probe(ssh_server.url("ssh"))
    assert result.ok, result
    assert result.detail is not None
    assert result.detail.startswith("SSH-2.0-")
    assert fingerprint(ssh_server.host_key.pkey) in result.detail
    assert ssh_server.auth_attempts == []  # no login attempted


def test_ssh_refused() -> None:
    result = probe(f"ssh://127.0.0.1:{_free_port()}")
    assert not result.ok
    assert result.error is not None and "refused" in result.error


def test_ssh_not_an_ssh_server(http_base: str) -> None:
    port = http_base.rsplit(":", 1)[1]

    # An HTTP server says nothing first; use a server that greets with a non-SSH line.
    greeter = socket.socket()
    greeter.bind(("127.0.0.1", 0))
    greeter.listen(4)

    def greet() -> None:
        conn, _ = greeter.accept()
        conn.sendall(b"220 smtp.example ESMTP\r\n")
        time.sleep(0.5)
        conn.close()

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    try:
        result = probe(f"ssh://127.0.0.1:{greeter.getsockname()[1]}")
    finally:
        thread.join(2)
        greeter.close()
    assert not result.ok
    assert result.error == "not an SSH server: first line is '220 smtp.example ESMTP'"
    # And the HTTP server, which waits for a request, makes the banner read time out.
    result = probe(f"ssh://127.0.0.1:{port}", timeout=0.3)
    assert not result.ok
    assert result.error == "no SSH banner: timed out after 0.3s"


def test_ssh_closed_before_banner() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        result = probe(f"ssh://127.0.0.1:{server.getsockname()[1]}")
    finally:
        thread.join(2)
        server.close()
    assert not result.ok
    assert result.error is not None
    assert "closed before the SSH banner" in result.error or "reset" in result.error


def test_ssh_silent_listener_times_out(listener: socket.socket) -> None:
    start = time.monotonic()
    result = probe(f"ssh://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
    assert not result.ok
    assert result.error == "no SSH banner: timed out after 0.3s"
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------------------------------
# ssh-auth (full key login, runs `true`)
# --------------------------------------------------------------------------------------------


def test_ssh_auth_ok_with_known_hosts(
    ssh_server: SSHTestServer, key_file: str, tmp_path: Path
) -> None:
    known_hosts = ssh_server.write_known_hosts(tmp_path / "known_hosts")
    result = probe(
        ssh_server.url("ssh-auth", "root"), key_filename=key_file, known_hosts=known_hosts
    )
    assert result.ok, result
    assert result.detail is not None and "logged in as root" in result.detail
    assert "not verified" not in result.detail
    assert ssh_server.commands == [("root", "true")]
    assert all(method == "publickey" for _, method, _ in ssh_server.auth_attempts)


def test_ssh_auth_ok_without_known_hosts_warns(ssh_server: SSHTestServer, key_file: str) -> None:
    result = probe(ssh_server.url("ssh-auth", "admin"), key_filename=key_file)
    assert result.ok, result
    assert result.detail is not None and "host key not verified" in result.detail
    assert ssh_server.commands == [("admin", "true")]


def test_ssh_auth_default_keys(
    ssh_server: SSHTestServer, client_key: TestKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without key_filename, the default ~/.ssh keys are tried."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    client_key.write(home / ".ssh" / "id_ed25519")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    result = probe(ssh_server.url("ssh-auth", "root"))
    assert result.ok, result


def test_ssh_auth_no_key_available(
    ssh_server: SSHTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    result = probe(ssh_server.url("ssh-auth", "root"))
    assert not result.ok
    assert result.error is not None and "no SSH key" in result.error


def test_ssh_auth_wrong_key(ssh_server: SSHTestServer, tmp_path: Path) -> None:
    other = TestKey.generate().write(tmp_path / "other")
    result = probe(ssh_server.url("ssh-auth", "root"), key_filename=other)
    assert not result.ok
    assert result.error is not None and result.error.startswith("authentication failed")
    assert ssh_server.commands == []
    assert not any(method == "password" for _, method, _ in ssh_server.auth_attempts)


def test_ssh_auth_user_not_allowed(ssh_server: SSHTestServer, key_file: str) -> None:
    result = probe(ssh_server.url("ssh-auth", "mallory"), key_filename=key_file)
    assert not result.ok
    assert result.error is not None and "mallory@" in result.error


def test_ssh_auth_host_key_mismatch(
    ssh_server: SSHTestServer, key_file: str, tmp_path: Path
) -> None:
    impostor = TestKey.generate()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{ssh_server.port} {impostor.public_line}\n")
    result = probe(
        ssh_server.url("ssh-auth", "root"), key_filename=key_file, known_hosts=str(known_hosts)
    )
    assert not result.ok
    assert result.error is not None and result.error.startswith("host key mismatch")
    assert ssh_server.commands == []


def test_ssh_auth_unknown_host_rejected(
    ssh_server: SSHTestServer, key_file: str, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    result = probe(
        ssh_server.url("ssh-auth", "root"), key_filename=key_file, known_hosts=str(known_hosts)
    )
    assert not result.ok
    assert result.error is not None and "not found in" in result.error


def test_ssh_auth_missing_known_hosts_file(
    ssh_server: SSHTestServer, key_file: str, tmp_path: Path
) -> None:
    result = probe(
        ssh_server.url("ssh-auth", "root"),
        key_filename=key_file,
        known_hosts=str(tmp_path / "missing"),
    )
    assert not result.ok
    assert result.error is not None and result.error.startswith("cannot read known_hosts")


def test_ssh_auth_remote_true_fails(client_key: TestKey, key_file: str) -> None:
    with SSHTestServer(
        authorized_keys=[client_key], handler=lambda command: CommandResult(status=1)
    ) as server:
        result = probe(server.url("ssh-auth", "root"), key_filename=key_file)
    assert not result.ok
    assert result.error == "remote 'true' exited with status 1"


def test_ssh_auth_remote_hangs(client_key: TestKey, key_file: str) -> None:
    with SSHTestServer(
        authorized_keys=[client_key], handler=lambda command: CommandResult(status=None)
    ) as server:
        start = time.monotonic()
        result = probe(server.url("ssh-auth", "root"), key_filename=key_file, timeout=0.5)
        elapsed = time.monotonic() - start
    assert not result.ok
    assert result.error is not None and "timed out after 0.5s" in result.error
    assert elapsed < 2


def test_ssh_auth_silent_listener_times_out(listener: socket.socket, key_file: str) -> None:
    start = time.monotonic()
    result = probe(
        f"ssh-auth://root@127.0.0.1:{listener.getsockname()[1]}",
        key_filename=key_file,
        timeout=0.4,
    )
    assert not result.ok
    assert result.error == "timed out after 0.4s"
    assert time.monotonic() - start < 2


def test_ssh_auth_refused(key_file: str) -> None:
    result = probe(f"ssh-auth://root@127.0.0.1:{_free_port()}", key_filename=key_file)
    assert not result.ok
    assert result.error is not None and "refused" in result.error


# --------------------------------------------------------------------------------------------
# run_probes, results, import weight
# --------------------------------------------------------------------------------------------


def test_run_probes_concurrent_and_ordered(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    probes = [
        parse_probe("cmd:sleep 0.5"),
        parse_probe(f"tcp://127.0.0.1:{port}"),
        parse_probe("cmd:sh -c 'sleep 0.5; exit 1'"),
        parse_probe(f"tcp://127.0.0.1:{_free_port()}"),
    ]
    start = time.monotonic()
    results = run_probes(probes, timeout=3.0)
    elapsed = time.monotonic() - start
    assert [r.url for r in results] == [p.url for p in probes]
    assert [r.ok for r in results] == [True, True, False, False]
    assert elapsed < 1.2  # the two 0.5 s commands ran side by side


def test_run_probes_empty() -> None:
    assert run_probes([], timeout=1.0) == []


def test_result_to_json() -> None:
    result = probe("cmd:false")
    data = result.to_json()
    assert set(data) == {"url", "ok", "latency_s", "error", "detail"}
    assert data["url"] == "cmd:false" and data["ok"] is False
    assert json.loads(json.dumps(data)) == data


def test_run_probe_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError):
        run_probe(Probe(url="cmd:true", kind="cmd", command=("true",)), timeout=0)


def test_import_is_light() -> None:
    code = (
        "import sys, fwsafe.core.probes\n"
        "heavy = [m for m in ('paramiko', 'cryptography', 'urllib.request', 'subprocess')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
