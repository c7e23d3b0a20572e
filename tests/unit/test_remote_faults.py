"""Faults of the world in `fwsafe apply --host`, against the loopback SSH server (no root): every
remote step has an overall limit enforced around paramiko, a lost apply answer is "unknown"
until the host says otherwise, and Ctrl-C at any moment ends in the truth. The same faults over
a real network (latency, loss, cuts, a real sshd and netfilter) are tests/lab/test_faults.py."""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fwsafe.errors import ExitCode, RevertedError
from fwsafe.remote import timing
from fwsafe.remote.job import InterruptedBeforeChange
from fwsafe.remote.remote_apply import RemoteCommandError, apply_remote
from fwsafe.remote.scripts import CALLED_OFF_NOW
from fwsafe.remote.session import StepTimedOut
from fwsafe.remote.timing import Link
from tests.sshserver import CommandResult, SSHTestServer, TestKey
from tests.unit.test_remote_flow import TX, FakeHost, _json, make_request


class StatefulHost(FakeHost):
    """FakeHost whose transaction moves: `revert` reverts it, `confirm` confirms it (unless
    `on_confirm` says otherwise); the read-result script can call a silent apply off."""

    def __init__(self) -> None:
        super().__init__()
        self.state = "pending"
        self.release = threading.Event()   # set at teardown: blocked handlers return
        self.on_confirm: Any = None
        self.silent_apply = False
        self.call_off_answer = CALLED_OFF_NOW

    def __call__(self, command: str) -> CommandResult:
        argv = shlex.split(command)
        if argv[:2] == ["sh", "-c"] and "trap" in argv[2] and self.silent_apply:
            with self.lock:
                self.calls.append(argv)
            self.release.wait(30)  # no exec reply at all: the transport thread is blocked
            return CommandResult(None)
        if argv[:2] == ["sh", "-c"] and "test -f" in argv[2]:
            with self.lock:
                self.calls.append(argv)
            if argv[-1] == "call-off":
                return CommandResult(self.call_off_answer)
            return CommandResult(99)
        return super().__call__(command)

    def _fwsafe(self, argv: list[str]) -> CommandResult:
        verb = argv[1] if len(argv) > 1 else ""
        if verb == "status":
            return CommandResult(0, _json({"id": TX, "state": self.state, "remaining_s": 4.0,
                                           "reason": f"test: {self.state}"}))
        if verb == "revert":
            if self.state == "pending":
                self.state = "reverted"
            return CommandResult(4 if self.state == "reverted" else 3, b"{}\n")
        if verb == "confirm":
            if self.on_confirm is not None:
                return self.on_confirm()  # type: ignore[no-any-return]
            if self.state == "pending":
                self.state = "confirmed"
        return super()._fwsafe(argv)


@pytest.fixture
def client_key() -> TestKey:
    return TestKey.generate()


@pytest.fixture
def host() -> Iterator[StatefulHost]:
    fake = StatefulHost()
    yield fake
    fake.release.set()


@pytest.fixture
def server(client_key: TestKey, host: StatefulHost) -> Iterator[SSHTestServer]:
    with SSHTestServer(authorized_keys=[client_key], handler=host) as srv:
        yield srv


@pytest.fixture
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote commands get 1.5 s, the apply's quiet time 0.5 s: the tests stay short."""
    monkeypatch.setattr(timing, "QUERY_FLOOR", 1.5)
    monkeypatch.setattr(timing, "APPLY_QUIET_MIN", 0.5)
    monkeypatch.setattr(timing, "APPLY_QUIET_MAX", 0.5)


def _interrupt_soon(delay: float = 0.0) -> None:
    """SIGINT to this process (the client runs in the main thread) from a server thread."""
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()


# -- budgets ------------------------------------------------------------------------------------

def test_link_budgets_have_floors_scale_and_ceilings() -> None:
    lan = Link(rtt_s=0.001, login_s=0.06)
    assert lan.attempt() == timing.ATTEMPT_FLOOR
    assert lan.tcp_timeout() == pytest.approx(2.003)
    assert lan.tcp_timeout(after_deadline=True) == pytest.approx(0.503)
    assert lan.query() == pytest.approx(30.01)
    assert lan.interrupt() == timing.INTERRUPT_FLOOR
    slow = Link(rtt_s=1.0, login_s=7.0)  # 500 ms each way, as measured in the fault lab
    assert slow.attempt() == pytest.approx(23.0)
    assert slow.tcp_timeout(after_deadline=True) == pytest.approx(3.5), \
        "after the deadline a round trip of 1 s must still connect"
    assert slow.query() == pytest.approx(40.0)
    assert slow.interrupt() == pytest.approx(46.0)
    assert slow.apply_quiet(60) == pytest.approx(10 + 4)
    worst = Link(rtt_s=100.0, login_s=100.0)
    assert worst.attempt() == timing.ATTEMPT_CEILING
    assert worst.tcp_timeout() == timing.TCP_CEILING
    assert worst.query() == timing.QUERY_CEILING
    assert worst.upload(1 << 30) == timing.UPLOAD_CEILING
    assert worst.interrupt() == timing.INTERRUPT_CEILING
    assert Link().upload(64 * 1024 * 60) == pytest.approx(timing.UPLOAD_FLOOR + 60)


# -- every wait bounded -------------------------------------------------------------------------

def test_an_exec_reply_that_never_comes_is_cut_at_the_limit(
        server: SSHTestServer, host: StatefulHost, client_key: TestKey, tmp_path: Path) -> None:
    """paramiko waits for the exec reply without any limit; the step's own limit ends it."""
    from fwsafe.core.config import HostTarget
    from fwsafe.remote.hostkeys import KnownHosts
    from fwsafe.remote.session import Dialer

    host.silent_apply = True
    known = server.write_known_hosts(tmp_path / "known_hosts")
    dialer = Dialer(HostTarget(host=server.host, port=server.port, user="root"),
                    KnownHosts(known), identity=client_key.write(tmp_path / "id"),
                    accept_new=False, on_accept=lambda text: None)
    with dialer.connect(5.0, tcp_timeout=2.0) as conn:
        started = time.monotonic()
        with pytest.raises(StepTimedOut) as info:
            conn.run("sh -c 'trap' x", 1.0)
        assert time.monotonic() - started < 2.5
        assert "no answer within 1.0 s" in str(info.value)
        assert not conn.active(), "a connection whose step overran is not used again"


def test_a_lost_apply_that_never_started_is_called_off_exit_3(
        server: SSHTestServer, host: StatefulHost, client_key: TestKey, tmp_path: Path,
        short_limits: None) -> None:
    """The apply's exec request got no answer at all; a new login finds that it never started,
    calls it off for good, and only then says that nothing changed."""
    host.silent_apply = True
    messages: list[str] = []
    started = time.monotonic()
    with pytest.raises(RemoteCommandError) as info:
        apply_remote(make_request(server, client_key, tmp_path, timeout_s=20.0),
                     messages.append)
    assert info.value.exit_code == ExitCode.REJECTED
    assert "never started" in info.value.message and "called off" in info.value.message
    assert any("whether the host applied is unknown" in m for m in messages), messages
    assert time.monotonic() - started < 10
    read = [c for c in host.calls if c[:2] == ["sh", "-c"] and "test -f" in c[2]]
    assert read and read[0][-1] == "call-off"


def test_a_lost_apply_that_is_still_running_is_never_nothing_changed(
        server: SSHTestServer, host: StatefulHost, client_key: TestKey, tmp_path: Path,
        short_limits: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The apply started (the call-off fails) but never reports back: unknown, exit 5."""
    monkeypatch.setattr(timing, "AFTER_DEADLINE_S", 1.0)
    host.silent_apply = True
    host.call_off_answer = 99  # the apply holds the claim: it runs
    host.state = "applying"
    with pytest.raises(Exception) as info:
        apply_remote(make_request(server, client_key, tmp_path, timeout_s=2.0),
                     lambda message: None)
    assert getattr(info.value, "exit_code", None) == ExitCode.REVERT_FAILED, info.value


# -- Ctrl-C at any moment -----------------------------------------------------------------------

def test_ctrl_c_during_the_upload_is_exit_3_and_removes_the_upload_dir(
        server: SSHTestServer, host: StatefulHost, client_key: TestKey, tmp_path: Path) -> None:
    original = host.__call__

    def handler(command: str) -> CommandResult:
        if "cat >" in command:  # the upload (the test server has no SFTP)
            _interrupt_soon()
            return CommandResult(0, delay=1.0)
        return original(command)

    server.handler = handler
    with pytest.raises(InterruptedBeforeChange) as info:
        apply_remote(make_request(server, client_key, tmp_path), lambda message: None)
    assert info.value.exit_code == ExitCode.REJECTED
    assert "nothing was changed" in info.value.message
    assert "left behind" not in info.value.message
    verbs = host.verbs()
    assert "apply" not in verbs and verbs[-1] == "true", verbs  # run-and-clean removed it


def test_ctrl_c_while_confirming_reverts_and_reports_4(
        server: SSHTestServer, host: StatefulHost, client_key: TestKey, tmp_path: Path) -> None:
    def confirm() -> CommandResult:
        _interrupt_soon()
        return CommandResult(None)  # the confirm never answers

    host.on_confirm = confirm
    messages: list[str] = []
    with pytest.raises(RevertedError) as info:
        apply_remote(make_request(server, client_key, tmp_path, timeout_s=30.0),
                     messages.append)
    assert info.value.exit_code == ExitCode.REVERTED
    assert host.state == "reverted" and "revert" in host.verbs()
    assert any("interrupted (SIGINT)" in m and "giving up in" in m for m in messages)


def test_ctrl_c_after_the_host_confirmed_is_exit_0(
        server: SSHTestServer, host: StatefulHost, client_key: TestKey, tmp_path: Path) -> None:
    def confirm() -> CommandResult:
        host.state = "confirmed"  # the host confirmed; its answer is still on its way
        _interrupt_soon()
        return CommandResult(None)

    host.on_confirm = confirm
    result = apply_remote(make_request(server, client_key, tmp_path, timeout_s=30.0),
                          lambda message: None)
    assert result["ok"] is True and result["state"] == "confirmed"
    assert "revert" not in host.verbs()


def test_sigterm_is_an_interrupt_too(server: SSHTestServer, host: StatefulHost,
                                     client_key: TestKey, tmp_path: Path) -> None:
    def confirm() -> CommandResult:
        threading.Timer(0.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        return CommandResult(None)

    host.on_confirm = confirm
    messages: list[str] = []
    with pytest.raises(RevertedError):
        apply_remote(make_request(server, client_key, tmp_path, timeout_s=30.0),
                     messages.append)
    assert any("interrupted (SIGTERM)" in m for m in messages)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is put back"


def test_click_abort_from_ctrl_c_is_never_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """click turns KeyboardInterrupt into Abort; the CLI must still exit 3 (nothing of this
    command is live), never 2."""
    from fwsafe import cli
    from fwsafe.control import manager

    def interrupted(self: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(manager.Manager, "status", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--state-dir", str(tmp_path / "state")])
    assert info.value.code == int(ExitCode.REJECTED)


def test_the_ansible_module_scales_its_limits_as_apply_host_does() -> None:
    """The action plugin carries its own copy of the budgets (the controller need not have
    fwsafe): for any link, its new-login and remote-command limits are `Link`'s."""
    import importlib.util

    pytest.importorskip("ansible")
    path = Path(__file__).resolve().parents[2] / "ansible" / "plugins" / "action" / "apply.py"
    spec = importlib.util.spec_from_file_location("fwsafe_ansible_action", path)
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    for rtt in (0.0, 0.001, 0.05, 0.3, 0.6, 1.0, 5.0, 100.0):
        for login in (0.0, 0.05, 1.0, 7.0, 30.0, 100.0):
            link = Link(rtt_s=rtt, login_s=login)
            assert plugin.link_budgets(rtt, login) == {"attempt": link.attempt(),
                                                       "query": link.query()}
    assert plugin.ARGUMENT_SPEC["revert_grace"]["default"] == timing.AFTER_DEADLINE_S
