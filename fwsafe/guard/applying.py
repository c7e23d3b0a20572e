"""What the guard does to the firewall besides reverting: apply the change (the rules files,
or the command run under it), then capture what it touched."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fwsafe.backends import (
    compose_partial,
    layer_for,
    layer_has,
    nflist,
    one_transaction_tables,
)
from fwsafe.backends.base import RULES_FILE
from fwsafe.backends.iptsave import BUILTIN_CHAINS, blocks, chain_names, parse_ruleset
from fwsafe.core import snapshot
from fwsafe.core.packed import Packed, packed
from fwsafe.core.revert import compute_touched
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.guard.hatch_change import with_change
from fwsafe.guard.hatch_spec import Spec

Log = Callable[[str], None]
def run_change(state: StateDir, record: Record, change: Mapping[str, bytes],
               spec: Spec | None = None, before: Mapping[str, bytes] | None = None,
               log: Log | None = None) -> str | None:
    """Apply the rules files, or run the command; return the error, None when it worked.
    With `spec`, each rules file is loaded together with the hatch, in one transaction; a
    transaction refused with it is loaded alone (the hatch goes in afterwards, or is reported
    as unsupported)."""
    if record.run:
        out_path = state.tx_dir(record.id) / "command.out"
        try:
            with open(out_path, "wb") as out:
                result = subprocess.run(record.run, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot run {record.run[0]}: {exc}"
        if result.returncode != 0:
            tail = out_path.read_text(errors="replace").strip().splitlines()[-3:]
            return f"{' '.join(record.run)} failed (exit {result.returncode}): " + " / ".join(tail)
        return None
    sources = record.options.get("sources", {})
    for name in record.layers:
        try:
            layer = layer_for(name)
            content = change[name]
            if record.options.get("partial"):
                # Composed now, against the state of this very moment: what others did since
                # the snapshot stays.
                content = compose_partial(name, content, layer.capture())
            source = str(sources.get(name, name))
            if spec is not None and _applied_with_hatch(layer.apply, name, content, source,
                                                        spec, before or {}, log, record):
                continue
            layer.apply(content, source)
        except Exception as exc:  # noqa: BLE001 - any failure here is a refused change
            return str(exc) or type(exc).__name__
    return None


def _applied_with_hatch(load: Callable[[bytes, str], None], name: str, content: bytes,
                        source: str, spec: Spec, before: Mapping[str, bytes],
                        log: Log | None, record: Record) -> bool:
    """Load `content` with the hatch in the same transaction; False when there is none for
    this layer or the tool refused the two together (nothing was loaded: try it alone). What
    became of the hatch is in the record at once (`status` may be asked before the guard reads
    the hatch back, after the capture after the change)."""
    loaded = with_change(name, content, spec, before)
    if loaded == content:
        return False
    try:
        load(loaded, source)
    except Exception as exc:  # noqa: BLE001 - tried again without the hatch
        if log is not None:
            log(f"{name}: the change with the hatch was refused ({exc}); loading it alone")
        _hatch_state(record, name, f"error: {exc}")
        return False
    _hatch_state(record, name, "loaded")   # in the kernel with the change: one transaction
    return True


def _hatch_state(record: Record, name: str, state: str) -> None:
    info = dict(record.hatch or {})
    info["layers"] = {**(info.get("layers") or {}), name: state}
    record.hatch = info


@dataclass
class Capture:
    """The watched layers read right after the change (`take_capture`): what `capture_after`
    keeps in the record. `after` None: they could not be read (`error` says why)."""

    after: dict[str, bytes] | None
    stamp: str | None = None              # nf_tables' stamp, when it held during the reading
    touched: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


def take_capture(record: Record, before: Mapping[str, bytes]) -> Capture:
    """Read the watched layers and compare them with the snapshot; changes nothing (the guard
    may run it in a thread while it answers requests)."""
    try:
        # Asked now, while processes can be started (the answer is kept): a revert then knows
        # without starting any whether a layer lives in nf_tables.
        for name in record.watch:
            layer_for(name).in_nf_tables()
        for name in record.watch:   # others answering the change (Docker, a firewalld reload)
            layer_for(name).settle(before.get(name), lambda _message: None)
        stamp = nflist.ruleset_stamp()
        after = {name: layer_for(name).capture() for name in record.watch}
        held = stamp if stamp is not None and nflist.ruleset_stamp() == stamp else None
        return Capture(after, held, compute_touched(before, after))
    except Exception as exc:  # noqa: BLE001 - a timeout, a crash of a tool, anything
        return Capture(None, error=f"{type(exc).__name__}: {exc}")


class BackgroundCapture:
    """`take_capture` in a thread, for the guard, which answers requests meanwhile; a byte on
    `wake` says it is done (`taken` then holds it)."""

    def __init__(self, record: Record, before: Mapping[str, bytes], wake: int) -> None:
        self.taken: Capture | None = None
        self.tid: int | None = None
        self.wake = wake
        self.thread = threading.Thread(target=self._work, args=(record, before),
                                       name="capture-after", daemon=True)
        self.thread.start()

    def _work(self, record: Record, before: Mapping[str, bytes]) -> None:
        self.tid = threading.get_native_id()
        try:
            self.taken = take_capture(record, before)
        finally:
            with contextlib.suppress(OSError):
                os.write(self.wake, b"c")

    def stop(self) -> None:
        """Not needed any more (a revert from the snapshot goes on without it): its reading
        tool, a child of its thread, is terminated; what it read is never used."""
        try:
            with open(f"/proc/self/task/{self.tid}/children", encoding="ascii") as fh:
                children = [int(pid) for pid in fh.read().split()]
        except (OSError, ValueError):
            children = []
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


class AfterChange:
    """The guard's capture after the change (`capture_after`), read at once, or in a thread
    while the guard answers requests when a revert needs none of it (`record.change_stamp`:
    it goes back from the snapshot); kept once read."""

    def __init__(self, state: StateDir, record: Record, before: Mapping[str, bytes], log: Log,
                 wake: int) -> None:
        self.state, self.record, self.before, self.log, self.wake = \
            state, record, before, log, wake
        self.after: Packed | None = None   # captured right after the change (fwsafe.core.packed)
        self.captured = False
        self.reading: BackgroundCapture | None = None

    def start(self) -> bool:
        """Capture now, or start reading in a thread (True: the caller's `adopt` keeps it)."""
        if self.record.change_stamp is None:
            self.now()
            return False
        self.reading = BackgroundCapture(self.record, self.before, self.wake)
        return True

    def now(self) -> None:
        """Captured, once (the thread reading it is waited for)."""
        if self.reading is not None:
            self.reading.thread.join()
            self.adopt()
        if not self.captured:
            self.after = packed(capture_after(self.state, self.record, self.before, self.log))
            self.captured = True

    def adopt(self, wanted: bool = True) -> bool:
        """The capture read in a thread, once done, kept (unless not `wanted` any more: the
        change was confirmed); True when it was just kept."""
        if self.reading is None or self.reading.thread.is_alive():
            return False
        taken, self.reading = self.reading.taken, None
        if not wanted or self.captured:
            return False
        self.after = packed(capture_after(self.state, self.record, self.before, self.log,
                                          taken=taken or Capture(None, error="not read")))
        self.captured = True
        return True

    def skip(self, change: Mapping[str, bytes]) -> str | None:
        """Before a revert: while nothing but the change committed since the snapshot, the
        capture still being read is not waited for (stopped, never kept) and the record says
        what the revert puts back (`snapshot_touched`). The stamp to revert from the snapshot
        by (fwsafe.core.revert: `unchanged_since`), None when there is none."""
        quiet = self.record.change_stamp
        if self.reading is not None and quiet is not None and nflist.ruleset_stamp() == quiet:
            self.reading.stop()
            self.reading, self.captured = None, True
            self.record.touched = snapshot_touched(self.record, change, self.before)
            self.log("the capture after the change is not waited for: nothing but the change "
                     "committed since the snapshot")
        return quiet


def capture_after(state: StateDir, record: Record, before: Mapping[str, bytes],
                  log: Log, taken: Capture | None = None) -> dict[str, bytes] | None:
    """Capture the watched layers right after the change (or keep `taken`, read so): what
    differs from the snapshot is what the change touched (set in the record), and the change's
    own delta for the merge. Saved for `recover` and the backstop. None when it cannot be
    captured: then every unit of the watched layers counts as touched."""
    capture = taken if taken is not None else take_capture(record, before)
    after = capture.after
    if after is not None:
        record.after_stamp = capture.stamp
        record.touched = capture.touched
        try:
            snapshot.save(state, record.id, snapshot.AFTER, after)
        except OSError as exc:
            log(f"cannot save the capture after the change: {exc}")
    else:
        # Touched = everything the change could touch, never "nothing": every watched layer,
        # every unit the snapshot has; a revert without `after` adds whatever differs from
        # the snapshot then (core/revert.py).
        log(f"cannot capture after the change ({capture.error}); a revert "
            f"restores whole units of every watched layer")
        record.after_stamp = None
        record.touched = {}
        for name in record.watch:
            try:
                record.touched[name] = sorted(layer_for(name).units(before[name]))
            except Exception:  # noqa: BLE001 - the layer is still touched, units found later
                record.touched[name] = []
    touched = ", ".join(f"{k}: {' '.join(v)}" for k, v in record.touched.items())
    log(f"touched: {touched or 'nothing'}")
    return after


def change_commits(record: Record, change: Mapping[str, bytes]) -> int | None:
    """The nf_tables commits the change's load makes when nothing else commits meanwhile: one
    per table block of each file (iptables-restore commits each table on its own; the hatch
    goes into the same blocks). None when the change is not only whole tables of iptables-nft
    (a command, nft, ufw, legacy tables, sshd's files): then nothing is known this way. (The
    snapshot's stamp, without which this is not asked, is there only when the layers the change
    loads live in nf_tables: fwsafe.control.flow; nothing is run here, before the record says
    pending.)"""
    if record.run or not record.layers:
        return None
    commits = 0
    for name in record.layers:
        if name not in change:
            return None
        content = change[name]   # (read once: fwsafe.core.packed)
        if one_transaction_tables(name, content) is not None:   # nft: one `nft -f`
            commits += 1
            continue
        if not layer_has(name, RULES_FILE):   # iptables-nft's
            return None
        text = content.decode(errors="replace")
        commits += len(chain_names(text)) if record.options.get("partial") else \
            len(blocks(text.splitlines()))
    return commits


def change_stamp(record: Record, change: Mapping[str, bytes], before: str | None) -> str | None:
    """nf_tables' stamp right after the change, when the change alone committed since the
    snapshot: `before` (the stamp right before its load) is the snapshot's
    (`record.before_stamp`), and the generation moved on by exactly the change's commits. While
    the stamp stays that, each changed layer is its snapshot with the change's tables loaded
    whole, and the revert loads those tables back from the snapshot without reading anything
    (fwsafe.core.revert: `unchanged_since`). None otherwise."""
    if before is None or before != record.before_stamp:
        return None
    commits = change_commits(record, change)
    if commits is None:
        return None
    base, _, generation = before.rpartition("/")
    now = nflist.ruleset_stamp()
    return now if generation.isdigit() and now == f"{base}/{int(generation) + commits}" \
        else None


def snapshot_touched(record: Record, change: Mapping[str, bytes],
                     before: Mapping[str, bytes]) -> dict[str, list[str]]:
    """What a revert from the snapshot puts back: every chain that the snapshot or the change
    has in each table the change loaded whole (a superset of what it changed)."""
    touched: dict[str, list[str]] = {}
    for name in record.layers:
        content = change[name]   # (read once: fwsafe.core.packed)
        tables = one_transaction_tables(name, content)
        if tables is not None:   # nft: the tables its one transaction wrote to
            touched[name] = sorted(tables)
            continue
        # the chains each table declares and those its rules name undeclared (`stray`: a
        # table's built-in chains need none, `*raw` / `-A PREROUTING ...` / `COMMIT` loads);
        # `undone_already` compares chains: each one the table can have
        loaded = {table.name: set(table.chains) | set(table.stray) for table in
                  parse_ruleset(content.decode(errors="replace")).values()}
        old = chain_names(before.get(name, b"").decode(errors="replace"))
        touched[name] = sorted({f"{table}/{chain}" for table in loaded
                                for chain in loaded[table] | old.get(table, set())
                                | set(BUILTIN_CHAINS.get(table, ()))}
                               | {f"{table}/" for table in loaded})
    return touched


def hatch_only(stamp: str | None, commits: int | None) -> str | None:
    """The nf_tables stamp of the capture after the change (`stamp`), moved on past the hatch's
    own `commits` made right after it: captures never show the hatch, so the state they give is
    still that capture's. Moved only when the generation is the stamp's plus exactly those
    commits (nobody else committed in between); None when it is not, or the commits are not
    known (the revert then reads the layers again)."""
    if stamp is None or commits == 0:
        return stamp
    if commits is None:
        return None
    base, _, generation = stamp.rpartition("/")
    now = nflist.ruleset_stamp()
    return now if generation.isdigit() and now == f"{base}/{int(generation) + commits}" else None


