"""The guard: the dead-man's switch that reverts a change unless it is confirmed.

It is a process of its own, started before the change is applied, that outlives the CLI and
the SSH session that started it:

* where systemd is PID 1 it runs as a transient unit (``systemd-run``), so that logind's
  KillUserProcesses cannot end it with the session; elsewhere it is a double-forked ``setsid``
  daemon with no controlling terminal;
* it ignores SIGHUP, SIGINT, SIGQUIT and SIGPIPE; SIGTERM makes it revert at once;
* it sets its own ``oom_score_adj`` to -1000, which the restore commands it runs inherit;
  where that is refused (no CAP_SYS_RESOURCE) it carries on and records that it is not shielded;
* it reads the snapshot and the change into memory before it applies anything, so that nothing
  a session deletes can stop the revert;
* it applies the change itself, after it is armed, so that a deadline can never pass between
  arming and applying;
* at the deadline, on ``fwsafe revert``, on SIGTERM or when a probe fails N times in a row it
  restores the snapshot, retrying while processes cannot be started for lack of memory, then
  checks that the touched layers equal the snapshot again;
* it runs in the network namespace of the CLI that started it.

Requests (``fwsafe confirm``, ``revert``, ``extend``, ``status``) arrive as one JSON line on a
Unix socket in the state directory; the guard answers with one JSON line.

This module is imported by the guard process alone: it keeps its imports small (RSS).
"""

from __future__ import annotations

import json
import math
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from fwsafe.backends import compose_partial, layer_for
from fwsafe.backends.base import ApplyError
from fwsafe.core import snapshot, transaction
from fwsafe.core.revert import RevertResult, compute_touched, revert_change
from fwsafe.core.statedir import StateDir, open_private
from fwsafe.core.transaction import Record
from fwsafe.guard.backstop import pidfd_of, start_watcher
from fwsafe.guard.spawn import systemd_is_init

OOM_SHIELD = -1000
REQUEST_LIMIT = 65536
MIN_SECONDS = 1.0
DEFAULT_MAX_TIMEOUT = 86400.0  # = fwsafe.config.DEFAULT_MAX_TIMEOUT (not imported: small RSS)
#: The deadline is kept on this clock: it counts time spent suspended and ignores wall-clock
#: steps (NTP, `date -s`), unlike time.monotonic() (no suspend) and time.time() (steps).
DEADLINE_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def boottime() -> float:
    return time.clock_gettime(DEADLINE_CLOCK)


def max_seconds(record: Record) -> float:
    """The longest timeout or extension the guard accepts (max_timeout, recorded by the CLI)."""
    value = record.options.get("max_timeout", DEFAULT_MAX_TIMEOUT)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= MIN_SECONDS
    return float(value) if ok else DEFAULT_MAX_TIMEOUT


def seconds_problem(value: Any, maximum: float) -> str | None:
    """Why `value` is not an acceptable number of seconds (finite, 1 .. maximum), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"seconds must be a number, got {value!r}"
    if not math.isfinite(value) or not MIN_SECONDS <= value <= maximum:
        return f"seconds must be from {MIN_SECONDS:g} to {maximum:g}, got {value!r}"
    return None


# --------------------------------------------------------------------------------------------
# The guard process
# --------------------------------------------------------------------------------------------
def system_stopping() -> bool:
    """True while systemd is shutting the machine down (or rebooting it)."""
    if not systemd_is_init():
        return False
    try:
        result = subprocess.run(["systemctl", "is-system-running"], capture_output=True,
                                text=True, timeout=3, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.stdout.strip() == "stopping"


def set_oom_shield(value: int = OOM_SHIELD) -> tuple[bool, str | None]:
    """Lower our oom_score_adj; children inherit it. Returns (shielded, why not)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(value))
    except OSError as exc:
        return False, f"cannot set oom_score_adj to {value}: {exc.strerror} (needs CAP_SYS_RESOURCE)"
    try:
        current = int(Path("/proc/self/oom_score_adj").read_text().strip())
    except (OSError, ValueError) as exc:
        return False, f"cannot read oom_score_adj back: {exc}"
    if current != value:
        return False, f"oom_score_adj is {current}, not {value}"
    return True, None


class ProbeLoop(threading.Thread):
    """Runs the guard's probes every interval and hands each round's results to the guard."""

    def __init__(self, urls: Sequence[str], interval: float, timeout: float, wake: int) -> None:
        super().__init__(daemon=True, name="probes")
        self.urls = list(urls)
        self.interval = interval
        self.timeout = timeout
        self.wake = wake
        self.results: queue.Queue[list[tuple[str, bool, str | None]]] = queue.Queue()
        self.stopped = threading.Event()

    def run(self) -> None:
        from fwsafe.probes import parse_probe, run_probes

        probes = [parse_probe(url) for url in self.urls]
        while not self.stopped.is_set():
            started = time.monotonic()
            results = run_probes(probes, timeout=self.timeout)
            self.results.put([(r.url, r.ok, r.error) for r in results])
            try:
                os.write(self.wake, b"p")
            except OSError:
                pass
            self.stopped.wait(max(0.0, self.interval - (time.monotonic() - started)))


class Guard:
    def __init__(self, state: StateDir, record: Record, mode: str, log: TextIO) -> None:
        self.state = state
        self.record = record
        self.mode = mode
        self.logfile = log
        self.layers = list(record.layers)
        # Everything needed to revert is read into memory before anything is changed.
        self.before = snapshot.load(state, record.id, snapshot.BEFORE, record.captured)
        self.change = snapshot.load(state, record.id, snapshot.CHANGE, self.layers)
        self.after: dict[str, bytes] | None = None   # captured right after the change
        self.backstop: subprocess.Popen[bytes] | None = None   # setsid mode: the watcher
        self.backstop_fd: int | None = None
        self.applied = False
        self.deadline_boot = 0.0  # the deadline on DEADLINE_CLOCK (boottime())
        self.done = False
        self.failures: dict[str, int] = {}
        self.passes: dict[str, int] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.terminate = False
        self.server: socket.socket | None = None
        self.probe_loop: ProbeLoop | None = None

    # -- bookkeeping ------------------------------------------------------------------------
    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.logfile.write(f"{stamp} [{os.getpid()}] {message}\n")
            self.logfile.flush()
        except (OSError, ValueError):
            pass

    def save(self) -> None:
        """Write the record; keep going when the disk refuses (the revert matters more)."""
        for attempt in range(5):
            try:
                transaction.save_record(self.state, self.record)
                return
            except (OSError, MemoryError) as exc:
                self.log(f"cannot write the record (attempt {attempt + 1}): {exc}")
                time.sleep(0.1)

    def set_deadline(self, deadline: float) -> None:
        """Arm the deadline `deadline` (Unix time, kept in the record for display); the guard
        itself counts on CLOCK_BOOTTIME from now on."""
        self.record.deadline = deadline
        self.deadline_boot = boottime() + (deadline - time.time())

    def extend_deadline(self, seconds: float) -> None:
        """Push the deadline back; the wall-clock deadline in the record is recomputed from the
        boottime one (so that it is right again after a wall-clock step)."""
        self.deadline_boot += seconds
        self.record.deadline = time.time() + self.remaining()

    def remaining(self) -> float:
        """Seconds left until the deadline, as the guard counts them."""
        return max(0.0, self.deadline_boot - boottime())

    def max_seconds(self) -> float:
        return max_seconds(self.record)

    # -- life cycle -------------------------------------------------------------------------
    def arm(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.set_wakeup_fd(self.wake_w)
        shielded, why = set_oom_shield()
        self.record.shielded = shielded
        self.record.shield_error = why
        self.record.guard_pid = os.getpid()
        self.record.guard_mode = self.mode
        if shielded:
            self.log("oom_score_adj set to -1000: shielded from the OOM killer")
        else:
            self.log(f"NOT shielded from the OOM killer: {why}")
        path = self.state.socket_path
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)  # the socket is created 0600: no chmod through a path
        try:
            server.bind(str(path))
        finally:
            os.umask(mask)
        server.listen(16)
        server.setblocking(False)
        self.server = server

    def _on_term(self, signum: int, frame: object) -> None:
        self.terminate = True

    def begin(self) -> None:
        """preparing -> applying, written before anything changes (`main` holds the
        transaction's lock meanwhile). Raises when it cannot be written: nothing is applied."""
        self.record.transition(transaction.APPLYING, f"guard {os.getpid()} armed ({self.mode})")
        transaction.save_record(self.state, self.record)

    def start_backstop(self) -> None:
        """Make sure something reverts if this guard dies (fwsafe.guard.backstop)."""
        if self.mode == "systemd-run":
            unit = f"fwsafe-guard-{self.record.id}.service"
            self.record.backstop = {"kind": "systemd", "unit": unit,
                                    "how": f"ExecStopPost= of {unit}, run by systemd"}
            return
        try:
            self.backstop = start_watcher(self.state.root, self.record.id,
                                          self.state.tx_dir(self.record.id) / "backstop.log")
        except OSError as exc:
            self.log(f"cannot start the backstop watcher: {exc}; trying again in 1 s")
            self.backstop, self.backstop_fd = None, None
            return
        self.backstop_fd = pidfd_of(self.backstop.pid)
        self.record.backstop = {"kind": "watcher", "pid": self.backstop.pid,
                                "how": f"watcher PID {self.backstop.pid} holds a pidfd of the "
                                       f"guard"}
        self.log(f"backstop: watcher PID {self.backstop.pid}")

    def backstop_died(self) -> None:
        """The watcher died (killed, OOM): reap it and start another while the change is open."""
        if self.backstop is not None:
            code = self.backstop.poll()
            self.log(f"the backstop watcher (PID {self.backstop.pid}) died (exit {code})")
        if self.backstop_fd is not None:
            os.close(self.backstop_fd)
        self.backstop, self.backstop_fd = None, None
        if not self.done:
            self.start_backstop()
            self.save()

    def stop_backstop(self) -> None:
        if self.backstop is not None and self.backstop.poll() is None:
            self.backstop.terminate()
            try:
                self.backstop.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.backstop.kill()
        if self.backstop_fd is not None:
            os.close(self.backstop_fd)
            self.backstop_fd = None

    def apply(self) -> bool:
        if self.record.state == transaction.PREPARING:
            self.begin()
        self.start_backstop()
        self.save()
        what = " ".join(self.record.run) if self.record.run else ", ".join(self.layers)
        self.log(f"armed; applying {what}")
        self.applied = True
        error = self._run_change()
        if error is not None:
            self.record_touched()
            self.log(f"change refused: {error}")
            self.record.error = error
            if not self.record.touched:
                self.record.reason = "the change was refused; nothing was changed"
                self.record.transition(transaction.REJECTED, error)
                self.save()
                return False
            # Part of it may be live: undo that as any revert, never giving up.
            self.record.transition(transaction.REVERTING, "the change failed part-way")
            self.save()
            result = self._undo()
            self.record.reason = ("the change was refused part-way; what had been applied is "
                                  "undone and verified, so nothing is changed")
            self.record.transition(transaction.REJECTED, "; ".join([error, *result.notes]))
            self.save()
            return False
        self.set_deadline(time.time() + self.record.timeout_s)
        self.record.transition(
            transaction.PENDING, f"applied; deadline in {self.record.timeout_s:g} s")
        self.save()  # the CLI returns now; what the change touched is worked out meanwhile
        self.log(f"applied; reverting at {time.ctime(self.record.deadline)} unless confirmed")
        self.record_touched()
        self.save()
        if self.record.probes:
            self.probe_loop = ProbeLoop(
                self.record.probes,
                float(self.record.options.get("probe_interval", 2.0)),
                float(self.record.options.get("probe_timeout", 3.0)),
                self.wake_w,
            )
            self.probe_loop.start()
        return True

    def record_touched(self) -> None:
        """Capture the watched layers again: what differs from the snapshot is what the change
        touched, and all that a revert will put back."""
        try:
            after = {name: layer_for(name).capture() for name in self.record.watch}
            self.record.touched = compute_touched(self.before, after)
            self.after = after
            try:  # for `recover` and the backstop, which merge from disk
                snapshot.save(self.state, self.record.id, snapshot.AFTER, after)
            except OSError as exc:
                self.log(f"cannot save the capture after the change: {exc}")
        except (ApplyError, OSError, ValueError) as exc:
            # Cannot tell what changed: treat every unit of the watched layers as touched.
            self.log(f"cannot capture after the change ({exc}); a revert restores whole layers")
            self.record.touched = {
                name: sorted(layer_for(name).units(self.before[name]))
                for name in self.record.watch}
        touched = ", ".join(f"{k}: {' '.join(v)}" for k, v in self.record.touched.items())
        self.log(f"touched: {touched or 'nothing'}")

    def _run_change(self) -> str | None:
        """Apply the rules files, or run the command; return the error, None when it worked."""
        if self.record.run:
            out_path = self.state.tx_dir(self.record.id) / "command.out"
            try:
                with open(out_path, "wb") as out:
                    result = subprocess.run(
                        self.record.run, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=subprocess.STDOUT, timeout=600, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"cannot run {self.record.run[0]}: {exc}"
            if result.returncode != 0:
                tail = out_path.read_text(errors="replace").strip().splitlines()[-3:]
                return (f"{' '.join(self.record.run)} failed (exit {result.returncode}): "
                        + " / ".join(tail))
            return None
        sources = self.record.options.get("sources", {})
        for name in self.layers:
            try:
                layer = layer_for(name)
                content = self.change[name]
                if self.record.options.get("partial"):
                    # Composed now, against the state of this very moment: what others did
                    # since the snapshot stays.
                    content = compose_partial(name, content, layer.capture())
                layer.apply(content, str(sources.get(name, name)))
            except Exception as exc:  # noqa: BLE001 - any failure here is a refused change
                return str(exc) or type(exc).__name__
        return None

    def revert(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if self.probe_loop:
            self.probe_loop.stopped.set()
        self.log(f"reverting: {reason}")
        self.record.reason = reason
        self.record.transition(transaction.REVERTING, reason)
        self.save()
        result = self._undo()
        self.record.transition(transaction.REVERTED, "; ".join(
            ["the change undone and verified", *result.notes]))
        self.log("reverted; the change's own delta is undone and verified"
                 + (f" after {result.attempts} attempts" if result.attempts > 1 else ""))
        self.save()

    def _undo(self) -> RevertResult:
        """Undo what the change touched; retry for as long as it takes (the change may be
        live: there is no giving up), saving each attempt in the record for `status`."""
        def attempt(number: int, why: str) -> None:
            self.record.revert_attempts = number
            self.record.revert_last_error = why
            self.save()

        result = revert_change(self.record.touched, self.before, self.after, log=self.log,
                               on_attempt=attempt)
        self.record.reverted_by = "guard"
        self.record.revert_attempts = result.attempts
        self.record.revert_last_error = None
        self.record.revert_notes = result.notes
        return result

    def confirm(self, by: dict[str, str]) -> None:
        self.done = True
        if self.probe_loop:
            self.probe_loop.stopped.set()
        self.record.confirmed_by = by
        detail = by.get("how", "confirmed")
        self.record.reason = detail
        self.record.transition(transaction.CONFIRMED, detail)
        self.save()
        self.log(f"confirmed: {detail}")
        try:  # keep the state as known good and write the boot files; the confirm stands
            from fwsafe.persistence.history import on_confirmed

            on_confirmed(self.state, self.record)
            self.log(self.record.events[-1].detail)
        except Exception as exc:  # noqa: BLE001 - visible in the log and the record
            self.log(f"history/persist FAILED: {exc}")
            self.record.log("persist-failed", str(exc))
            self.save()

    # -- requests -----------------------------------------------------------------------------
    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "status":
            left = self.remaining() if self.record.state == transaction.PENDING else None
            return {"ok": True, "record": self.record.to_json(),
                    "remaining_s": round(left, 1) if left is not None else None,
                    "clock": "boottime"}
        if self.record.state != transaction.PENDING:
            return {"ok": False, "state": self.record.state,
                    "error": f"transaction is {self.record.state}"}
        if op == "confirm":
            by = message.get("by") or {}
            self.confirm({str(k): str(v) for k, v in dict(by).items()})
            return {"ok": True, "state": self.record.state}
        if op == "revert":
            self.revert(str(message.get("reason") or "reverted on request"))
            return {"ok": self.record.state == transaction.REVERTED, "state": self.record.state,
                    "error": self.record.error}
        if op == "extend":
            seconds = message.get("seconds")
            problem = seconds_problem(seconds, self.max_seconds())
            if problem is not None:  # the CLI checks too; this is the second line of defence
                return {"ok": False, "state": self.record.state, "error": problem}
            assert isinstance(seconds, (int, float))
            self.extend_deadline(float(seconds))
            self.record.log("extended", f"+{seconds:g} s by {message.get('by', '?')}")
            self.save()
            self.log(f"deadline extended by {seconds:g} s")
            return {"ok": True, "state": self.record.state, "deadline": self.record.deadline}
        return {"ok": False, "state": self.record.state, "error": f"unknown request {op!r}"}

    def serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        try:
            data = b""
            while not data.endswith(b"\n") and len(data) < REQUEST_LIMIT:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            try:
                message = json.loads(data)
                if not isinstance(message, dict):
                    raise ValueError("not an object")
                answer = self.handle(message)
            except ValueError as exc:
                answer = {"ok": False, "error": f"bad request: {exc}"}
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError as exc:
            self.log(f"request failed: {exc}")
        finally:
            conn.close()

    def take_probe_results(self) -> None:
        if self.probe_loop is None:
            return
        needed = int(self.record.options.get("probe_failures", 3))
        confirm_after = int(self.record.options.get("confirm_on_probe", 0) or 0)
        while not self.done:
            try:
                results = self.probe_loop.results.get_nowait()
            except queue.Empty:
                return
            for url, ok, error in results:
                if ok:
                    self.failures[url] = 0
                    self.passes[url] = self.passes.get(url, 0) + 1
                    continue
                self.passes[url] = 0
                self.failures[url] = self.failures.get(url, 0) + 1
                self.log(f"probe {url} failed ({self.failures[url]}/{needed}): {error}")
                if self.failures[url] >= needed:
                    self.revert(f"probe {url} failed {needed} times in a row: {error}")
                    return
            if confirm_after and all(self.passes.get(u, 0) >= confirm_after
                                     for u in self.record.probes):
                self.confirm({"how": f"every probe passed {confirm_after} times in a row"})
                return

    def wait(self) -> None:
        assert self.server is not None
        while not self.done:
            if self.terminate:
                self.revert(
                    "reboot or shutdown: systemd stopped the guard while the change was pending; "
                    "it was undone before the machine went down" if system_stopping() else
                    "the guard was terminated (SIGTERM) before confirmation")
                break
            left = self.deadline_boot - boottime()
            if left <= 0:
                self.revert(
                    f"timeout: not confirmed within {self.record.timeout_s:g} s"
                    + (" (deadline extended)" if any(e.event == "extended"
                                                     for e in self.record.events) else ""))
                break
            if self.mode != "systemd-run" and self.backstop is None:
                self.start_backstop()  # it could not be started before: try again
            try:
                watched: list[Any] = [self.server, self.wake_r]
                if self.backstop_fd is not None:
                    watched.append(self.backstop_fd)
                readable, _, _ = select.select(watched, [], [], min(left, 1.0))
            except InterruptedError:
                continue
            if self.backstop_fd is not None and self.backstop_fd in readable:
                self.backstop_died()
            if self.wake_r in readable:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                self.take_probe_results()
            if self.server in readable and not self.done:
                try:
                    conn, _ = self.server.accept()
                except BlockingIOError:
                    continue
                self.serve_one(conn)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                self.state.socket_path.unlink()
            except FileNotFoundError:
                pass


def _detach_signals() -> None:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE,
                signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in ("--daemonize", "--foreground"):
        print("usage: python -m fwsafe.guard.process --daemonize|--foreground STATE_DIR TX_ID",
              file=sys.stderr)
        return 2
    how, state_dir, tx_id = args
    _detach_signals()
    # Second fork: the session leader exits, the guard can never regain a terminal.
    if how == "--daemonize" and os.fork() > 0:
        os._exit(0)
    mode = "setsid" if how == "--daemonize" else "systemd-run"
    state = StateDir(Path(state_dir))
    log_fd = open_private(state.tx_dir(tx_id) / "guard.log", os.O_WRONLY | os.O_APPEND)
    log = os.fdopen(log_fd, "a")  # held for the guard's lifetime
    guard: Guard | None = None
    try:
        # Under the transaction's lock, which the CLI also holds when it gives up and marks
        # the transaction aborted: a guard that starts late sees `aborted` and applies nothing,
        # and the CLI never aborts a transaction this guard has begun to apply.
        with state.tx_locked(tx_id):
            record = transaction.load_record(state, tx_id)
            if record.state != transaction.PREPARING:
                log.write(f"transaction {tx_id} is {record.state}, not preparing: "
                          "nothing to guard\n")
                return 1
            problem = seconds_problem(record.timeout_s, max_seconds(record))
            if problem is not None:  # the CLI checks too; this is the second line of defence
                record.reason = f"the guard refused the timeout: {problem}; nothing was changed"
                record.transition(transaction.ABORTED, record.reason)
                transaction.save_record(state, record)
                log.write(record.reason + "\n")
                return 1
            config = record.options.get("config")
            if isinstance(config, str) and config:
                os.environ["FWSAFE_CONFIG"] = config  # the CLI's config, read again on confirm
            guard = Guard(state, record, mode, log)
            guard.arm()
            guard.begin()
        if guard.apply():
            guard.wait()
    except BaseException as exc:  # the revert must happen whatever went wrong
        if guard is None:
            log.write(f"guard error before arming: {exc!r}\n")
            raise
        guard.log(f"guard error: {exc!r}")
        if guard.applied and not guard.done and guard.record.state in (
                transaction.APPLYING, transaction.PENDING):
            guard.revert(f"the guard hit an internal error: {exc!r}")
        raise
    finally:
        if guard is not None:
            guard.stop_backstop()
            guard.close()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
