"""Starting the guard and talking to it: what runs in the CLI (see fwsafe.guard.process for
the guard itself).

Where systemd is PID 1 the guard is a transient unit (``systemd-run``) whose ExecStopPost= is the
backstop; elsewhere a double-forked ``setsid`` daemon that starts a watcher as its backstop.
Requests (``confirm``, ``revert``, ``extend``, ``status``) go as one JSON line on the Unix socket
in the state directory; the guard answers with one JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from fwsafe.core.statedir import StateDir, open_private
from fwsafe.errors import GuardError
from fwsafe.guard.backstop import after_stop_command

GUARD_MODULE = "fwsafe.guard"


# --------------------------------------------------------------------------------------------
# Starting the guard (runs in the CLI)
# --------------------------------------------------------------------------------------------
def systemd_is_init() -> bool:
    return os.path.isdir("/run/systemd/system")


def guard_mode() -> str:
    forced = os.environ.get("FWSAFE_GUARD_MODE")
    if forced in ("setsid", "systemd-run"):
        return forced
    return "systemd-run" if systemd_is_init() else "setsid"


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])   # the dir holding fwsafe/
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_parent + (os.pathsep + existing if existing else "")
    return env


def _passed_on(name: str) -> bool:
    return name.startswith(("FWSAFE_", "LC_")) or name in ("PATH", "LANG", "LANGUAGE")


def guard_env(config_path: str | None = None) -> dict[str, str]:
    """What the guard must get from the CLI in either spawn mode: the FWSAFE_* variables,
    PATH, LANG/LANGUAGE/LC_*, the PYTHONPATH that finds this fwsafe, and FWSAFE_CONFIG naming
    the config file the CLI read (--config or $FWSAFE_CONFIG)."""
    env = {name: value for name, value in os.environ.items() if _passed_on(name)}
    env["PYTHONPATH"] = _python_env()["PYTHONPATH"]
    if config_path:
        env["FWSAFE_CONFIG"] = config_path
    return env


def systemd_run_argv(state_dir: Path, tx_id: str, netns_pid: int,
                     config_path: str | None = None) -> list[str]:
    """The transient unit: its own cgroup (outside the session's scope), OOM-shielded, in the
    network namespace of the CLI that asked for it, with the CLI's relevant environment (a
    unit starts with the service manager's, not ours)."""
    return [
        "systemd-run", "--quiet", "--collect", f"--unit=fwsafe-guard-{tx_id}",
        "--property=OOMScoreAdjust=-1000",
        f"--property=NetworkNamespacePath=/proc/{netns_pid}/ns/net",
        # The backstop: systemd runs this whenever the guard's process is gone, however it
        # ended; it reverts if the transaction is still open (fwsafe.guard.backstop).
        f"--property=ExecStopPost={after_stop_command(state_dir, tx_id)}",
        *(f"--setenv={name}={value}" for name, value in sorted(guard_env(config_path).items())),
        sys.executable, "-m", GUARD_MODULE, "--foreground", str(state_dir), tx_id,
    ]


#: Transactions whose guard this process has started (or tried to): from then on, an error in
#: this process may leave a change live (see `fwsafe.cli.main`).
SPAWNED: list[str] = []


def spawn(state: StateDir, tx_id: str, config_path: str | None = None) -> str:
    """Start the guard for `tx_id`; return the mode used. The guard records its own PID."""
    SPAWNED.append(tx_id)
    mode = guard_mode()
    log_path = state.tx_dir(tx_id) / "guard.log"
    if mode == "systemd-run":
        argv = systemd_run_argv(state.root, tx_id, os.getpid(), config_path)
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise GuardError(f"systemd-run could not start the guard: {exc}") from exc
        if result.returncode != 0:
            raise GuardError(f"systemd-run could not start the guard: {result.stderr.strip()}")
        return mode
    try:
        log = open_private(log_path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        raise GuardError(f"cannot open {log_path}: {exc.strerror}") from exc
    try:
        intermediate = subprocess.Popen(
            [sys.executable, "-m", GUARD_MODULE, "--daemonize", str(state.root), tx_id],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
            start_new_session=True, close_fds=True,
            env={**os.environ, **guard_env(config_path)},
        )
    except OSError as exc:
        raise GuardError(f"the guard could not be started: {exc}") from exc
    finally:
        os.close(log)
    try:
        code = intermediate.wait(timeout=30)
    except subprocess.TimeoutExpired as exc:
        intermediate.kill()
        raise GuardError("the guard did not start within 30 s") from exc
    if code != 0:
        raise GuardError(f"the guard failed to start (exit {code}); see {log_path}")
    return mode


# --------------------------------------------------------------------------------------------
# Talking to the guard (runs in the CLI)
# --------------------------------------------------------------------------------------------
def request(state: StateDir, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """Send one request to the guard and return its answer."""
    payload = json.dumps({"op": op, **fields}).encode() + b"\n"
    path = str(state.socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(payload)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            raise GuardError(f"the guard does not answer on {path}: {exc}") from exc
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise GuardError(f"the guard sent a garbled answer: {exc}") from exc
    if not isinstance(answer, dict):
        raise GuardError("the guard sent a garbled answer")
    return answer


