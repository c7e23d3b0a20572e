"""The transaction record and its state machine.

A transaction is one change under the guard::

    preparing --> applying --> pending --> confirmed
        |             |           |
        v             v           +--> reverting --> reverted
     aborted       rejected                     \\-> revert-failed

* ``preparing``: the CLI validated the input, captured the snapshot and is starting the guard.
* ``aborted``: the guard never started (or never applied): nothing was changed.
* ``applying``: the guard is armed and is applying the change.
* ``rejected``: the kernel refused the change; whatever had been applied was put back.
* ``pending``: the change is live, the guard waits for confirmation until ``deadline``.
* ``confirmed`` / ``reverted`` / ``revert-failed``: final.

Only the guard writes the record while the transaction is applying, pending or reverting;
the CLI writes it before the guard runs and `fwsafe recover` after the guard is gone.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.core.statedir import StateDir, atomic_write
from fwsafe.errors import RecordFormatError, StateError

DEFAULT_MAX_TIMEOUT = 86400.0   # the longest deadline `extend` may set, unless the config says
                                # (= fwsafe.core.config.DEFAULT_MAX_TIMEOUT)

#: The major version of the record's layout, written as `format`. Fields may be added without
#: changing it (older code keeps unknown fields); a newer major version is refused.
RECORD_FORMAT = 1

PREPARING = "preparing"
ABORTED = "aborted"
APPLYING = "applying"
REJECTED = "rejected"
PENDING = "pending"
REVERTING = "reverting"
CONFIRMED = "confirmed"
REVERTED = "reverted"
REVERT_FAILED = "revert-failed"

TRANSITIONS: dict[str, frozenset[str]] = {
    PREPARING: frozenset({APPLYING, ABORTED}),
    APPLYING: frozenset({PENDING, REJECTED, REVERTING}),
    PENDING: frozenset({CONFIRMED, REVERTING}),
    REVERTING: frozenset({REVERTED, REVERT_FAILED, REJECTED}),  # rejected: refused part-way
    ABORTED: frozenset(),
    REJECTED: frozenset(),
    CONFIRMED: frozenset(),
    REVERTED: frozenset(),
    REVERT_FAILED: frozenset({REVERTING}),
}
FINAL_STATES = frozenset({ABORTED, REJECTED, CONFIRMED, REVERTED, REVERT_FAILED})
# States in which the firewall may hold the change and nobody has decided yet.
OPEN_STATES = frozenset({APPLYING, PENDING, REVERTING})


class TransitionError(StateError):
    """A state change the state machine does not allow."""


def new_tx_id(now: float | None = None) -> str:
    """Ids sort by creation time: 20261126T061530Z-3fa2."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(2)}"


@dataclass
class Event:
    t: float
    event: str
    detail: str = ""


@dataclass
class Record:
    id: str
    state: str
    created: float
    timeout_s: float
    backend: str
    layers: list[str]                     # layers the change gives content for: ipv4, ipv6, nft
    deadline: float | None = None         # Unix time; set when the change is applied
    reason: str | None = None             # why it ended as it did (reverted, rejected, ...)
    error: str | None = None              # the backend's own message, when something failed
    guard_pid: int | None = None
    guard_mode: str | None = None         # "systemd-run" or "setsid"
    shielded: bool | None = None          # oom_score_adj -1000 took effect
    shield_error: str | None = None
    who: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    confirmed_by: dict[str, str] | None = None
    run: list[str] | None = None          # command mode: the command run under the guard
    captured: list[str] = field(default_factory=list)   # layers in the snapshot
    watch: list[str] = field(default_factory=list)      # layers compared after the apply
    touched: dict[str, list[str]] = field(default_factory=dict)  # layer -> units changed
    notes: list[str] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    boot_id: str | None = None            # the kernel boot the change was applied in
    after_stamp: str | None = None        # nf_tables as captured after the change
                                          # (fwsafe.backends.nflist.ruleset_stamp)
    before_stamp: str | None = None       # nf_tables when the snapshot was its state
    change_stamp: str | None = None       # nf_tables right after the change, when only the
                                          # change committed since the snapshot (see
                                          # fwsafe.guard.applying.change_stamp)
    reverted_by: str | None = None        # guard | backstop | recover | boot
    backstop: dict[str, Any] | None = None  # what reverts if the guard dies: kind, pid/unit
    revert_attempts: int = 0              # rounds tried so far (each one every level)
    revert_last_error: str | None = None  # why the last round failed, while reverting
    revert_notes: list[str] = field(default_factory=list)  # fallbacks used (said loudly)
    hatch: dict[str, Any] | None = None   # the kernel escape hatch: when, who, where, state
    revert_proofs: dict[str, str] = field(default_factory=dict)  # layer/"access" -> what held
    revert_verified: bool | None = None   # both proofs held (the delta gone, SSH gets in)
    events: list[Event] = field(default_factory=list)
    format: int = RECORD_FORMAT           # the layout's major version (RECORD_FORMAT)
    # Fields this version does not know (written by another version): kept and written back.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- state machine --------------------------------------------------------------------
    def transition(self, new_state: str, detail: str = "", *, now: float | None = None) -> None:
        allowed = TRANSITIONS.get(self.state, frozenset())
        if new_state not in allowed:
            raise TransitionError(
                f"transaction {self.id}: cannot go from {self.state} to {new_state}"
            )
        self.state = new_state
        self.log(new_state, detail, now=now)

    def log(self, event: str, detail: str = "", *, now: float | None = None) -> None:
        self.events.append(Event(now if now is not None else time.time(), event, detail))

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def remaining_s(self, now: float | None = None) -> float | None:
        if self.deadline is None or self.state not in (PENDING, APPLYING):
            return None
        if not math.isfinite(self.deadline):
            return None
        return max(0.0, self.deadline - (now if now is not None else time.time()))

    # -- (de)serialisation ------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["format"] = RECORD_FORMAT
        return {**extra, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """Fields this version does not know are kept (`extra`), never an error, so that an
        upgrade or a downgrade while a change is pending cannot break `recover`; a record of a
        newer major `format` is refused with RecordFormatError."""
        data = dict(data)
        major = _format_major(data.pop("format", 1))
        if major > RECORD_FORMAT:
            raise RecordFormatError(
                f"transaction record {data.get('id', '?')} has format {major}, newer than this "
                f"fwsafe reads (format {RECORD_FORMAT})",
                hint="a newer fwsafe wrote it: use that version for `fwsafe status` and "
                     "`fwsafe recover`")
        events = [_event(e) for e in data.pop("events", [])]
        known = set(cls.__dataclass_fields__) - {"events", "format", "extra"}
        extra = {key: data.pop(key) for key in list(data) if key not in known}
        return cls(**data, events=events, extra=extra)


def _format_major(value: Any) -> int:
    """The major version of a record's `format`: 1, or "1.2" (a minor version is ignored)."""
    if isinstance(value, bool):
        raise ValueError(f"bad format {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.split(".", 1)[0])
    raise ValueError(f"bad format {value!r}")


def _event(data: Any) -> Event:
    if not isinstance(data, dict):
        raise ValueError("an event is not an object")
    return Event(**{key: data[key] for key in ("t", "event", "detail") if key in data})


def record_path(state: StateDir, tx_id: str) -> Path:
    return state.tx_dir(tx_id) / "record.json"


def save_record(state: StateDir, record: Record) -> None:
    data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
    atomic_write(record_path(state, record.id), data + b"\n")


def load_record(state: StateDir, tx_id: str) -> Record:
    path = record_path(state, tx_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StateError(
            f"transaction {tx_id} has no record ({path} is missing)",
            hint="the state directory is damaged; `fwsafe status --layers` shows the live rules",
        ) from exc
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return Record.from_json(data)
    except (ValueError, TypeError) as exc:
        raise StateError(f"transaction record {path} is damaged: {exc}") from exc


def load_current(state: StateDir) -> Record | None:
    tx_id = state.current_id()
    if tx_id is None:
        return None
    return load_record(state, tx_id)


def process_alive(pid: int | None, marker: str) -> bool:
    """True when `pid` runs and its command line contains `marker` (guards against PID reuse)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return marker.encode() in cmdline


def guard_alive(record: Record) -> bool:
    return process_alive(record.guard_pid, record.id)


def current_boot_id() -> str | None:
    """The kernel's id of this boot: it changes with every reboot (and every container boot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def who_am_i() -> dict[str, str]:
    """Who is making the change, for the record and the history."""
    who = {}
    for var in ("SUDO_USER", "USER", "LOGNAME", "SSH_CONNECTION", "SSH_TTY"):
        value = os.environ.get(var)
        if value:
            who[var] = value
    who["uid"] = str(os.getuid())
    return who


TX_LOCK_TIMEOUT = 10.0       # the guard holds a transaction's lock only while it arms


def abort_preparing(state: StateDir, record: Record, why: str) -> Record:
    """Mark a transaction that is still preparing as aborted, under its lock (the guard moves
    it to applying under the same lock): a guard that starts later sees `aborted` and applies
    nothing. Returns the record as it is now: a guard that got there first has moved it on,
    and then nothing is aborted."""
    try:
        with state.tx_locked(record.id, timeout=TX_LOCK_TIMEOUT):
            latest = load_record(state, record.id)
            if latest.state != PREPARING:
                return latest
            latest.reason = why
            latest.transition(ABORTED, why)
            save_record(state, latest)
            return latest
    except TimeoutError:  # the guard holds the lock: it is arming right now
        return load_record(state, record.id)
