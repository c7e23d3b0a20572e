"""The transaction manager: what `apply`, `confirm`, `revert`, `extend`, `status` and `recover`
do, independent of the command line and of any one firewall backend. `apply` is
fwsafe.core.apply, `recover` fwsafe.core.recover; this module ties them to the rest.
"""

from __future__ import annotations

import math
from typing import Any

from fwsafe.backends import ALL_LAYERS, ApplyError, layer_for
from fwsafe.core import transaction
from fwsafe.core.apply import ApplyFlow, ApplyOptions
from fwsafe.core.change import Change
from fwsafe.core.recover import RECOVER_GIVE_UP_S
from fwsafe.core.recover import recover as recover_transaction
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.errors import (
    GuardError,
    NoTransactionError,
    RevertedError,
    RevertFailedError,
    StateError,
)
from fwsafe.guard import spawn as guard


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

    # -- apply / recover ------------------------------------------------------------------------
    def apply(self, change: Change, options: ApplyOptions) -> Record:
        """Apply `change` under a guard; return the record once the change is live (pending)."""
        return ApplyFlow(self.state).run(change, options)

    def recover(self, reason: str = "recovered by `fwsafe recover`: the guard was gone", *,
                by: str = "recover", tx_id: str | None = None,
                give_up_after: float | None = RECOVER_GIVE_UP_S) -> Record:
        """Undo a transaction still open without a guard (fwsafe.core.recover)."""
        return recover_transaction(self.state, reason, by=by, tx_id=tx_id,
                                   give_up_after=give_up_after)

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

