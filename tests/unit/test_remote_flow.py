"""The workflow of `fwsafe.remote.apply_remote` against a loopback SSH server (paramiko, no
root) whose commands emulate the host's fwsafe: the order of the steps, that only a NEW
connection confirms, and how the host's exit codes become typed errors. The real thing (real
sshd, real netfilter) is tested in tests/lab/test_remote.py."""

from __future__ import annotations

import json
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwsafe.control.flow import ApplyOptions  # noqa: E402
from fwsafe.core.config import HostTarget  # noqa: E402
from fwsafe.errors import (  # noqa: E402
    ExitCode,
    InvalidRulesError,
    PendingError,
    RejectedError,
    RevertedError,
    RevertFailedError,
    UsageError,
)
from fwsafe.remote import timing  # noqa: E402
from fwsafe.remote.remote_apply import (  # noqa: E402
    RemoteCommandError,
    RemoteRequest,
    SSHConnectError,
    apply_remote,
    probe_settle_s,
)
from tests.sshserver import CommandResult, SSHTestServer, TestKey  # noqa: E402

TMPDIR = "/tmp/fwsafe-upload.UNIT0test"
TX = "20260101T000000Z-abcd"


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data) + "\n").encode()


@dataclass
class FakeHost:
    """The host's side: mktemp, upload, `fwsafe apply/confirm/status` with canned answers."""

    apply: tuple[int, dict[str, Any]] = (0, {"ok": True, "id": TX, "state": "pending",
                                             "remaining_s": 5.0, "guard_pid": 42,
                                             "layers": ["ipv4"], "shielded": True})
    confirm: tuple[int, dict[str, Any]] = (0, {"ok": True, "id": TX, "state": "confirmed",
                                               "reason": "confirmed by `fwsafe confirm` from a "
                                                         "new SSH connection"})
    status: dict[str, Any] = field(default_factory=lambda: {"id": TX, "state": "pending",
                                                            "remaining_s": 4.0})
    calls: list[list[str]] = field(default_factory=list)
    on_apply: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, command: str) -> CommandResult:
        argv = shlex.split(command)
        with self.lock:
            self.calls.append(argv)
        if argv[:2] == ["sh", "-c"]:
            script, args = argv[2], argv[4:]
            if "mktemp" in script:
                return CommandResult(0, f"{TMPDIR}\n".encode())
            if "cat >" in script:
                return CommandResult(0)
            if "trap" in script:  # the apply, run by the first connection
                if self.on_apply is not None:
                    self.on_apply()
                return self._fwsafe(args[1:])
            if "test -f" in script:
                return CommandResult(99)
            return self._fwsafe(args[1:])  # run-and-clean: DIR, then the command
        return self._fwsafe(argv)

    def _fwsafe(self, argv: list[str]) -> CommandResult:
        if argv == ["true"]:
            return CommandResult(0)
        verb = argv[1]
        if verb == "apply":
            rc, data = self.apply
        elif verb == "confirm":
            rc, data = self.confirm
        elif verb == "status":
            rc, data = 0, self.status
        else:
            rc, data = 127, {}
        return CommandResult(rc, _json(data) if data else b"",
                             f"fwsafe: error: {data.get('error')}\n".encode()
                             if rc else b"")

    def verbs(self) -> list[str]:
        out = []
        for argv in self.calls:
            if argv[:2] == ["sh", "-c"]:
                script = argv[2]
                if "mktemp" in script:
                    out.append("mktemp")
                    continue
                if "cat >" in script:
                    out.append("upload")
                    continue
                argv = argv[5:] if "trap" in script else argv[5:]
            out.append(argv[1] if len(argv) > 1 else argv[0])
        return out


@pytest.fixture
def client_key() -> TestKey:
    return TestKey.generate()


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def server(client_key: TestKey, host: FakeHost) -> Iterator[SSHTestServer]:
    with SSHTestServer(authorized_keys=[client_key], handler=host) as srv:
        yield srv


def make_request(srv: SSHTestServer, key: TestKey, tmp_path: Path, **options: Any) -> RemoteRequest:
    rules = tmp_path / "new.rules"
    rules.write_text("*filter\nCOMMIT\n")
    known = tmp_path / "known_hosts"
    srv.write_known_hosts(known)
    return RemoteRequest(
        target=HostTarget(host=srv.host, port=srv.port, user="root"), rules=str(rules),
        rules6=None, options=ApplyOptions(**{"timeout_s": 5.0, **options}),
        identity=key.write(tmp_path / "id"), known_hosts=str(known), accept_new_host_key=False)


def test_confirmed_through_a_new_connection(server: SSHTestServer, host: FakeHost,
                                            client_key: TestKey, tmp_path: Path) -> None:
    messages: list[str] = []
    result = apply_remote(make_request(server, client_key, tmp_path), messages.append)
    assert result["ok"] is True and result["state"] == "confirmed" and result["id"] == TX
    assert host.verbs() == ["mktemp", "upload", "apply", "confirm"]
    assert server.connections == 2, "the confirm came over a second, new connection"
    assert 0 < result["armed_s"] <= result["confirmed_s"]
    assert result["remote"]["state"] == "confirmed"
    apply_argv = host.calls[2]
    assert apply_argv[4] == TMPDIR
    assert apply_argv[5:10] == ["fwsafe", "apply", "--detach", "--json", "--timeout"]
    assert apply_argv[-1] == f"{TMPDIR}/rules.v4"
    confirm_argv = host.calls[3]
    assert confirm_argv[4] == TMPDIR  # the upload directory is removed with the confirm
    assert confirm_argv[5:] == ["fwsafe", "confirm", TX, "--json"]
    text = "\n".join(messages)
    for step in ("connected to", "uploaded", "armed:", "applied:", "probing:", "new login #1",
                 "confirmed through a new SSH login"):
        assert step in text
    assert {method for _, method, _ in server.auth_attempts} == {"publickey"}


def test_probe_options_and_state_dir_are_passed_on(server: SSHTestServer, host: FakeHost,
                                                   client_key: TestKey, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "probe_settle_s", lambda options: 0.0)
    req = make_request(server, client_key, tmp_path, probes=["tcp://[fd00::1]:80"],
                       probe_interval=1.5, probe_failures=4, confirm_on_probe=2)
    req.remote_state_dir = "/var/tmp/fw state"
    req.rules6 = req.rules
    apply_remote(req, lambda message: None)
    argv = next(call for call in host.calls if "trap" in call[2])[5:]
    assert argv[:6] == ["fwsafe", "apply", "--detach", "--json", "--timeout", "5.0"]
    for pair in (["--probe", "tcp://[fd00::1]:80"], ["--probe-interval", "1.5"],
                 ["--probe-failures", "4"], ["--confirm-on-probe", "2"],
                 ["--state-dir", "/var/tmp/fw state"], ["--rules6", f"{TMPDIR}/rules.v6"]):
        index = argv.index(pair[0])
        assert argv[index:index + 2] == pair
    assert f"{TMPDIR}/rules.v4" in argv
    assert host.calls[-1][-3:] == ["--json", "--state-dir", "/var/tmp/fw state"]


@pytest.mark.parametrize(("rc", "kind", "error"), [
    (3, "InvalidRulesError", InvalidRulesError),
    (3, "EnvironmentProblem", RejectedError),
    (2, "ConfigError", UsageError),
    (4, "RevertedError", RevertedError),
    (5, "RevertFailedError", RevertFailedError),
    (6, "PendingError", PendingError),
])
def test_remote_exit_codes_become_typed_errors(server: SSHTestServer, host: FakeHost,
                                               client_key: TestKey, tmp_path: Path, rc: int,
                                               kind: str, error: type[Exception]) -> None:
    host.apply = (rc, {"ok": False, "error": f"{TMPDIR}/rules.v4:2: bad thing",
                       "hint": "a hint", "exit_code": rc, "kind": kind})
    req = make_request(server, client_key, tmp_path)
    with pytest.raises(error) as info:
        apply_remote(req, lambda message: None)
    assert type(info.value) is error
    assert int(info.value.exit_code) == rc  # type: ignore[attr-defined]
    message = info.value.message  # type: ignore[attr-defined]
    assert f"{req.rules}:2: bad thing" in message and TMPDIR not in message
    assert host.verbs()[-1] == "true", "the upload directory was removed"
    assert server.connections == 1


def test_fwsafe_missing_on_the_host(server: SSHTestServer, host: FakeHost, client_key: TestKey,
                                    tmp_path: Path) -> None:
    host.apply = (127, {})
    with pytest.raises(RemoteCommandError) as info:
        apply_remote(make_request(server, client_key, tmp_path), lambda message: None)
    assert info.value.exit_code == ExitCode.REJECTED
    assert "not found" in info.value.message


def test_too_late_confirm_reports_the_hosts_reason(server: SSHTestServer, host: FakeHost,
                                                   client_key: TestKey, tmp_path: Path) -> None:
    host.confirm = (4, {"ok": False, "error": f"too late to confirm: transaction {TX} was "
                                              "reverted: probe tcp://x:1 failed",
                        "exit_code": 4, "kind": "RevertedError"})
    host.status = {"id": TX, "state": "reverted", "reason": "probe tcp://x:1 failed 3 times"}
    with pytest.raises(RevertedError) as info:
        apply_remote(make_request(server, client_key, tmp_path), lambda message: None)
    assert "reverted" in info.value.message
    assert "probe tcp://x:1 failed 3 times" in info.value.message


def test_settling_probes_see_an_early_revert(server: SSHTestServer, host: FakeHost,
                                             client_key: TestKey, tmp_path: Path) -> None:
    host.apply = (0, {**host.apply[1], "remaining_s": 30.0})
    host.status = {"id": TX, "state": "reverted", "reason": "probe tcp://x:1 failed 3 times"}
    req = make_request(server, client_key, tmp_path, timeout_s=30.0, probes=["tcp://x:1"])
    with pytest.raises(RevertedError) as info:
        apply_remote(req, lambda message: None)
    assert "probe tcp://x:1 failed 3 times" in info.value.message
    assert "confirm" not in host.verbs(), "never confirmed while the probes settle"


def test_guard_confirmed_by_its_probes_while_settling(server: SSHTestServer, host: FakeHost,
                                                      client_key: TestKey,
                                                      tmp_path: Path) -> None:
    host.apply = (0, {**host.apply[1], "remaining_s": 30.0})
    host.status = {"id": TX, "state": "confirmed", "reason": "every probe passed 2 times"}
    req = make_request(server, client_key, tmp_path, timeout_s=30.0, probes=["tcp://x:1"],
                       confirm_on_probe=2)
    result = apply_remote(req, lambda message: None)
    assert result["ok"] is True and "every probe passed" in result["confirmed_via"]


def test_host_that_stops_answering_is_state_unknown(server: SSHTestServer, host: FakeHost,
                                                    client_key: TestKey, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "AFTER_DEADLINE_S", 1.0)
    host.apply = (0, {**host.apply[1], "remaining_s": 1.5})
    # The host stops taking new connections once the apply runs (the first one lives on).
    listener = server._sock
    assert listener is not None
    host.on_apply = lambda: listener.shutdown(socket.SHUT_RDWR)
    messages: list[str] = []
    with pytest.raises(RevertFailedError) as info:
        apply_remote(make_request(server, client_key, tmp_path), messages.append)
    assert info.value.exit_code == ExitCode.REVERT_FAILED
    assert "unknown" in info.value.message
    assert any("no new SSH login confirmed before the deadline" in m for m in messages)
    assert "confirm" not in host.verbs()


def test_unreachable_host_is_exit_3(client_key: TestKey, tmp_path: Path) -> None:
    srv = SSHTestServer(authorized_keys=[client_key]).start()
    srv.stop()  # a port nobody listens on any more
    with pytest.raises(SSHConnectError) as info:
        apply_remote(make_request(srv, client_key, tmp_path), lambda message: None)
    assert "connection refused" in info.value.message
    assert "nothing was changed" in info.value.message


def test_wrong_key_is_exit_3_and_no_password(server: SSHTestServer, tmp_path: Path) -> None:
    stranger = TestKey.generate()
    with pytest.raises(SSHConnectError) as info:
        apply_remote(make_request(server, stranger, tmp_path), lambda message: None)
    assert "refused" in info.value.message or "failed" in info.value.message
    assert {method for _, method, _ in server.auth_attempts} == {"publickey"}
    assert server.commands == []


def test_missing_local_rules_file_is_exit_3_before_connecting(server: SSHTestServer,
                                                              client_key: TestKey,
                                                              tmp_path: Path) -> None:
    req = make_request(server, client_key, tmp_path)
    req.rules = str(tmp_path / "absent.rules")
    with pytest.raises(InvalidRulesError):
        apply_remote(req, lambda message: None)
    assert server.connections == 0


def test_probe_settle_time() -> None:
    assert probe_settle_s(ApplyOptions()) == 0.0
    options = ApplyOptions(probes=["tcp://x:1"], probe_interval=2.0, probe_failures=3,
                           probe_timeout=3.0)
    assert probe_settle_s(options) == 4 * 3.0 + 1.0


def test_silent_apply_connection_result_learned_through_a_new_login(
        server: SSHTestServer, host: FakeHost, client_key: TestKey, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection that ran the apply never answers: a new login reads the result the
    host left behind; only a later login (certainly after the change) confirms."""
    monkeypatch.setattr(timing, "APPLY_QUIET_MAX", 1.0)
    armed = {**host.apply[1], "remaining_s": 30.0}
    original = host.__call__

    def handler(command: str) -> CommandResult:
        argv = shlex.split(command)
        if argv[:2] == ["sh", "-c"] and "trap" in argv[2]:
            host.calls.append(argv)
            return CommandResult(None)  # never answers
        if argv[:2] == ["sh", "-c"] and "test -f" in argv[2]:
            host.calls.append(argv)
            return CommandResult(0, b"0\n" + _json(armed))
        return original(command)

    server.handler = handler
    messages: list[str] = []
    result = apply_remote(make_request(server, client_key, tmp_path, timeout_s=30.0),
                          messages.append)
    assert result["ok"] is True and result["id"] == TX
    text = "\n".join(messages)
    assert "went silent" in text and "learned through a new login" in text
    assert server.connections >= 3  # first, the login that learned, the one that confirmed
    verbs = [c[2] if c[:2] == ["sh", "-c"] else c[1] for c in host.calls]
    assert verbs.index(next(v for v in verbs if "test -f" in v)) < len(verbs) - 1
    assert host.calls[-1][5:7] == ["fwsafe", "confirm"]


def test_ssh_agent_key_without_identity(server: SSHTestServer, client_key: TestKey,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No -i: the key comes from ssh-agent (a private one, started and stopped here)."""
    import os
    import shutil
    import subprocess
    import time

    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("no ssh-agent")
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if agent_sock.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        key_file = client_key.write(tmp_path / "agent_key")
        subprocess.run(["ssh-add", "-q", key_file], env=env, check=True, timeout=30,
                       capture_output=True)
        os.unlink(key_file)  # only the agent has it now
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_sock))
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no default keys to find
        req = make_request(server, client_key, tmp_path)
        os.unlink(str(req.identity))
        req.identity = None
        result = apply_remote(req, lambda message: None)
        assert result["ok"] is True
        assert {method for _, method, _ in server.auth_attempts} == {"publickey"}
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_a_backstop_that_took_over_is_waited_for_never_not_reverted(
        server: SSHTestServer, host: FakeHost, client_key: TestKey, tmp_path: Path) -> None:
    """The guard is gone and its backstop holds the transaction (say the state directory is
    full, so the record stays `pending` on disk and status says `reverting`, taken over) past
    the deadline + 5 s: the client waits for the record, then reports the revert (exit 4),
    never "the change was NOT reverted" (issue 30 item 2)."""
    host.apply = (0, {**host.apply[1], "remaining_s": 2.0})
    host.confirm = (6, {"ok": False, "error": f"transaction {TX} is being reverted",
                        "exit_code": 6, "kind": "PendingError"})
    host.status = {"id": TX, "state": "reverting", "guard_alive": False, "taken_over": True,
                   "reason": "its guard is gone: the backstop took the transaction over"}
    started = time.monotonic()

    def space_returns() -> None:   # the record is written once the disk takes it
        host.status = {"id": TX, "state": "reverted", "guard_alive": False,
                       "taken_over": False, "reason": "the backstop reverted the change"}

    timer = threading.Timer(9.0, space_returns)
    timer.start()
    try:
        with pytest.raises(RevertedError) as info:
            apply_remote(make_request(server, client_key, tmp_path), lambda message: None)
    finally:
        timer.cancel()
    assert time.monotonic() - started >= 9.0
    assert "the backstop reverted the change" in info.value.message
