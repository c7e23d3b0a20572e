"""The transaction manager: what `apply`, `confirm`, `revert`, `extend`, `status` and `recover`
do, independent of the command line and of any one firewall backend.

apply: validate -> snapshot -> record durably -> start the guard -> the guard applies ->
wait until the guard reports the change live (or refused).
"""

from __future__ import annotations

import errno
import math
import os
import select
import signal
import stat
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fwsafe.backends import ALL_LAYERS, ApplyError, available_layers, compose_partial, layer_for
from fwsafe.config import DEFAULT_MAX_RULES_BYTES, DEFAULT_MAX_TIMEOUT
from fwsafe.core import snapshot, transaction
from fwsafe.core.revert import compute_touched, revert_change
from fwsafe.core.statedir import StateDir, make_private_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import (
    ChangeMayBeLiveError,
    EnvironmentProblem,
    GuardError,
    InvalidRulesError,
    LockoutRefused,
    NoTransactionError,
    PendingError,
    RevertedError,
    RevertFailedError,
    StateError,
    UsageError,
)
from fwsafe.guard import spawn as guard
from fwsafe.runner import find_binary

MAX_RULES_BYTES = DEFAULT_MAX_RULES_BYTES  # max_rules_bytes in the config
RECOVER_GIVE_UP_S = 120.0    # a one-shot recover retries this long before it says revert-failed
FILE_LAYERS = ("ufw",)       # layers kept in files, not in the kernel
GUARD_ARM_TIMEOUT = 30.0     # the guard must have started applying by then
GUARD_APPLY_TIMEOUT = 900.0  # and have finished applying by then
TX_LOCK_TIMEOUT = 10.0       # the guard holds a transaction's lock only while it arms
LIVE_HINT = ("run `fwsafe status`; if its guard is gone, `fwsafe recover` puts the old rules "
             "back")


@dataclass
class Change:
    """A change to apply: the new content of each layer it touches, and where it came from."""

    layers: dict[str, bytes] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    run: list[str] | None = None      # command mode: a command (e.g. ufw ...) run under the guard
    notes: list[str] = field(default_factory=list)
    partial: bool = False             # replace only the chains (nft: tables) the files name

    def add(self, layer: str, content: bytes, source: str) -> None:
        self.layers[layer] = content
        self.sources[layer] = source


def resolve_partial(change: Change, live: Mapping[str, bytes]) -> Change:
    """The change as complete files (what validation, the check and the diff look at)."""
    if not change.partial or change.run is not None:
        return change
    layers = {name: compose_partial(name, content, live.get(name))
              for name, content in change.layers.items()}
    return Change(layers=layers, sources=dict(change.sources), notes=list(change.notes))


@dataclass
class ApplyOptions:
    timeout_s: float = 60.0
    probes: list[str] = field(default_factory=list)
    probe_interval: float = 2.0
    probe_failures: int = 3
    probe_timeout: float = 3.0
    confirm_on_probe: int = 0
    command: list[str] = field(default_factory=list)
    check: bool = True       # predict a lockout first (fwsafe.check.predict) ...
    force: bool = False      # ... and apply even when one is predicted (or neighbours'
                             # chains would be deleted)
    partial: bool = False    # --host: passed on to the host's apply
    config_path: str | None = None          # the config file the CLI read (the guard reads it too)
    max_timeout: float = DEFAULT_MAX_TIMEOUT  # the guard refuses an `extend` beyond it
    boot_hook: bool = True   # on a systemd host, install the boot recovery unit first


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def _read_capped(fd: int, limit: int, name: str) -> bytes:
    """Everything up to end of file, refusing more than `limit` bytes (exit 3)."""
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))
        except BlockingIOError:  # a non-blocking standard input: wait for data
            select.select([fd], [], [])
            continue
        except InterruptedError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise InvalidRulesError(
                f"{name}: larger than the limit of {_size_text(limit)} (max_rules_bytes); "
                "nothing was changed", path=name)


def read_rules_file(path: str, limit: int | None = None) -> bytes:
    """Read a rules file: a regular file (a symlink to one is fine) or `-` for standard input,
    at most `limit` bytes (max_rules_bytes; 64 MiB by default). Every way this can fail is a
    clear exit-3 error naming the file, and none can hang: a directory, FIFO, device or socket
    is refused unread (stat first; then opened O_NONBLOCK and checked again with fstat)."""
    limit = MAX_RULES_BYTES if limit is None else limit
    if path == "-":
        try:
            data = _read_capped(0, limit, "standard input")
        except OSError as exc:
            raise InvalidRulesError(f"standard input: cannot read: {exc.strerror}",
                                    path=path) from exc
    else:
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise InvalidRulesError(f"{path}: is {_file_kind(mode)}, not a rules file",
                                        path=path)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise InvalidRulesError(f"{path}: no such file", path=path) from exc
        except PermissionError as exc:
            raise InvalidRulesError(f"{path}: permission denied", path=path) from exc
        except OSError as exc:
            why = "is a socket" if exc.errno == errno.ENXIO else f"cannot read: {exc.strerror}"
            raise InvalidRulesError(f"{path}: {why}", path=path) from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
                raise InvalidRulesError(f"{path}: is {_file_kind(st.st_mode)}, not a rules file",
                                        path=path)
            if st.st_size > limit:
                raise InvalidRulesError(
                    f"{path}: {_size_text(st.st_size)}, larger than the limit of "
                    f"{_size_text(limit)} (max_rules_bytes); nothing was changed", path=path)
            data = _read_capped(fd, limit, path)
        except OSError as exc:
            raise InvalidRulesError(f"{path}: cannot read: {exc.strerror}", path=path) from exc
        finally:
            os.close(fd)
    if b"\0" in data:
        raise InvalidRulesError(f"{path}: binary data, not a rules file", path=path)
    return data


def change_from_files(paths: Sequence[str], rules6: str | None, backend: str = "auto", *,
                      limit: int | None = None) -> Change:
    """A Change from rules files: iptables-save (IPv4) or nft files (recognised by content, or
    `backend`), at most one of each, and an ip6tables-save file. Every read error is exit 3;
    `limit` is max_rules_bytes."""
    from fwsafe.backends.nftables import looks_like_nft

    change = Change()
    for path in paths:
        content = read_rules_file(path, limit)
        nft = backend == "nft" or (backend == "auto" and looks_like_nft(content))
        layer = "nft" if nft else "ipv4"
        if layer in change.layers:
            raise UsageError(f"{path}: a second {'nft' if nft else 'IPv4'} rules file; give at most "
                             "one iptables-save file (IPv4), one nft file and --rules6 for IPv6")
        change.add(layer, content, path)
    if rules6:
        change.add("ipv6", read_rules_file(rules6, limit), rules6)
    return change


def require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "fwsafe must run as root to change the firewall (try: sudo fwsafe ...)")


def same_ssh_connection(a: dict[str, str], b: dict[str, str]) -> bool:
    return bool(a.get("SSH_CONNECTION")) and a.get("SSH_CONNECTION") == b.get("SSH_CONNECTION")


def describe_confirmer(who: dict[str, str], applied_by: dict[str, str]) -> str:
    conn = who.get("SSH_CONNECTION")
    if not conn:
        return "confirmed by `fwsafe confirm` outside SSH (local console or script)"
    client = " ".join(conn.split()[:2])
    if same_ssh_connection(who, applied_by):
        return (f"confirmed from the SAME SSH connection that applied the change ({client}): "
                "this proves only that established connections survive")
    return f"confirmed by `fwsafe confirm` from a new SSH connection ({client})"


def validate_change(change: Change) -> None:
    """Refuse a change that cannot work, before anything is captured or changed (exit 3)."""
    if change.run is not None:
        if not change.run:
            raise UsageError("give the command to run after `--`, e.g. -- ufw deny 23/tcp")
        if find_binary(change.run[0]) is None and not os.access(change.run[0], os.X_OK):
            raise InvalidRulesError(f"{change.run[0]}: command not found; nothing was changed")
        return
    for name, content in change.layers.items():
        layer = layer_for(name)
        layer.check_tools()
        layer.validate(content, change.sources[name])


class Manager:
    def __init__(self, state: StateDir) -> None:
        self.state = state

    # -- reading ------------------------------------------------------------------------------
    def current(self) -> Record | None:
        if not self.state.exists():
            return None
        return transaction.load_current(self.state)

    def _pending(self, tx_id: str | None) -> Record:
        record = self.current()
        if record is None:
            raise NoTransactionError("no transaction: nothing has been applied with fwsafe here")
        if tx_id and tx_id != record.id:
            raise NoTransactionError(
                f"transaction {tx_id} is not the current one (the current one is {record.id})")
        return record

    # -- apply --------------------------------------------------------------------------------
    def validate(self, change: Change) -> None:
        validate_change(change)

    @staticmethod
    def watched_layers(change: Change, captured: list[str]) -> list[str]:
        """The layers the change can alter, compared after the apply to find what it touched."""
        if change.run is not None:
            return list(captured)
        watch = set(change.layers)
        if "nft" in change.layers:  # `flush ruleset` also wipes the tables of iptables-nft
            watch |= {"ipv4", "ipv6"}
        return [name for name in captured if name in watch]

    def refuse_if_open(self) -> None:
        record = self.current()
        if record is None:
            return
        if record.state in transaction.OPEN_STATES or record.state == transaction.PREPARING:
            if transaction.guard_alive(record):
                raise PendingError(
                    f"transaction {record.id} is {record.state} (guard PID {record.guard_pid})",
                    hint="confirm it (`fwsafe confirm`), revert it (`fwsafe revert`) "
                         "or wait for its deadline",
                )
            raise PendingError(
                f"transaction {record.id} is {record.state} but its guard is gone",
                hint="run `fwsafe recover` to restore its snapshot, or `fwsafe confirm` to keep it",
            )
        if record.state == transaction.REVERT_FAILED:
            raise PendingError(
                f"the revert of transaction {record.id} failed: the firewall is in an unknown state",
                hint="run `fwsafe recover` to retry the restore, then check `fwsafe status`",
            )

    def apply(self, change: Change, options: ApplyOptions) -> Record:
        """Apply `change` under a guard; return the record once the change is live (pending).

        Raises InvalidRulesError (nothing changed), PendingError, GuardError,
        RevertFailedError (the refused change could not be undone).
        """
        require_root()
        self.state.ensure()
        with self.state.locked():
            self.refuse_if_open()
            self._ensure_boot_hook(change, options)
            layers = available_layers()
            with ThreadPoolExecutor(max_workers=len(layers) + 1) as pool:
                # The snapshot is taken after the lockout check (which takes a while), so that
                # it is as close as can be to the change; without the check (or for a partial
                # change, which needs the live state to be checked), the layers are captured
                # while the change is validated.
                early = not options.check or change.partial
                captures = self._start_capture(pool, layers) if early else {}
                if change.partial:
                    complete = resolve_partial(change, self._collect(captures, list(change.layers)))
                else:
                    complete = change
                self.validate(complete)
                verdict = self._check(complete, options)
                captures = captures or self._start_capture(pool, layers)
                captured = self._collect(captures, list(change.layers))
            self._refuse_deleting_neighbours(change, captured, options)
            tx_id = transaction.new_tx_id()
            make_private_dir(self.state.tx_dir(tx_id))
            snapshot.save(self.state, tx_id, snapshot.BEFORE, captured)
            snapshot.save(self.state, tx_id, snapshot.CHANGE, change.layers)
            record = Record(
                id=tx_id, state=transaction.PREPARING, created=time.time(),
                timeout_s=options.timeout_s, backend="command" if change.run else "rules",
                layers=list(change.layers), run=change.run, captured=sorted(captured),
                watch=self.watched_layers(change, list(captured)), notes=change.notes,
                who=transaction.who_am_i(), command=options.command, probes=options.probes,
                options={"probe_interval": options.probe_interval,
                         "probe_failures": options.probe_failures,
                         "probe_timeout": options.probe_timeout,
                         "confirm_on_probe": options.confirm_on_probe,
                         "sources": change.sources,
                         "partial": change.partial,
                         "config": options.config_path,
                         "max_timeout": options.max_timeout,
                         "check": verdict},
                boot_id=transaction.current_boot_id(),
            )
            record.log(transaction.PREPARING, "validated; snapshot of " + ", ".join(sorted(captured)))
            transaction.save_record(self.state, record)
            self.state.set_current(tx_id)
            # From here until the guard reports, Ctrl-C would leave the user not knowing
            # whether the change is live: ignore it (the guard takes moments to apply).
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                record = self._start_guard(record, options)
            finally:
                signal.signal(signal.SIGINT, previous)
        if record.state == transaction.PENDING:
            return record
        if record.state == transaction.REJECTED:
            raise InvalidRulesError(record.error or "the change was refused",
                                    hint="nothing was changed")
        if record.state == transaction.REVERT_FAILED:
            raise RevertFailedError(
                f"the change was refused part-way and undoing it failed: {record.error}",
                hint="run `fwsafe recover`, and check the live rules with iptables-save")
        if record.state in transaction.OPEN_STATES:
            raise ChangeMayBeLiveError(
                f"transaction {record.id} is {record.state}: the change may be live",
                hint=LIVE_HINT)
        raise GuardError(f"transaction {record.id} ended as {record.state}: {record.reason}")

    def _ensure_boot_hook(self, change: Change, options: ApplyOptions) -> None:
        """A reboot while a change is pending must come back with the old rules: on a systemd
        host the boot recovery unit is installed before the first change (unless the config
        says boot_hook = false); if it cannot be, nothing is changed."""
        if not options.boot_hook or not guard.systemd_is_init():
            return
        from fwsafe.persistence import boothook

        try:
            done = boothook.ensure_on_systemd(str(self.state.root))
        except (OSError, ValueError) as exc:
            raise EnvironmentProblem(
                f"cannot install the boot recovery unit ({boothook.UNIT_NAME}): {exc}",
                hint="nothing was changed; fix that, or set boot_hook = false in the config "
                     "to apply without a way back after a reboot") from exc
        if done:
            change.notes.append(f"installed the boot recovery unit {boothook.UNIT_NAME}: a "
                                "reboot while a change is pending comes back with the old rules")

    @staticmethod
    def _refuse_deleting_neighbours(change: Change, captured: Mapping[str, bytes],
                                    options: ApplyOptions) -> None:
        """A full rules file that would delete fail2ban's, Docker's, ... chains is refused
        (exit 3) unless --force: it was most likely written before they created them."""
        from fwsafe.core.neighbours import deleted_neighbours, refusal_message

        found = deleted_neighbours(change.layers, captured, change.partial)
        if not found:
            return
        if not options.force:
            raise InvalidRulesError(
                refusal_message(found),
                hint="nothing was changed; apply only the chains the file names with "
                     "--partial, add them to the file, or delete them anyway with --force")
        change.notes.append("--force: " + refusal_message(found))

    @staticmethod
    def _check(change: Change, options: ApplyOptions) -> dict[str, Any]:
        """Run the lockout check; refuse a predicted lockout unless forced (exit 3)."""
        if not options.check:
            return {"ran": False, "summary": "lockout check skipped (--no-check)"}
        from fwsafe.check.precheck import precheck

        report = precheck(change)
        if report is None:
            return {"ran": False, "summary": "lockout check skipped: no SSH client known"}
        if report.lockout and not options.force:
            raise LockoutRefused(
                report.lockout_message(),
                hint="nothing was changed; fix the rule, or apply anyway with --force "
                     "(the guard still reverts it unless confirmed)")
        if report.lockout:
            summary = "LOCKOUT PREDICTED (applied with --force): " + report.lockout_message()
        else:
            passed = [v.path for v in report.verdicts if v.ok]
            summary = (f"the SSH path stays open for {', '.join(report.clients)} "
                       f"(port {report.port}; {len(passed)} path(s) tested)" if passed else
                       "no SSH path could be tested")
            unknown = [f"{v.path}: {v.detail}" if v.detail else v.path
                       for v in report.verdicts if v.ok is None]
            if unknown:
                summary += "; NOT checked: " + "; ".join(unknown[:3])
        return {"ran": True, "lockout": report.lockout, "summary": summary}

    @staticmethod
    def _start_capture(pool: ThreadPoolExecutor, layers: list[str]) -> dict[str, Future[bytes]]:
        """Snapshot every firewall layer this system has, in parallel: IPv4 and IPv6 together,
        legacy tables, native nftables, ufw's files."""
        return {name: pool.submit(layer_for(name).capture) for name in layers}

    @staticmethod
    def _collect(captures: dict[str, Future[bytes]], needed: list[str]) -> dict[str, bytes]:
        """A layer the change gives content for must be captured; another that cannot be read
        is left out of the snapshot (and of the revert)."""
        captured = {}
        for name, future in captures.items():
            try:
                captured[name] = future.result()
            except (OSError, ApplyError, ValueError) as exc:
                if name in needed:
                    raise EnvironmentProblem(f"cannot capture the {name} layer: {exc}") from exc
        missing = [n for n in needed if n not in captured]
        if missing:
            raise EnvironmentProblem(f"cannot capture {', '.join(missing)}: tools missing")
        return captured

    def _start_guard(self, record: Record, options: ApplyOptions) -> Record:
        """Start the guard and wait until it has applied the change (or refused it). Once the
        guard may have started, an error says "nothing changed" (exit 3) only when the record
        proves it (aborted under the transaction's lock); else the change may be live (exit 5)."""
        try:
            guard.spawn(self.state, record.id, config_path=options.config_path)
        except GuardError as exc:
            latest = self._abort(record, str(exc))
            if latest.state != transaction.ABORTED:
                raise ChangeMayBeLiveError(
                    f"{exc.message}; yet the guard started: transaction {record.id} is "
                    f"{latest.state} and the change may be live", hint=LIVE_HINT) from exc
            raise
        return self._wait_for_guard(record)

    def _abort(self, record: Record, why: str) -> Record:
        """Mark a transaction that is still preparing as aborted, under its lock (the guard
        moves it to applying under the same lock): a guard that starts later sees `aborted` and
        applies nothing. Returns the record as it is now: a guard that got there first has
        moved it on, and then nothing is aborted."""
        try:
            with self.state.tx_locked(record.id, timeout=TX_LOCK_TIMEOUT):
                latest = transaction.load_record(self.state, record.id)
                if latest.state != transaction.PREPARING:
                    return latest
                latest.reason = why
                latest.transition(transaction.ABORTED, why)
                transaction.save_record(self.state, latest)
                return latest
        except TimeoutError:  # the guard holds the lock: it is arming right now
            return transaction.load_record(self.state, record.id)

    def _wait_for_guard(self, record: Record) -> Record:
        started = time.monotonic()
        log = self.state.tx_dir(record.id) / "guard.log"
        while True:
            time.sleep(0.02)
            try:
                record = transaction.load_record(self.state, record.id)
            except StateError as exc:
                raise ChangeMayBeLiveError(
                    f"the guard was started but its record cannot be read ({exc.message}): "
                    "the change may be live", hint=f"{LIVE_HINT} (log: {log})") from exc
            undoing = (record.state == transaction.REVERTING and record.deadline is None
                       and transaction.guard_alive(record))   # a change refused part-way
            if record.state not in (transaction.PREPARING, transaction.APPLYING) \
                    and not undoing:
                return record
            waited = time.monotonic() - started
            if record.state == transaction.PREPARING and waited > GUARD_ARM_TIMEOUT:
                latest = self._abort(record, f"the guard did not arm within {GUARD_ARM_TIMEOUT:g} s")
                if latest.state == transaction.ABORTED:
                    raise GuardError(
                        f"the guard did not start within {GUARD_ARM_TIMEOUT:g} s; nothing was "
                        f"changed (see {log})")
                continue  # the guard got there first: wait for it as usual
            if record.state == transaction.APPLYING and not transaction.guard_alive(record):
                raise ChangeMayBeLiveError(
                    f"the guard of transaction {record.id} died while applying: the change may "
                    "be live", hint=f"{LIVE_HINT} (log: {log})")
            if waited > GUARD_APPLY_TIMEOUT:
                raise ChangeMayBeLiveError(
                    f"the guard has been {record.state} transaction {record.id} for "
                    f"{waited:.0f} s: the change may be live; unless confirmed, the guard "
                    "reverts it at its deadline", hint=f"{LIVE_HINT} (log: {log})")

    # -- confirm / revert / extend --------------------------------------------------------------
    def confirm(self, tx_id: str | None = None) -> Record:
        record = self._pending(tx_id)
        if record.state == transaction.CONFIRMED:
            return record  # confirming twice is not an error: scripts may retry
        self._raise_if_final(record, "confirm")
        who = transaction.who_am_i()
        how = describe_confirmer(who, record.who)
        if transaction.guard_alive(record):
            answer = guard.request(self.state, "confirm", by={**who, "how": how})
            record = transaction.load_record(self.state, record.id)
            if not answer.get("ok"):
                self._raise_if_final(record, "confirm")
                raise GuardError(f"the guard refused to confirm: {answer.get('error')}")
            return record
        with self.state.locked(wait=True):
            record = transaction.load_record(self.state, record.id)
            if record.state != transaction.PENDING:
                self._raise_if_final(record, "confirm")
                raise GuardError(f"transaction {record.id} is {record.state}; cannot confirm")
            record.confirmed_by = {**who, "how": how + " (guard was gone)"}
            record.reason = record.confirmed_by["how"]
            record.transition(transaction.CONFIRMED, record.reason)
            transaction.save_record(self.state, record)
            try:  # keep the state as known good and write the boot files; the confirm stands
                from fwsafe.persistence.history import on_confirmed

                on_confirmed(self.state, record)
            except Exception as exc:  # noqa: BLE001 - visible in the record's events
                record.log("persist-failed", str(exc))
                transaction.save_record(self.state, record)
        return record

    def revert(self, tx_id: str | None = None, reason: str = "reverted by `fwsafe revert`") -> Record:
        record = self._pending(tx_id)
        self._raise_if_final(record, "revert")
        if transaction.guard_alive(record):
            guard.request(self.state, "revert", timeout=600, reason=reason)
            record = transaction.load_record(self.state, record.id)
        else:
            record = self.recover(reason=reason + " (guard was gone)")
        if record.state == transaction.REVERT_FAILED:
            raise RevertFailedError(f"the revert FAILED: {record.error}",
                                    hint="the firewall may hold the new rules; run `fwsafe recover`")
        return record

    def extend(self, seconds: float, tx_id: str | None = None) -> Record:
        record = self._pending(tx_id)
        self._raise_if_final(record, "extend")
        if not transaction.guard_alive(record):
            raise GuardError(f"the guard of transaction {record.id} is gone; nothing to extend",
                             hint="run `fwsafe recover` or `fwsafe confirm`")
        answer = guard.request(self.state, "extend", seconds=seconds,
                               by=transaction.who_am_i().get("SSH_CONNECTION", "local"))
        record = transaction.load_record(self.state, record.id)
        if not answer.get("ok"):
            self._raise_if_final(record, "extend")
            raise GuardError(f"the guard refused to extend: {answer.get('error')}")
        return record

    def _raise_if_final(self, record: Record, verb: str) -> None:
        if record.state == transaction.REVERTED:
            raise RevertedError(
                f"too late to {verb}: transaction {record.id} was reverted: {record.reason}")
        if record.state == transaction.REVERT_FAILED:
            raise RevertFailedError(
                f"transaction {record.id}: the revert FAILED: {record.error}",
                hint="run `fwsafe recover` to retry the restore")
        if record.state == transaction.CONFIRMED and verb != "confirm":
            raise NoTransactionError(f"transaction {record.id} is already confirmed")
        if record.state in (transaction.ABORTED, transaction.REJECTED):
            raise NoTransactionError(
                f"transaction {record.id} was {record.state}: nothing was changed")

    # -- recover ------------------------------------------------------------------------------
    def recover(self, reason: str = "recovered by `fwsafe recover`: the guard was gone", *,
                by: str = "recover", tx_id: str | None = None,
                give_up_after: float | None = RECOVER_GIVE_UP_S) -> Record:
        """Undo a transaction that is still open but has no guard (the guard died, the machine
        rebooted, or the CLI was killed before the guard armed).

        After a reboot (another boot id, or a kernel that holds no rules at all while the
        snapshot had some) nothing is merged against the empty kernel: the boot files hold the
        old rules (they are written only on confirm), so only the files the change touched
        (ufw's) are put back, and the usual loaders bring the rules in."""
        require_root()
        if not self.state.exists():
            raise NoTransactionError("nothing to recover: fwsafe has no state here")
        with self.state.locked(wait=True):
            record = self.current()
            if record is not None and tx_id and record.id != tx_id:
                raise NoTransactionError(f"transaction {tx_id} is not the current one")
            if record is not None and record.state == transaction.PREPARING \
                    and not transaction.guard_alive(record):
                # Under the transaction's lock (see _abort): a guard arming right now wins.
                latest = self._abort(record, "the command that prepared it stopped before the "
                                             "guard armed: nothing was applied")
                if latest.state == transaction.ABORTED:
                    return latest
                record = latest
            if record is None or record.state not in (
                    transaction.APPLYING, transaction.PENDING, transaction.REVERTING,
                    transaction.REVERT_FAILED):
                raise NoTransactionError("nothing to recover: no transaction is pending")
            if transaction.guard_alive(record):
                raise PendingError(
                    f"transaction {record.id} still has its guard (PID {record.guard_pid})",
                    hint="use `fwsafe revert` or `fwsafe confirm`")
            before = snapshot.load(self.state, record.id, snapshot.BEFORE, record.captured)
            after = snapshot.load_optional(self.state, record.id, snapshot.AFTER, record.watch)
            if record.state != transaction.REVERTING:
                record.transition(transaction.REVERTING, reason)
            record.reason = reason
            rebooted = self._rebooted(record, before)
            touched = dict(record.touched)
            if not touched:
                # The guard died before it recorded what the change touched: compare now
                # (whatever differs from the snapshot is undone whole).
                watch = [n for n in record.watch if not rebooted or n in FILE_LAYERS]
                now = {name: layer_for(name).capture() for name in watch}
                touched = compute_touched(before, now)
                record.touched = touched
                after = {}
            if rebooted:
                touched = {n: u for n, u in touched.items() if n in FILE_LAYERS}
                by = "boot"
                record.reason = reason = (
                    "reboot: the change was still pending when the machine went down; the "
                    "kernel starts from the boot files, which hold the old rules"
                    + (f"; put back {', '.join(u for us in touched.values() for u in us)}"
                       if touched else ""))

            def attempt(number: int, why: str) -> None:
                record.revert_attempts = number
                record.revert_last_error = why
                transaction.save_record(self.state, record)

            result = revert_change(touched, before, after or None, on_attempt=attempt,
                                   give_up_after=give_up_after)
            record.revert_attempts = result.attempts
            record.revert_notes = result.notes
            record.reverted_by = by
            if result.problems:
                record.error = "; ".join(result.problems)
                record.transition(transaction.REVERT_FAILED, record.error)
            else:
                record.revert_last_error = None
                record.transition(transaction.REVERTED, "; ".join(
                    [f"undone and verified (by {by})", *result.notes]))
            transaction.save_record(self.state, record)
        return record

    @staticmethod
    def _rebooted(record: Record, before: Mapping[str, bytes]) -> bool:
        """The machine rebooted since the change: another boot id, or (where the boot id
        cannot tell, e.g. a network namespace) a kernel with no rules in any layer while the
        snapshot had some."""
        now_id = transaction.current_boot_id()
        if record.boot_id and now_id and record.boot_id != now_id:
            return True
        kernel = [n for n in record.captured if n not in FILE_LAYERS and n in before]
        if not any(layer_for(n).units(before[n]) for n in kernel):
            return False
        try:
            return not any(layer_for(n).units(layer_for(n).capture()) for n in kernel)
        except Exception:  # noqa: BLE001 - cannot tell: not a reboot, merge as usual
            return False

    # -- layers -------------------------------------------------------------------------------
    @staticmethod
    def layers_report() -> dict[str, Any]:
        """Which firewall layers this system has, which hold rules, and what deserves a warning
        (legacy and nf_tables iptables tables both in use: both filter packets)."""
        entries = []
        in_use: dict[str, bool] = {}
        for name in ALL_LAYERS:
            layer = layer_for(name)
            entry: dict[str, Any] = {"layer": name, "label": layer.label,
                                     "available": layer.available(), "in_use": False, "units": 0}
            if entry["available"]:
                try:
                    units = layer.units(layer.capture())
                except (ApplyError, OSError, ValueError) as exc:
                    entry["error"] = str(exc)
                else:
                    entry["units"] = len(units)
                    entry["in_use"] = bool(units)
            in_use[name] = bool(entry["in_use"])
            entries.append(entry)
        warnings = []
        for family in ("ipv4", "ipv6"):
            if in_use.get(f"{family}-legacy") and in_use.get(family):
                warnings.append(
                    f"{family}: both iptables-legacy and iptables-nf_tables tables hold rules; "
                    "both filter packets (see `iptables-legacy-save` and `iptables-save`)")
            elif in_use.get(f"{family}-legacy"):
                warnings.append(f"{family}: iptables-legacy tables hold rules while `iptables` "
                                "is nf_tables: `iptables -L` does not show them")
        return {"layers": entries, "warnings": warnings}

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        record = self.current()
        if record is None:
            return {"state": "none", "id": None, "deadline": None, "remaining_s": None,
                    "guard_pid": None, "reason": None, "shielded": None}
        alive = transaction.guard_alive(record)
        open_ = record.state in transaction.OPEN_STATES or record.state == transaction.PREPARING
        remaining = record.remaining_s()
        remaining_from = "record" if remaining is not None else None
        if alive and record.state == transaction.PENDING:
            record, remaining, remaining_from = self._ask_guard(record, remaining, remaining_from)
        return {
            "state": record.state,
            "id": record.id,
            "layers": record.layers,
            "created": record.created,
            "timeout_s": record.timeout_s,
            "deadline": record.deadline,
            "remaining_s": round(remaining, 1) if remaining is not None else None,
            "remaining_from": remaining_from,
            "guard_pid": record.guard_pid if open_ else None,
            "guard_alive": alive if open_ else None,
            "guard_mode": record.guard_mode,
            "shielded": record.shielded,
            "shield_error": record.shield_error,
            "reason": record.reason,
            "error": record.error,
            "who": record.who,
            "confirmed_by": record.confirmed_by,
            "probes": record.probes,
            "run": record.run,
            "captured": record.captured,
            "touched": record.touched,
            "notes": record.notes,
            "backstop": record.backstop,
            "reverted_by": record.reverted_by,
            "revert_attempts": record.revert_attempts,
            "revert_last_error": record.revert_last_error,
            "revert_notes": record.revert_notes,
            "events": [{"t": e.t, "event": e.event, "detail": e.detail} for e in record.events],
            "log": str(self.state.tx_dir(record.id) / "guard.log"),
        }

    def _ask_guard(self, record: Record, remaining: float | None, source: str | None
                   ) -> tuple[Record, float | None, str | None]:
        """The living guard's own view: its record, and the time left as it counts it
        (CLOCK_BOOTTIME: suspend counts, wall-clock steps do not). Falls back to the record on
        disk when the guard does not answer at once (busy reverting, or not ours to ask)."""
        try:
            answer = guard.request(self.state, "status", timeout=2.0)
            live = Record.from_json(dict(answer["record"]))
        except (GuardError, StateError, KeyError, TypeError, ValueError):
            return record, remaining, source
        left = answer.get("remaining_s")
        if live.id != record.id:
            return record, remaining, source
        if isinstance(left, (int, float)) and not isinstance(left, bool) and math.isfinite(left):
            return live, max(0.0, float(left)), "guard"
        return live, live.remaining_s(), "record" if live.remaining_s() is not None else None

