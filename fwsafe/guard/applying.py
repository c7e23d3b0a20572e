"""What the guard does to the firewall besides reverting: apply the change (the rules files,
or the command run under it), then capture what it touched."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping

from fwsafe.backends import compose_partial, layer_for, nflist
from fwsafe.core import snapshot
from fwsafe.core.revert import compute_touched
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.guard import hatch

Log = Callable[[str], None]
def run_change(state: StateDir, record: Record, change: Mapping[str, bytes],
               spec: hatch.Spec | None = None, before: Mapping[str, bytes] | None = None,
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
                                                        spec, before or {}, log):
                continue
            layer.apply(content, source)
        except Exception as exc:  # noqa: BLE001 - any failure here is a refused change
            return str(exc) or type(exc).__name__
    return None


def _applied_with_hatch(load: Callable[[bytes, str], None], name: str, content: bytes,
                        source: str, spec: hatch.Spec, before: Mapping[str, bytes],
                        log: Log | None) -> bool:
    """Load `content` with the hatch in the same transaction; False when there is none for
    this layer or the tool refused the two together (nothing was loaded: try it alone)."""
    loaded = hatch.with_change(name, content, spec, before)
    if loaded == content:
        return False
    try:
        load(loaded, source)
    except Exception as exc:  # noqa: BLE001 - tried again without the hatch
        if log is not None:
            log(f"{name}: the change with the hatch was refused ({exc}); loading it alone")
        return False
    return True


def capture_after(state: StateDir, record: Record, before: Mapping[str, bytes],
                  log: Log) -> dict[str, bytes] | None:
    """Capture the watched layers right after the change: what differs from the snapshot is
    what the change touched (set in the record), and the change's own delta for the merge.
    Saved for `recover` and the backstop. None when it cannot be captured: then every unit of
    the watched layers counts as touched."""
    after: dict[str, bytes] | None
    try:
        # Asked now, while processes can be started (the answer is kept): a revert then knows
        # without starting any whether a layer lives in nf_tables.
        for name in record.watch:
            layer_for(name).in_nf_tables()
        stamp = nflist.ruleset_stamp()
        after = {name: layer_for(name).capture() for name in record.watch}
        record.after_stamp = stamp if stamp is not None and nflist.ruleset_stamp() == stamp \
            else None
        record.touched = compute_touched(before, after)
        try:
            snapshot.save(state, record.id, snapshot.AFTER, after)
        except OSError as exc:
            log(f"cannot save the capture after the change: {exc}")
    except Exception as exc:  # noqa: BLE001 - a timeout, a crash of a tool, anything
        # Touched = everything the change could touch, never "nothing": every watched layer,
        # every unit the snapshot has; a revert without `after` adds whatever differs from
        # the snapshot then (core/revert.py).
        log(f"cannot capture after the change ({type(exc).__name__}: {exc}); a revert "
            f"restores whole units of every watched layer")
        record.after_stamp = None
        record.touched = {}
        for name in record.watch:
            try:
                record.touched[name] = sorted(layer_for(name).units(before[name]))
            except Exception:  # noqa: BLE001 - the layer is still touched, units found later
                record.touched[name] = []
        after = None
    touched = ", ".join(f"{k}: {' '.join(v)}" for k, v in record.touched.items())
    log(f"touched: {touched or 'nothing'}")
    return after


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


