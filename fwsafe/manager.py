"""The transaction manager: what `apply`, `confirm`, `revert`, `extend`, `status` and `recover`
do, independent of the command line and of any one firewall backend.

apply: validate -> snapshot -> record durably -> start the guard -> the guard applies ->
wait until the guard reports the change live (or refused).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe import guard, snapshot, transaction
from fwsafe.backends import ALL_LAYERS, ApplyError, available_layers, layer_for
from fwsafe.errors import (
    EnvironmentProblem,
    GuardError,
    InvalidRulesError,
    LockoutRefused,
    NoTransactionError,
    PendingError,
    RevertedError,
    RevertFailedError,
    UsageError,
)
from fwsafe.revert import compute_touched, revert_touched
from fwsafe.runner import find_binary
from fwsafe.statedir import StateDir, make_private_dir
from fwsafe.transaction import Record

MAX_RULES_BYTES = 256 * 1024 * 1024
GUARD_ARM_TIMEOUT = 30.0     # the guard must have started applying by then
GUARD_APPLY_TIMEOUT = 900.0  # and have finished applying by then


@dataclass
class Change:
    """A change to apply: the new content of each layer it touches, and where it came from."""

    layers: dict[str, bytes] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    run: list[str] | None = None      # command mode: a command (e.g. ufw ...) run under the guard
    notes: list[str] = field(default_factory=list)

    def add(self, layer: str, content: bytes, source: str) -> None:
        self.layers[layer] = content
        self.sources[layer] = source


@dataclass
class ApplyOptions:
    timeout_s: float = 60.0
    probes: list[str] = field(default_factory=list)
    probe_interval: float = 2.0
    probe_failures: int = 3
    probe_timeout: float = 3.0
    confirm_on_probe: int = 0
    command: list[str] = field(default_factory=list)
    check: bool = True       # predict a lockout first (fwsafe.check) ...
    force: bool = False      # ... and apply even when one is predicted


def read_rules_file(path: str) -> bytes:
    """Read a rules file; every way this can fail is a clear exit-3 error naming the file."""
    p = Path(path)
    try:
        if p.is_dir():
            raise InvalidRulesError(f"{path}: is a directory, not a rules file", path=path)
        data = p.read_bytes() if path != "-" else os.read(0, MAX_RULES_BYTES)
    except FileNotFoundError as exc:
        raise InvalidRulesError(f"{path}: no such file", path=path) from exc
    except PermissionError as exc:
        raise InvalidRulesError(f"{path}: permission denied", path=path) from exc
    except OSError as exc:
        raise InvalidRulesError(f"{path}: cannot read: {exc.strerror}", path=path) from exc
    if b"\0" in data:
        raise InvalidRulesError(f"{path}: binary data, not a rules file", path=path)
    return data


def change_from_files(paths: Sequence[str], rules6: str | None, backend: str = "auto") -> Change:
    """A Change from rules files: iptables-save (IPv4) or nft files (recognised by content, or
    `backend`), at most one of each, and an ip6tables-save file. Every read error is exit 3."""
    from fwsafe.backends.nftables import looks_like_nft

    change = Change()
    for path in paths:
        content = read_rules_file(path)
        nft = backend == "nft" or (backend == "auto" and looks_like_nft(content))
        layer = "nft" if nft else "ipv4"
        if layer in change.layers:
            raise UsageError(f"{path}: a second {'nft' if nft else 'IPv4'} rules file; give at most "
                             "one iptables-save file (IPv4), one nft file and --rules6 for IPv6")
        change.add(layer, content, path)
    if rules6:
        change.add("ipv6", read_rules_file(rules6), rules6)
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
            layers = available_layers()
            with ThreadPoolExecutor(max_workers=len(layers) + 1) as pool:
                # The snapshot is taken after the lockout check (which takes a while), so that
                # it is as close as can be to the change; without the check, the layers are
                # captured while the change is validated.
                captures = {} if options.check else self._start_capture(pool, layers)
                self.validate(change)
                verdict = self._check(change, options)
                captures = captures or self._start_capture(pool, layers)
                captured = self._collect(captures, list(change.layers))
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
                         "check": verdict},
            )
            record.log(transaction.PREPARING, "validated; snapshot of " + ", ".join(sorted(captured)))
            transaction.save_record(self.state, record)
            self.state.set_current(tx_id)
            # From here until the guard reports, Ctrl-C would leave the user not knowing
            # whether the change is live: ignore it (the guard takes moments to apply).
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                try:
                    guard.spawn(self.state, tx_id)
                except GuardError as exc:
                    self._abort(record, str(exc))
                    raise
                record = self._wait_for_guard(record)
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
        raise GuardError(f"transaction {record.id} ended as {record.state}: {record.reason}")

    @staticmethod
    def _check(change: Change, options: ApplyOptions) -> dict[str, Any]:
        """Run the lockout check; refuse a predicted lockout unless forced (exit 3)."""
        if not options.check:
            return {"ran": False, "summary": "lockout check skipped (--no-check)"}
        from fwsafe.precheck import precheck

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

    def _abort(self, record: Record, why: str) -> None:
        record.reason = why
        record.transition(transaction.ABORTED, why)
        transaction.save_record(self.state, record)

    def _wait_for_guard(self, record: Record) -> Record:
        started = time.monotonic()
        while True:
            time.sleep(0.02)
            record = transaction.load_record(self.state, record.id)
            if record.state not in (transaction.PREPARING, transaction.APPLYING):
                return record
            waited = time.monotonic() - started
            if record.state == transaction.PREPARING and waited > GUARD_ARM_TIMEOUT:
                self._abort(record, f"the guard did not arm within {GUARD_ARM_TIMEOUT:g} s")
                raise GuardError(
                    f"the guard did not start within {GUARD_ARM_TIMEOUT:g} s; nothing was "
                    f"changed (see {self.state.tx_dir(record.id) / 'guard.log'})")
            if record.state == transaction.APPLYING and not transaction.guard_alive(record):
                raise GuardError(
                    f"the guard died while applying; run `fwsafe recover` "
                    f"(log: {self.state.tx_dir(record.id) / 'guard.log'})")
            if waited > GUARD_APPLY_TIMEOUT:
                raise GuardError(f"the guard has been applying for {waited:.0f} s; "
                                 "it will revert at its deadline")

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
                from fwsafe.history import on_confirmed

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
    def recover(self, reason: str = "recovered by `fwsafe recover`: the guard was gone") -> Record:
        """Restore the snapshot of a transaction that is still open but has no guard."""
        require_root()
        if not self.state.exists():
            raise NoTransactionError("nothing to recover: fwsafe has no state here")
        with self.state.locked(wait=True):
            record = self.current()
            if record is None or record.state not in (
                    transaction.APPLYING, transaction.PENDING, transaction.REVERTING,
                    transaction.REVERT_FAILED):
                raise NoTransactionError("nothing to recover: no transaction is pending")
            if transaction.guard_alive(record):
                raise PendingError(
                    f"transaction {record.id} still has its guard (PID {record.guard_pid})",
                    hint="use `fwsafe revert` or `fwsafe confirm`")
            before = snapshot.load(self.state, record.id, snapshot.BEFORE, record.captured)
            if record.state != transaction.REVERTING:
                record.transition(transaction.REVERTING, reason)
            record.reason = reason
            if not record.touched:
                # The guard died before it recorded what the change touched: compare now.
                now = {name: layer_for(name).capture() for name in record.watch}
                record.touched = compute_touched(before, now)
            problems = revert_touched(record.touched, before)
            if problems:
                record.error = "; ".join(problems)
                record.transition(transaction.REVERT_FAILED, record.error)
            else:
                record.transition(transaction.REVERTED, "restored from the snapshot and verified")
            transaction.save_record(self.state, record)
        return record

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
        return {
            "state": record.state,
            "id": record.id,
            "layers": record.layers,
            "created": record.created,
            "timeout_s": record.timeout_s,
            "deadline": record.deadline,
            "remaining_s": round(remaining, 1) if remaining is not None else None,
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
            "events": [{"t": e.t, "event": e.event, "detail": e.detail} for e in record.events],
            "log": str(self.state.tx_dir(record.id) / "guard.log"),
        }
