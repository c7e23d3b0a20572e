"""The history of known-good states on disk: its format, reading and verifying it.

Standard library only, Python 3.9+: the rescue zipapp reads the history with this module, and
fwsafe.persistence.known_good writes it with the same names and checks. The layout::

    STATE_DIR/history/<id>/meta.json     {"format": 1, "id": <id>, "time": ..., "layers":
                                          {"ipv4": {"file": "ipv4.rules", "sha256": ...}}, ...}
    STATE_DIR/history/<id>/ipv4.rules    one file per layer, normalised (`normalize_layer`)
    STATE_DIR/history/.baseline-recorded the baseline was recorded once

Until the first confirm records it, the baseline (the state before the first transaction) is
read from that transaction's snapshot (``STATE_DIR/tx/<id>/before.<layer>``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwsafe.ondisk.iptsave_lines import CHAIN, save_lines, zero_counters
from fwsafe.ondisk.nft_text import zero_counters as zero_nft_counters
from fwsafe.ondisk.sshd_files import load as load_sshd_files
from fwsafe.ondisk.ufw_files import UfwFilesError, load_ufw_files

FORMAT = 1
HISTORY = "history"
META = "meta.json"
BASELINE_ID = "baseline"
BASELINE_MARKER = ".baseline-recorded"   # in history/: the baseline was recorded once
# The kind of an entry that is kept but was never known good: the files a power-cycle recovery
# found and replaced (fwsafe.persistence.powercycle), for `rollback` to undo it. Never "last".
BEFORE_RECOVERY = "before-recovery"
LAYER_FILES = {
    "ipv4": "ipv4.rules",
    "ipv6": "ipv6.rules",
    "ipv4-legacy": "ipv4-legacy.rules",
    "ipv6-legacy": "ipv6-legacy.rules",
    "nft": "nft.conf",
    "ufw": "ufw.json",
    "sshd": "sshd.json",   # /etc/ssh/sshd_config and what it includes (fwsafe.ondisk.sshd_files)
}

_NFT_TABLE = re.compile(r"^\s*table\s+(ip|ip6|inet|arp|bridge|netdev)\s+(\S+)(?:\s*\{|\s*$)", re.M)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class HistoryError(Exception):
    """The history cannot be read, or holds no entry that fits; `hint` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class StateMissing(HistoryError):
    """There is no state directory at all."""


# --------------------------------------------------------------------------------------------
# Layer contents
# --------------------------------------------------------------------------------------------
def normalize_iptables(text: str) -> str:
    """iptables-save text without comments and blank lines, chain counters zeroed (read with
    the format's one line reader, fwsafe.ondisk.iptsave_lines)."""
    return "".join(f"{zero_counters(line) if kind == CHAIN else line}\n"
                   for kind, line in save_lines(text))


def normalize_nft(text: str) -> str:
    """nft ruleset text without comment lines, counters zeroed."""
    out = [zero_nft_counters(raw.rstrip())
           for raw in text.splitlines()
           if raw.strip() and not raw.lstrip().startswith("#")]
    return "".join(f"{line}\n" for line in out)


def normalize_layer(name: str, data: bytes) -> bytes:
    """A layer's capture in the form kept in the history: equal rulesets give equal bytes."""
    if name.startswith(("ipv4", "ipv6")):
        return normalize_iptables(data.decode("utf-8", errors="replace")).encode()
    if name == "nft":
        return normalize_nft(data.decode("utf-8", errors="replace")).encode()
    return data


def layers_digest(layers: dict[str, bytes]) -> str:
    """One hash over every layer's (normalised) content: equal digests, equal states."""
    digest = hashlib.sha256()
    for name in sorted(layers):
        content = normalize_layer(name, layers[name])
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def nft_tables(text: str) -> list[tuple[str, str]]:
    """(family, name) of every table an nft file defines."""
    return [(m.group(1), m.group(2)) for m in _NFT_TABLE.finditer(text)]


def layers_meta(layers: dict[str, bytes]) -> dict[str, Any]:
    """The "layers" of an entry's meta.json: {layer: {"file", "size", "sha256"}}."""
    return {name: {"file": layer_file_name(name), "size": len(content),
                   "sha256": hashlib.sha256(content).hexdigest()}
            for name, content in sorted(layers.items())}


# --------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One known-good state: its layers (normalised) and its meta data."""

    id: str
    meta: dict[str, Any]
    layers: dict[str, bytes]
    path: Path | None = None     # the entry's directory (None for the pending baseline)
    virtual: bool = False        # the baseline, read from the first transaction's snapshot

    @property
    def time(self) -> float:
        value = self.meta.get("time")
        return float(value) if isinstance(value, (int, float)) else 0.0

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "confirmed"))

    def describe(self) -> str:
        who = describe_who(self.meta.get("who") or {})
        layers = ", ".join(self.layers) or "no layers"
        text = f"{self.id}: {self.kind} {format_time(self.time)}{who}; {layers}"
        summary = self.meta.get("summary")
        return text + (f"; {summary}" if summary else "")


@dataclass
class Damaged:
    id: str
    path: Path
    why: str
    mtime: float


def format_time(t: float) -> str:
    if not t:
        return "(time unknown)"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def describe_who(who: dict[str, Any]) -> str:
    user = who.get("SUDO_USER") or who.get("USER") or who.get("LOGNAME")
    conn = str(who.get("SSH_CONNECTION") or "").split()
    parts = []
    if user:
        parts.append(f"by {user}")
    if conn:
        parts.append(f"from {conn[0]}")
    return (" " + " ".join(parts)) if parts else ""


def layer_file_name(layer: str) -> str:
    return LAYER_FILES.get(layer, f"{layer}.layer")


def read_entry(directory: Path) -> Entry:
    """Read and verify one history entry; raises ValueError saying what is damaged."""
    try:
        raw = (directory / META).read_bytes()
    except FileNotFoundError as exc:
        raise ValueError(f"{META} is missing") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {META}: {exc.strerror}") from exc
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{META} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{META} is not a JSON object")
    if meta.get("id") != directory.name:
        raise ValueError(f"{META} names entry {meta.get('id')!r}, not {directory.name!r}")
    if not isinstance(meta.get("time"), (int, float)):
        raise ValueError(f"{META} has no time")
    described = meta.get("layers")
    if not isinstance(described, dict) or not described:
        raise ValueError(f"{META} lists no layers")
    layers: dict[str, bytes] = {}
    for name, info in described.items():
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            raise ValueError(f"{META}: layer {name!r} is described wrongly")
        fname = info["file"]
        if not _SAFE_NAME.match(fname) or fname == META:
            raise ValueError(f"{META}: layer {name!r} names a bad file {fname!r}")
        try:
            content = (directory / fname).read_bytes()
        except OSError as exc:
            raise ValueError(f"layer file {fname} cannot be read: {exc.strerror}") from exc
        if hashlib.sha256(content).hexdigest() != info.get("sha256"):
            raise ValueError(f"layer file {fname} does not match its checksum (damaged)")
        if name == "ufw":
            try:
                load_ufw_files(content)
            except UfwFilesError as exc:
                raise ValueError(str(exc)) from exc
        if name == "sshd":
            load_sshd_files(content)   # an SshdFilesError is a ValueError: damaged
        layers[str(name)] = content
    return Entry(id=directory.name, meta=meta, layers=layers, path=directory)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def snapshot_layers(tx_dir: Path) -> dict[str, bytes]:
    """The layers of a transaction's snapshot of the state before its change
    (``tx/<id>/before.<layer>``), normalised; a damaged ufw layer is left out."""
    layers: dict[str, bytes] = {}
    for name in LAYER_FILES:
        try:
            layers[name] = normalize_layer(name, (tx_dir / f"before.{name}").read_bytes())
        except OSError:
            continue
    if "ufw" in layers:
        try:
            load_ufw_files(layers["ufw"])
        except UfwFilesError:
            del layers["ufw"]
    if "sshd" in layers:
        try:
            load_sshd_files(layers["sshd"])
        except ValueError:
            del layers["sshd"]
    return layers


def pending_baseline(state_dir: Path) -> Entry | None:
    """The state before the first transaction, from its snapshot (tx/<first>/before.*): the
    known-good state until the history records it (at the first confirm)."""
    tx_root = state_dir / "tx"
    try:
        ids = sorted(p.name for p in tx_root.iterdir() if p.is_dir())
    except OSError:
        return None
    for tx_id in ids:
        directory = tx_root / tx_id
        layers = snapshot_layers(directory)
        if not layers:
            continue
        record = _read_json(directory / "record.json")
        created = record.get("created") if isinstance(record, dict) else None
        if not isinstance(created, (int, float)):
            created = directory.stat().st_mtime
        meta = {"format": FORMAT, "id": BASELINE_ID, "kind": BASELINE_ID, "time": float(created),
                "first_time": float(created), "tx": tx_id,
                "who": record.get("who", {}) if isinstance(record, dict) else {},
                "summary": f"the state before the first fwsafe change ({tx_id}); "
                           "not yet recorded in the history"}
        return Entry(id=BASELINE_ID, meta=meta, layers=layers, virtual=True)
    return None


def list_history(state_dir: Path) -> tuple[list[Entry], list[Damaged]]:
    """Every known-good entry (oldest first, by the time it was last known good) and every
    damaged one. Raises StateMissing when there is no `state_dir`, HistoryError when it is not
    a usable fwsafe state directory."""
    if not state_dir.exists():
        raise StateMissing(
            f"no fwsafe state directory at {state_dir}",
            hint="is the server's root partition mounted there? give the state directory with "
                 "--state-dir if fwsafe keeps it elsewhere (see /etc/fwsafe/fwsafe.toml)")
    if not state_dir.is_dir():
        raise HistoryError(f"{state_dir} is not a directory: the fwsafe state is damaged")
    history = state_dir / HISTORY
    entries: list[Entry] = []
    damaged: list[Damaged] = []
    if history.exists():
        try:
            names = sorted(os.listdir(history))
        except OSError as exc:
            raise HistoryError(
                f"cannot read {history}: {exc.strerror} (the state is damaged)") from exc
        for name in names:
            path = history / name
            if name.startswith(".") or not path.is_dir():
                continue
            try:
                entries.append(read_entry(path))
            except ValueError as exc:
                damaged.append(Damaged(name, path, str(exc), _mtime(path)))
    elif not (state_dir / "tx").is_dir():
        raise HistoryError(
            f"{state_dir} holds neither a history nor transactions: not a fwsafe state "
            "directory, or a damaged one")
    if not (history / BASELINE_MARKER).exists() and not any(
            e.id == BASELINE_ID for e in entries) and not any(
            d.id == BASELINE_ID for d in damaged):
        baseline = pending_baseline(state_dir)
        if baseline is not None:
            entries.append(baseline)
    entries.sort(key=lambda e: (e.time, e.id))
    return entries, damaged


def _mtime(path: Path) -> float:
    try:
        return max(path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir()))
    except (OSError, ValueError):
        return 0.0


def find_entry(entries: list[Entry], damaged: list[Damaged], ref: str) -> Entry:
    """An entry by id, unique id prefix, `baseline`, or `last`/`latest`."""
    if not entries and not damaged:
        raise HistoryError("there is no known-good snapshot")
    if ref in ("last", "latest"):
        return last_good(entries, damaged)
    for entry in entries:
        if entry.id == ref:
            return entry
    for bad in damaged:
        if bad.id == ref or (bad.id.startswith(ref) and ref):
            raise HistoryError(f"snapshot {bad.id} is damaged: {bad.why}",
                              hint="choose another one (--list shows them)")
    matches = [e for e in entries if ref and e.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise HistoryError(f"{ref!r} matches several snapshots: "
                          + ", ".join(e.id for e in matches))
    raise HistoryError(f"no snapshot {ref!r}",
                      hint="known: " + ", ".join(e.id for e in entries) if entries else "")


def last_good(entries: list[Entry], damaged: list[Damaged]) -> Entry:
    """The newest intact entry that was known good (not a state a power-cycle recovery
    replaced); refused when a damaged entry may be newer than it."""
    entries = [e for e in entries if e.kind != BEFORE_RECOVERY]
    if not entries:
        why = "; ".join(f"{d.id}: {d.why}" for d in damaged)
        raise HistoryError("there is no intact known-good snapshot" + (f" ({why})" if why else ""))
    newest = entries[-1]
    newer_damaged = [d for d in damaged if d.mtime > newest.time]
    if newer_damaged:
        raise HistoryError(
            "the newest snapshot may be damaged: "
            + "; ".join(f"{d.id}: {d.why}" for d in newer_damaged),
            hint=f"choose one explicitly, e.g. --to {newest.id} (--list shows them)")
    return newest

