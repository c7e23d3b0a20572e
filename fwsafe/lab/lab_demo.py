"""`fwsafe demo`: the lockout, and the way back, in a throwaway namespace lab.

Two network namespaces joined by a veth pair, a real sshd in one, an admin's SSH session from
the other. Inside that session the admin applies rules that drop everything, established
traffic included: the session freezes and is given up, exactly as in the incident fwsafe
exists for. Then the guard reverts at its deadline and a NEW SSH login works again.
The firewall of this machine's own network namespace is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import click

from fwsafe.errors import EnvironmentProblem

LOCKOUT_RULES = """\
# Everything is dropped, established SSH connections included: the classic lockout.
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
COMMIT
"""

BASELINE_RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -m comment --comment "ssh" -j ACCEPT
COMMIT
"""


_QUIET = {"on": False}


def _say(text: str = "", *, bold: bool = False) -> None:
    # With --json the show goes to stderr, so that stdout holds the one JSON object.
    click.echo(click.style(text, bold=bold) if bold else text, err=_QUIET["on"])


def _pump(stream: IO[bytes], prefix: bytes) -> None:
    """Show the remote session's terminal output as it arrives."""
    out = sys.stderr.buffer if _QUIET["on"] else sys.stdout.buffer
    at_line_start = True
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        for piece in chunk.splitlines(keepends=True):
            if at_line_start:
                out.write(prefix)
            out.write(piece)
            at_line_start = piece.endswith(b"\n")
        out.flush()


def run_demo(*, timeout_s: float = 12.0, keep: bool = False, quiet: bool = False
             ) -> dict[str, object]:
    # the lab itself: loaded when the demo runs, not when it is listed
    from fwsafe.lab import create_lab, require_lab_capable

    _QUIET["on"] = quiet
    reason = require_lab_capable()
    if reason:
        raise EnvironmentProblem(f"the demo needs root and network namespaces: {reason}")
    _say("fwsafe demo: a lockout over SSH, and the automatic way back", bold=True)
    _say("Building a lab: namespaces fwdemo-srv (server, real sshd) and fwdemo-cli (your laptop)")
    lab = create_lab("fwdemo", 77)
    try:
        state_dir = lab.workdir / "state"
        rules = lab.workdir / "lockout.rules"
        rules.write_text(LOCKOUT_RULES)
        lab.srv_exec(["iptables-restore"], input=BASELINE_RULES)
        lab.start_sshd(env={"FWSAFE_STATE_DIR": str(state_dir)})
        before = lab.ruleset()
        _say(f"  server {lab.srv_ip4}, client {lab.cli_ip4}; "
             f"new SSH login works: {'yes' if lab.new_login_ok() else 'NO'}")
        _say()
        _say("1. The admin logs in and applies rules that drop everything, established "
             "connections included:", bold=True)
        for line in LOCKOUT_RULES.splitlines():
            _say(f"     {line}")
        first = f"fwsafe apply --timeout {timeout_s:g} {rules}"
        _say(f"   $ ssh root@{lab.srv_ip4} '{first}'")
        refused = lab.ssh(first, timeout=60)
        for line in refused.stderr.splitlines():
            _say(f"   | {line}")
        _say(f"   exit {refused.returncode}: fwsafe's check tried the rules in a scratch namespace "
             "with the real kernel and refused them; nothing was changed.")
        _say()
        _say("   The admin insists (--force). Now only the guard stands between the server and a "
             "lockout:", bold=True)
        command = f"fwsafe apply --force --timeout {timeout_s:g} {rules}"
        _say(f"   $ ssh -tt root@{lab.srv_ip4} '{command}'")
        session = lab.ssh_popen(command, tty=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        assert session.stdout is not None
        pump = threading.Thread(target=_pump, args=(session.stdout, b"   | "), daemon=True)
        pump.start()
        applied_at = _wait_for_pending(state_dir)
        time.sleep(3)
        _say()
        _say("2. The session froze: the new rules drop its packets too. The admin gives up "
             "and the ssh client dies (killed here).", bold=True)
        session.kill()
        session.wait()
        killed_at = time.monotonic()
        _say(f"   session lost {killed_at - applied_at:.1f} s after the change; "
             f"the guard reverts {timeout_s:g} s after it")
        _say()
        _say("3. From the laptop, a NEW connection is tried every half second:", bold=True)
        last = ""
        recovered_at = None
        while time.monotonic() - applied_at < timeout_s + 15:
            ok = lab.new_connection_ok(timeout=0.5)
            status = "SSH answers" if ok else "connection timed out"
            if status != last:
                _say(f"   t+{time.monotonic() - applied_at:5.1f} s  {status}")
                last = status
            if ok:
                recovered_at = time.monotonic()
                break
            time.sleep(0.5)
        if recovered_at is None:
            raise EnvironmentProblem("the demo failed: SSH did not come back")
        _say()
        _say("4. The guard put the old rules back. A new SSH login, and what fwsafe recorded:",
             bold=True)
        login = lab.ssh("fwsafe status", timeout=20)
        for line in login.stdout.splitlines():
            _say(f"   | {line}")
        same = lab.ruleset() == before
        _say(f"   ruleset identical to the one before the change: {'yes' if same else 'NO'}")
        _say()
        _say(f"Recovered {recovered_at - applied_at:.1f} s after the change was applied "
             f"(deadline {timeout_s:g} s), with the admin's session long dead.", bold=True)
        _say("With iptables-apply, the revert timer dies with the session: this server would "
             "stay locked out.")
        if not (login.returncode == 0 and same):
            raise EnvironmentProblem("the demo failed: see the output above")
        return {"ok": True, "refused_exit": refused.returncode, "timeout_s": timeout_s,
                "session_lost_s": round(killed_at - applied_at, 2),
                "recovered_s": round(recovered_at - applied_at, 2), "ruleset_identical": same}
    finally:
        if keep:
            _say(f"(lab files kept in {lab.workdir})")
        lab.close()


def _wait_for_pending(state_dir: Path, limit_s: float = 30) -> float:
    # the state directory's readers: only while the demo waits for its change
    from fwsafe.core.statedir import StateDir
    from fwsafe.core.transaction import PENDING, load_current
    from fwsafe.errors import StateError

    state = StateDir(state_dir)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            record = load_current(state) if state.exists() else None
        except StateError:  # written by the session right now: look again
            record = None
        if record is not None and record.state == PENDING:
            return time.monotonic()
        time.sleep(0.05)
    raise EnvironmentProblem("the demo failed: the change was not applied in the session")


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_demo()
