"""The history of known-good rulesets.

Every confirmed state is kept as an entry ``state_dir/history/<id>/``: one file per captured
layer (``ipv4.rules``, ``ipv6.rules``, ``nft.conf``, ``ufw.json``, ...) and ``meta.json``::

    {"format": 1, "id": "20261126T061530Z-3fa2", "kind": "confirmed", "time": <last known good>,
     "first_time": ..., "tx": <transaction>, "txs": [...], "who": {"SUDO_USER": ...,
     "SSH_CONNECTION": ...}, "confirmed_by": {...}, "command": [...], "touched": {...},
     "changed": ["ipv4"], "summary": "ipv4 +2 -1 lines",
     "layers": {"ipv4": {"file": "ipv4.rules", "sha256": ..., "size": ...}, ...},
     "digest": <sha256 over all layers>}

The pre-change state of the very first transaction is kept as the entry ``baseline``, so that a
rescue has a known-good state even before the first confirm (until it is recorded here, the
rescue reads it from that transaction's snapshot).

Entries are deduplicated by content: a state equal to an existing entry updates that entry's
meta data (its time moves to now) instead of adding one. At most `history_keep` entries and
about 64 MiB are kept; the oldest (by the time they were last known good) go first, never the
newest. The format is fwsafe.ondisk.history_format's: the rescue tool (standard library only) reads
it with the same module, which verifies the checksums.

Writers hold the state directory's one lock (`StateDir.locked`, the lock `apply` and `recover`
hold), waiting for it; it is re-entrant within a process (`fwsafe confirm` after the guard died
calls `on_confirmed` under it; the guard calls it without).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fwsafe.backends import FILE_SET, FILES, available_layers, layer_for, layer_has, layers_with
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, atomic_write, make_private_dir
from fwsafe.core.transaction import Record
from fwsafe.errors import ConfigError, NoTransactionError, StateError
from fwsafe.ondisk.atomic_files import fsync_dir
from fwsafe.ondisk.history_format import (
    BASELINE_ID,
    BASELINE_MARKER,
    FORMAT,
    HISTORY,
    META,
    Damaged,
    Entry,
    HistoryError,
    find_entry,
    layer_file_name,
    layers_digest,
    layers_meta,
    list_history,
    normalize_layer,
    pending_baseline,
    snapshot_layers,
)
from fwsafe.sshd.sshd_config import SSHD_CONFIG

DEFAULT_KEEP = 50
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_TXS = 100
WHO_KEYS = ("SUDO_USER", "USER", "LOGNAME", "SSH_CONNECTION", "uid")
def history_root(state: StateDir) -> Path:
    return state.root / HISTORY


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------
def capture_layers(root: Path = Path("/")) -> tuple[dict[str, bytes], dict[str, str]]:
    """Capture every firewall layer this system has, normalised for the history; and the
    files of a layer that is not available here but kept under `root` (`Layer.kept_under`:
    ufw's files on a rescue system's mount, sshd's).

    Returns (layers, errors): a layer that cannot be read is left out and its error reported.
    """
    names = available_layers()
    layers: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            data = layer_for(name).capture_under(root)
        except Exception as exc:  # noqa: BLE001 - one unreadable layer must not stop the rest
            errors[name] = str(exc) or exc.__class__.__name__
            continue
        layers[name] = normalize_layer(name, data)
    for name in layers_with(FILES):
        layer = layer_for(name)
        if name in layers or name in errors or not layer.kept_under(root):
            continue
        try:
            layers[name] = layer.capture_under(root)
        except Exception as exc:  # noqa: BLE001 - one unreadable layer must not stop the rest
            errors[name] = str(exc) or exc.__class__.__name__
    return layers, errors


def capture_sshd() -> tuple[bytes | None, str | None]:
    """sshd's effective files (/etc/ssh/sshd_config and what it includes), kept with the
    firewall (rollback, rescue, power cycle): (layer, None), (None, why), or (None, None)
    where there is no sshd_config."""
    # the backends: only when sshd's files are captured for the history
    from fwsafe.backends import layer_for

    if not os.path.isfile(SSHD_CONFIG):
        return None, None
    try:
        return layer_for("sshd").capture(), None
    except Exception as exc:  # noqa: BLE001 - an unreadable sshd config stops nothing
        return None, str(exc) or exc.__class__.__name__


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def entries(state: StateDir) -> tuple[list[Entry], list[Damaged]]:
    """Every entry, oldest first (plus the baseline still pending in the first transaction),
    and the damaged ones. An absent state directory has no entries."""
    if not state.root.exists():
        return [], []
    try:
        return list_history(state.root)
    except HistoryError as exc:
        if not (state.root / HISTORY).exists() and not state.tx_root.exists():
            return [], []
        raise StateError(exc.message, hint=exc.hint or None) from exc


def find(state: StateDir, ref: str) -> Entry:
    """An entry by id, unique prefix, `baseline` or `last`."""
    found, damaged = entries(state)
    try:
        return find_entry(found, damaged, ref)
    except HistoryError as exc:
        if not found and not damaged:
            raise NoTransactionError("the history is empty: nothing was confirmed yet") from exc
        raise StateError(exc.message, hint=exc.hint or None) from exc


def _size(path: Path) -> int:
    total = 0
    for child in path.iterdir():
        with contextlib.suppress(OSError):
            total += child.lstat().st_size
    return total


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _new_id(root: Path, now: float) -> str:
    while True:
        candidate = transaction.new_tx_id(now)
        if not (root / candidate).exists():
            return candidate


def _write_entry(root: Path, entry_id: str, layers: dict[str, bytes], meta: dict[str, Any]) -> Path:
    """Create the entry's directory completely under a temporary name, then rename it."""
    final = root / entry_id
    tmp = root / f".{entry_id}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_private_dir(tmp)
    try:
        for name, content in layers.items():
            atomic_write(tmp / layer_file_name(name), content)
        atomic_write(tmp / META, _meta_bytes(meta))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    return final


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n"


def layer_text(name: str, content: bytes) -> dict[str, str]:
    """A layer as {label: text} for diffs: a layer of whole files (FILE_SET: ufw's, sshd's)
    file by file, other layers whole."""
    if layer_has(name, FILE_SET):
        try:
            return {f"{name} {path}": text
                    for path, text in layer_for(name).unit_texts(content).items()}
        except ValueError:
            pass
    return {name: content.decode("utf-8", errors="replace")}


def summarize(old: dict[str, bytes] | None, new: dict[str, bytes]) -> tuple[list[str], str]:
    """(changed layers, a short summary) between two states."""
    if old is None:
        return sorted(new), "first recorded state: " + ", ".join(sorted(new))
    changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    parts = []
    for name in changed:
        if name not in old:
            parts.append(f"{name} added")
            continue
        if name not in new:
            parts.append(f"{name} no longer captured")
            continue
        before, after = layer_text(name, old[name]), layer_text(name, new[name])
        if set(before) | set(after) != {name}:   # split into files (FILE_SET)
            files = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            parts.append(f"{name}: {len(files)} file(s) changed" + (
                " (" + ", ".join(f.split("/")[-1] for f in files[:4]) + ")" if files else ""))
            continue
        plus = minus = 0
        for line in difflib.unified_diff(before[name].splitlines(), after[name].splitlines(),
                                         lineterm="", n=0):
            if line.startswith("+") and not line.startswith("+++"):
                plus += 1
            elif line.startswith("-") and not line.startswith("---"):
                minus += 1
        parts.append(f"{name} +{plus} -{minus} lines")
    return changed, "; ".join(parts) or "no change"


def add_entry(
    state: StateDir,
    layers: dict[str, bytes],
    meta: dict[str, Any],
    *,
    keep: int = DEFAULT_KEEP,
    max_bytes: int = DEFAULT_MAX_BYTES,
    now: float | None = None,
    entry_id: str | None = None,
    dedup: bool = True,
    kind: str = "confirmed",
) -> tuple[Entry, bool]:
    """Record `layers` as known good now. Returns (entry, created): an entry with the same
    content is updated instead (created False), unless `dedup` is off. Then prunes."""
    now = time.time() if now is None else now
    layers = {name: normalize_layer(name, data) for name, data in layers.items()}
    digest = layers_digest(layers)
    root = history_root(state)
    with state.locked(wait=True):
        make_private_dir(root)
        existing, _ = list_history(state.root)
        recorded = [e for e in existing if not e.virtual]
        same = next((e for e in recorded if dedup and e.meta.get("digest") == digest
                     and set(e.layers) == set(layers)), None)
        previous = next((e for e in reversed(recorded) if e is not same), None)
        changed, summary = summarize(previous.layers if previous else None, layers)
        info = {**meta, "time": now, "changed": changed, "summary": summary}
        if same is not None and same.path is not None:
            updated = {**same.meta, **info}
            updated["txs"] = (list(same.meta.get("txs", [])) + [meta.get("tx")])[-MAX_TXS:]
            updated["kind"] = same.meta.get("kind", "confirmed")
            updated["confirmations"] = int(same.meta.get("confirmations", 1)) + 1
            atomic_write(same.path / META, _meta_bytes(updated))
            entry = Entry(same.id, updated, same.layers, same.path)
            created = False
        else:
            new_id = entry_id or _new_id(root, now)
            full = {"format": FORMAT, "id": new_id, "kind": kind, **info,
                    "first_time": now, "txs": [meta.get("tx")] if meta.get("tx") else [],
                    "confirmations": 1, "layers": layers_meta(layers), "digest": digest}
            path = _write_entry(root, new_id, layers, full)
            entry = Entry(new_id, full, layers, path)
            created = True
        prune(state, keep=keep, max_bytes=max_bytes, protect=entry.id)
    return entry, created


def prune(state: StateDir, *, keep: int, max_bytes: int, protect: str) -> list[str]:
    """Remove the oldest entries beyond `keep` and beyond `max_bytes` in total; never
    `protect` (the newest). Damaged entries count too and go first. Returns removed ids."""
    root = history_root(state)
    with state.locked(wait=True):
        found, damaged = list_history(state.root)
        recorded: list[tuple[float, str, Path]] = [
            (d.mtime, d.id, d.path) for d in damaged] + [
            (e.time, e.id, e.path) for e in found if e.path is not None]
        recorded.sort(key=lambda item: (item[0], item[1]))
        damaged_ids = {d.id for d in damaged}
        recorded.sort(key=lambda item: item[1] not in damaged_ids)  # damaged first, stable
        sizes = {entry_id: _size(path) for _, entry_id, path in recorded}
        total = sum(sizes.values())
        count = len(recorded)
        removed = []
        for _, entry_id, path in recorded:
            if count <= keep and total <= max_bytes:
                break
            if entry_id == protect:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(entry_id)
            count -= 1
            total -= sizes[entry_id]
        for leftover in root.glob(".*.tmp*"):  # an entry whose writer died half-way
            if leftover.is_dir() and time.time() - leftover.stat().st_mtime > 3600:
                shutil.rmtree(leftover, ignore_errors=True)
        return removed


def ensure_baseline(state: StateDir, *, keep: int = DEFAULT_KEEP,
                    max_bytes: int = DEFAULT_MAX_BYTES) -> Entry | None:
    """Record the pre-change state of the first transaction as the entry `baseline`, once."""
    root = history_root(state)
    marker = root / BASELINE_MARKER
    with state.locked(wait=True):
        if marker.exists() or (root / BASELINE_ID).exists():
            return None
        pending = pending_baseline(state.root)
        if pending is None:
            return None
        found, _ = list_history(state.root)
        digest = layers_digest(pending.layers)
        entry: Entry | None = None
        if not any(e.meta.get("digest") == digest for e in found if not e.virtual):
            meta = {k: v for k, v in pending.meta.items() if k not in ("id", "time", "kind")}
            meta["summary"] = f"the state before the first fwsafe change ({pending.meta.get('tx')})"
            entry, _ = add_entry(state, pending.layers, meta, keep=keep, max_bytes=max_bytes,
                                 now=pending.time, entry_id=BASELINE_ID, dedup=False,
                                 kind=BASELINE_ID)
        atomic_write(marker, f"{pending.meta.get('tx')}\n".encode())
    return entry


def _who(record: Record) -> dict[str, str]:
    return {k: v for k, v in record.who.items() if k in WHO_KEYS}


def record_meta(record: Record) -> dict[str, Any]:
    return {
        "tx": record.id,
        "who": _who(record),
        "confirmed_by": record.confirmed_by,
        "command": list(record.command),
        "run": getattr(record, "run", None),
        "touched": dict(getattr(record, "touched", {}) or {}) or list(record.layers),
    }


def _newer_transaction(state: StateDir, record: Record) -> Record | None:
    """A transaction prepared after `record` was confirmed, or None (the usual case)."""
    current = state.current_id()
    if current is None or current == record.id:
        return None
    return transaction.load_record(state, current)


def on_confirmed(state: StateDir, record: Record) -> None:
    """After a confirm: keep the confirmed state as known good, and write it to the files the
    system loads at boot (see fwsafe.persistence.bootfiles), under the state lock. Records what
    it did in the record's events.

    The guard saves the confirm before it gets here: should another `apply` have taken the lock
    in between, the live rules may be that transaction's by now. Its snapshot then holds the
    confirmed state, and is recorded instead; nothing is recorded if it was confirmed too (its
    own confirm records the newer state).

    Raises on failure (the caller records it as `persist-failed`; the confirm stands).
    """
    with state.locked(wait=True):
        _on_confirmed(state, record)


def keep_confirmed(state: StateDir, record: Record) -> str:
    """`on_confirmed` for the guard and for `confirm` without it: its failure never undoes the
    confirm; it is recorded (`persist-failed`). Returns the line for the log."""
    try:
        on_confirmed(state, record)
    except Exception as exc:  # noqa: BLE001 - visible in the log and the record
        record.log("persist-failed", str(exc))
        return f"history/persist FAILED: {exc}"
    return record.events[-1].detail


def _on_confirmed(state: StateDir, record: Record) -> None:
    # the config and the boot files' writer: only on a confirm
    from fwsafe.core.config import Config, load_config
    from fwsafe.persistence import bootfiles as persist

    config_error: ConfigError | None = None
    recorded = record.options.get("config")  # the config file the CLI that applied it read
    try:
        config = load_config(recorded if isinstance(recorded, str) and os.path.isfile(recorded)
                             else None)
    except ConfigError as exc:
        config, config_error = Config(), exc
    keep = config.history_keep
    newer = _newer_transaction(state, record)
    if newer is not None and newer.state == transaction.CONFIRMED:
        record.log("history", f"not recorded: transaction {newer.id} was prepared and confirmed "
                              "since; its confirm records the state")
        transaction.save_record(state, record)
        return
    ensure_baseline(state, keep=keep)
    if newer is None:
        layers, errors = capture_layers()
    else:
        layers, errors = snapshot_layers(state.tx_dir(newer.id)), {}
    if not layers:
        raise StateError("cannot capture any firewall layer: "
                         + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    meta = record_meta(record)
    if errors:
        meta["capture_errors"] = errors
    entry, created = add_entry(state, layers, meta, keep=keep)
    detail = (f"known-good state {entry.id}" + ("" if created else " (same as before)")
              + (f"; not captured: {', '.join(sorted(errors))}" if errors else ""))
    if config_error is not None:
        record.log("history", detail)
        transaction.save_record(state, record)
        raise ConfigError(f"boot files not written: {config_error.message}")
    result = persist.persist_layers(layers, mode=config.persist, entry_id=entry.id)
    record.log("history", f"{detail}; {result.describe()}")
    transaction.save_record(state, record)
