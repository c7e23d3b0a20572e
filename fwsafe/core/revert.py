"""Undoing a change, and proving it worked; a revert never gives up while the change may be live.

Shared by the guard (which holds the snapshots in memory), its backstop and `fwsafe recover`
(which read them from disk). For each layer the change touched, the layer loads a complete
computed target per table and verifies it (fwsafe.backends.base.Layer.revert), going through
the levels MERGE -> SNAPSHOT_UNITS -> SNAPSHOT_TABLES when a target is refused: the three-way merge, then the
touched units whole from the snapshot, then the snapshot of every touched table (access before
fidelity, said in the log and the record). When every level fails, the whole round is tried
again after a pause that doubles from 0.1 s to 5 s, for as long as it takes (the guard), or
until `give_up_after` seconds (a one-shot `fwsafe recover`, which then reports revert-failed).
Every exception is caught and logged: nothing a backend raises can end the attempts.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fwsafe import failpoints
from fwsafe.backends import (
    FLUSHES_IPTABLES,
    IPTABLES_SAVE,
    layer_for,
    layer_has,
    nflist,
    owned_elsewhere,
    revert_order,
)
from fwsafe.backends.base import LEVELS, MERGE, SNAPSHOT_TABLES, SNAPSHOT_UNITS, Layer, Proved
from fwsafe.core.transaction import Record

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0

Log = Callable[[str], None]
Attempt = Callable[[int, str], None]   # (attempt number, why the previous one failed)


# The SSH clients get in? (None: not known.) Given the layers whose whole state the revert
# proved by nf_tables' generation: {layer: (generation, state)} (RevertResult.known).
Access = Callable[[Mapping[str, tuple[int, bytes]]], tuple[bool | None, str]]


@dataclass(frozen=True)
class Prover:
    """The revert's second proof, access, from above core (the lockout check's kernel verdict:
    fwsafe.check.proof.PROVER), handed in by whoever reverts (the guard, recover's callers)."""
    access: Callable[[Record], Access | None]   # the proof for a transaction (None: none known)
    warm: Callable[[str, bytes], None]          # its head start on a state about to be loaded
    remove_dead: Callable[[], list[str]]        # a dead prover's sandbox removed (notes)


@dataclass
class RevertResult:
    problems: list[str] = field(default_factory=list)   # [] = done, the delta proved gone
    attempts: int = 0
    levels: dict[str, str] = field(default_factory=dict)  # layer -> level that worked
    notes: list[str] = field(default_factory=list)        # fallbacks used, said loudly
    proofs: dict[str, str] = field(default_factory=dict)  # layer / "access" -> what held
    access: bool | None = None                            # the kernel's verdict held
    # The whole state of a reverted layer, as nf_tables' generation proved it right after the
    # load: {layer: (that generation, the state)}. While the generation is still the same, it
    # is the live state (the access proof reads it instead of capturing the layer again).
    known: dict[str, tuple[int, bytes]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verified(self) -> bool:
        """Both proofs held: the change's delta is gone from the kernel's state, and the
        lockout check's kernel verdict lets the SSH clients in."""
        return self.ok and self.access is True

    def summary(self, by: str) -> str:
        """The reason a reverted record gives: "verified" only when both proofs held."""
        if self.verified:
            head = f"the change undone and verified (by {by})"
        else:
            head = (f"the change undone (by {by}); NOT verified: "
                    f"{self.proofs.get('access', 'access not checked')}")
        return "; ".join([head, *self.notes])


ALREADY_UNDONE = ("the change was already undone (a revert that ended before it could say so): "
                  "not undone twice")


def undone_already(touched: Mapping[str, Sequence[str]], before: Mapping[str, bytes]) -> bool:
    """Every unit the change touched is as in the snapshot again: a revert that finished but
    could not say so (its process died or failed right after). Reverting again would undo the
    change's delta a second time; it is recorded as reverted instead."""
    if not touched:
        return False
    try:
        for name, units in touched.items():
            if name not in before:
                return False
            layer = layer_for(name)
            old, now = layer.units(before[name]), layer.units(layer.capture())
            if any(old.get(unit) != now.get(unit) for unit in units):
                return False
    except Exception:  # noqa: BLE001 - cannot tell: revert as usual
        return False
    return True


def recording_attempts(record: Record, save: Callable[[], object]) -> Callable[[int, str], None]:
    """`revert_change`'s `on_attempt` for the guard and for recover: each failed attempt's
    number and error in the record, saved at once (`status` shows them while it retries)."""
    def attempt(number: int, why: str) -> None:
        record.revert_attempts = number
        record.revert_last_error = why
        save()
    return attempt


def record_revert(record: Record, result: RevertResult, by: str,
                  leftovers: Sequence[str] = ()) -> None:
    """What a finished revert (`result`, by the guard, the backstop, recover, the boot unit)
    leaves in `record`: who, how many attempts, the fallbacks (and `leftovers`), the proofs.
    The state transition is the caller's (reverted, or revert-failed with `result.problems`)."""
    record.reverted_by = by
    record.revert_attempts = result.attempts
    record.revert_notes = result.notes + list(leftovers)
    record.revert_proofs = result.proofs
    record.revert_verified = result.verified
    if result.ok:
        record.revert_last_error = None


def proof_of(level: str) -> str:
    return ("the change's delta is gone from the kernel's state" if level == MERGE else
            f"the touched units are as in the snapshot in the kernel ({level})")


def live_state(name: str, known: Mapping[str, tuple[int, bytes]]) -> bytes:
    """Layer `name` as it is live: the state the revert proved loaded (`known`) while nf_tables'
    generation is still the one of that proof (nothing committed since, by anyone), else a
    fresh capture."""
    found = known.get(name)
    if found is not None and nflist.generation() == found[0]:
        return found[1]
    return layer_for(name).capture()


def compute_touched(before: Mapping[str, bytes], after: Mapping[str, bytes]) -> dict[str, list[str]]:
    """The units that differ between two captures, per layer (layers without change left out)."""
    touched = {}
    for name in before:
        if name in after:
            skip = owned_elsewhere(name, before)
            units = [u for u in layer_for(name).touched(before[name], after[name])
                     if u not in skip]
            if units:
                touched[name] = units
    return touched


def _from_snapshot(name: str, layer: Layer, units: Sequence[str], before: bytes, log: Log,
                   unchanged_since: str) -> tuple[str | None, str, Proved | None]:
    """The revert while nf_tables is still as the change left it (`unchanged_since`: nothing
    but the change committed since the snapshot, fwsafe.guard.applying.change_stamp): the
    layer is its snapshot with the tables of `units` loaded whole by the change, so the
    three-way merge's target is those tables as in the snapshot, and the rest of the layer is
    the snapshot's. Loaded with no reading; the kernel's generation proves it held (MERGE: the
    delta is gone, the whole layer is the snapshot); when another commit came in between, the
    tables are the snapshot's all the same (SNAPSHOT_TABLES, said as such). (None, ...) when nf_tables
    moved on before the load: the caller takes the usual way."""
    if not layer.in_nf_tables() or nflist.ruleset_stamp() != unchanged_since:
        return None, "nf_tables changed since the change", None
    log(f"revert of {name}: nothing but the change committed since the snapshot (nf_tables' "
        "generation): its tables go back as in the snapshot, nothing read")
    layer.proved = None
    remaining = layer.revert(before, None, units, level=SNAPSHOT_TABLES, on_retry=log, live=before)
    proved = layer.proved
    if remaining:
        return None, "still differs: " + ", ".join(remaining), None
    if proved is None or unchanged_since.rpartition("/")[2] != str(proved[0]):
        return SNAPSHOT_TABLES, "", None   # somebody else committed right before the load
    return MERGE, "", proved


def _revert_layer(name: str, units: Sequence[str], before: bytes, after: bytes | None,
                  log: Log, after_stamp: str | None = None,
                  warm: Callable[[str, bytes], None] | None = None,
                  skip: frozenset[str] = frozenset(),
                  unchanged_since: str | None = None, layer: Layer | None = None,
                  others_left: bytes | None = None) -> tuple[str | None, str, Proved | None]:
    """Try each level once; return (the level that worked, None if none did; the last error;
    the layer's whole state when the kernel proved it, see Layer.proved). While nf_tables is
    as it was right after the change (`after_stamp`), the live state of an nf_tables layer is
    `after` and is not read again; while it is as the change left it and nothing else wrote
    since the snapshot (`unchanged_since`), the layer goes back from the snapshot alone
    (`_from_snapshot`). `warm`: the access proof will follow, so its analysis of the state
    about to be loaded starts while the tool loads it (Prover.warm). `skip`: units another
    layer owns (firewalld's tables in the nft layer). `others_left`: the layer as others left it,
    read before the revert of another layer flushed it (`flushed_bystanders`): the live state
    its merge starts from instead of the kernel's."""
    layer = layer if layer is not None else layer_for(name)
    units = [u for u in units if u not in skip]
    if warm is not None:
        layer.on_target = lambda data: warm(name, data)
    if unchanged_since is not None:
        try:
            level, error, proved = _from_snapshot(name, layer, units, before, log,
                                                    unchanged_since)
            if level is not None:
                return level, error, proved
        except Exception as exc:  # noqa: BLE001 - the usual levels follow
            log(f"revert of {name} from the snapshot refused: {exc}")
    levels = LEVELS if after is not None else tuple(lv for lv in LEVELS if lv != MERGE)
    if after is None:
        # Nothing says what the change did (no capture right after it): everything that
        # differs from the snapshot now counts as touched too (a table the change created).
        try:
            units = sorted(set(units) | set(layer.touched(before, layer.capture())))
        except Exception as exc:  # noqa: BLE001 - the levels below read the layer again
            log(f"cannot read {name} to see what differs from the snapshot: {exc}")
        units = [u for u in units if u not in skip]
    error = ""
    for level in levels:
        try:   # everything inside: a revert must survive anything (even fork failing here)
            live = others_left if others_left is not None else (
                after if after is not None and after_stamp is not None
                and layer.in_nf_tables() and nflist.ruleset_stamp() == after_stamp else None)
            layer.proved = None
            remaining = layer.revert(before, after, units, level=level, on_retry=log, live=live)
        except Exception as exc:  # noqa: BLE001 - a revert must survive anything a backend raises
            error = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
            log(f"revert of {name} ({level}) refused: {error}")
            continue
        if not remaining:
            proved = layer.proved
            if proved is not None and live is not None \
                    and (after_stamp or "").rpartition("/")[2] != str(proved[0]):
                proved = None   # `after` stood for the live state at another generation
            return level, "", proved
        error = "still differs: " + ", ".join(remaining)
        log(f"revert of {name} ({level}): {error}")
    return None, error, None


def revert_change(
    touched: Mapping[str, Sequence[str]],
    before: Mapping[str, bytes],
    after: Mapping[str, bytes] | None = None,
    *,
    log: Log | None = None,
    on_attempt: Attempt | None = None,
    give_up_after: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    after_stamp: str | None = None,
    access: Access | None = None,
    unchanged_since: str | None = None,
    warm: Callable[[str, bytes], None] | None = None,
) -> RevertResult:
    """Undo the change on every touched layer: files first, iptables last (the reverse of the
    capture order). `after` holds the captures taken right after the change (a layer missing
    there is reverted from the snapshot: SNAPSHOT_UNITS, then SNAPSHOT_TABLES). `unchanged_since`: nf_tables'
    stamp at which the touched layers were their snapshot with the touched tables loaded whole
    by the change, nothing else (fwsafe.guard.applying.change_stamp); while it holds, they go
    back from the snapshot without being read. `access`: the second proof,
    asked once the delta is proved gone; when it fails, the touched tables are loaded whole
    from the snapshot (access before fidelity) and it is asked again; `warm`, its head start
    (both from a Prover: fwsafe.check.proof.PROVER). A layer whose revert may flush the
    iptables tables (FLUSHES_IPTABLES: firewalld's reload, after which Docker writes its chains
    again in its own order and the admin's rules in DOCKER-USER are gone) has them read first
    (`read_bystanders`); when it did flush them, each iptables layer that differs is reverted
    from that reading, as others had left it (`flushed_bystanders`), touched or not."""
    say: Log = log or (lambda _message: None)
    result = RevertResult()
    units_of = {name: list(units) for name, units in touched.items()}  # (+ flushed ones)
    remaining = [n for n in revert_order(units_of) if n in before]
    started = time.monotonic()
    delay = BACKOFF_FIRST
    bystanders: dict[str, bytes] = {}   # the iptables layers as others left them ...
    others_left: dict[str, bytes] = {}  # ... those a layer's revert flushed since
    while True:
        result.attempts += 1
        failpoints.hit("revert.round")
        failed: dict[str, str] = {}
        for name in remaining:   # (a flushed iptables layer joins it: reverted in this round)
            layer = layer_for(name)
            heard: list[str] = []
            if layer_has(name, FLUSHES_IPTABLES) and not bystanders:
                # read by the layer's revert (in a thread) before it may flush them
                layer.before_flush = functools.partial(_read_into, bystanders, before,
                                                       heard.append)
            level, error, proved = _revert_layer(name, units_of[name], before[name],
                                                 (after or {}).get(name), say, after_stamp,
                                                 warm=warm if access is not None else None,
                                                 skip=owned_elsewhere(name, before),
                                                 unchanged_since=unchanged_since, layer=layer,
                                                 others_left=others_left.get(name))
            for message in heard:
                say(message)
            if layer.disturbed:
                flushed = flushed_bystanders(bystanders, units_of, say)
                others_left.update(flushed)
                remaining += [n for n in revert_order(flushed) if n not in remaining]
                unchanged_since = None if flushed else unchanged_since
            # The next layer's stamp: this one's load (its own commits) moved it on.
            unchanged_since = (None if unchanged_since is None or proved is None
                               or unchanged_since.rpartition("/")[2] != str(proved[0])
                               else f"{unchanged_since.rpartition('/')[0]}/{proved[1]}")
            if level is None:
                failed[name] = error
                continue
            _keep_known(result.known, name, proved)
            result.levels[name] = level
            result.proofs[name] = proof_of(level)
            if level != MERGE:
                why = ("the three-way merge could not be loaded" if name in (after or {})
                       else "no capture right after the change, so no merge")
                note = (f"{name}: {why}; restored "
                        + ("the touched units whole from the snapshot" if level != LEVELS[-1]
                           else "the whole snapshot of the touched tables (access before "
                                "fidelity: rules others added meanwhile are gone)"))
                result.notes.append(note)
                say(f"FALLBACK {note}")
        remaining = [n for n in remaining if n in failed]
        if not remaining:
            result.problems = []
            prove_access(result, access, units_of, before, say)
            return result
        reason = "; ".join(f"{n}: {e}" for n, e in failed.items())
        if give_up_after is not None and time.monotonic() - started >= give_up_after:
            result.problems = [f"{n}: {e}" for n, e in failed.items()]
            return result
        say(f"revert attempt {result.attempts} failed ({reason}); trying again in {delay:g} s")
        if on_attempt is not None:
            on_attempt(result.attempts + 1, reason)
        sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def read_bystanders(before: Mapping[str, bytes], say: Log) -> dict[str, bytes]:
    """The iptables layers of the snapshot as they are now, read before the revert of a layer
    that may flush them (FLUSHES_IPTABLES: firewalld's reload flushes every iptables table,
    and Docker writes its chains again in its own order, without the admin's rules in
    DOCKER-USER). What others did in the window is there, in their order."""
    found: dict[str, bytes] = {}
    for name in before:
        if layer_has(name, IPTABLES_SAVE):
            try:
                found[name] = layer_for(name).capture()
            except Exception as exc:  # noqa: BLE001 - that layer is reverted as usual
                say(f"cannot read {name} before a revert that may flush it: {exc}")
    return found


def _read_into(found: dict[str, bytes], before: Mapping[str, bytes], say: Log) -> None:
    found.update(read_bystanders(before, say))


def flushed_bystanders(bystanders: Mapping[str, bytes], touched: dict[str, list[str]],
                       say: Log) -> dict[str, bytes]:
    """After a revert that flushed the iptables tables (Layer.disturbed): the layers of
    `bystanders` that differ now from what others had left ({name: that state}). Each is
    reverted next from that state (its three-way merge's live state), every table it has
    loaded whole (`touched` gets all their units): Docker's rules in the order it had them
    (DOCKER-USER first in FORWARD), the admin's rules back, the change's delta undone."""
    flushed: dict[str, bytes] = {}
    for name, left in bystanders.items():
        layer = layer_for(name)
        try:
            now = layer.capture()
        except Exception as exc:  # noqa: BLE001 - read again by its own revert
            say(f"cannot read {name} after the revert that may have flushed it: {exc}")
            now = b""
        was, new = layer.units(left), layer.units(now)
        if was == new:   # (chain by chain: iptables-save's comments carry the time)
            continue
        units = set(was) | set(new)
        touched[name] = sorted(set(touched.get(name, [])) | units)
        flushed[name] = left
        say(f"{name}: flushed by that revert and written again by others: put back as others "
            "had left it, the change's delta undone (its three-way merge)")
    return flushed


def _keep_known(known: dict[str, tuple[int, bytes]], name: str, proved: Proved | None) -> None:
    """Layer `name` just reverted: its proved state joins `known`; the states known at the
    generation its load started from stay known at the one it ended with (only that load's
    own commits came between, and it wrote no other layer); any other is dropped."""
    if proved is None:
        known.clear()   # something unproved was loaded: no earlier state is sure any more
        return
    start, end, data = proved
    for other, (generation, state) in list(known.items()):
        if generation == start:
            known[other] = (end, state)
        else:
            del known[other]
    known[name] = (end, data)


def prove_access(result: RevertResult, access: Access | None,
                 touched: Mapping[str, Sequence[str]], before: Mapping[str, bytes],
                 say: Log) -> None:
    """The second proof (see revert_change), into `result`; also for a revert found finished
    by whoever took over from its dead owner."""
    if access is None:
        result.proofs["access"] = "access not checked: no SSH client known from the check"
        return
    say("access: asking the kernel whether the SSH clients get in")   # (a heartbeat, too)
    result.access, result.proofs["access"] = _ask(access, result.known)
    say(result.proofs["access"])
    if result.access is not False:
        return
    note = ("the SSH clients do not get in after the merge: the touched tables loaded whole "
            "from the snapshot (access before fidelity: rules others added meanwhile are gone)")
    result.notes.append(note)
    say(f"FALLBACK {note}")
    for name in revert_order(touched):
        if name not in before:
            continue
        try:
            left = layer_for(name).revert(before[name], None, touched[name], level=SNAPSHOT_TABLES)
        except Exception as exc:  # noqa: BLE001 - said, and the access proof tells the rest
            left = [str(exc)]
        if left:
            say(f"revert of {name} ({SNAPSHOT_TABLES}) failed: {'; '.join(left)}")
        else:
            result.levels[name] = SNAPSHOT_TABLES
            result.proofs[name] = proof_of(SNAPSHOT_TABLES)
    result.known.clear()   # the tables loaded whole: read the layers again
    result.access, result.proofs["access"] = _ask(access, result.known)
    say(result.proofs["access"])


def finished_revert(touched: Mapping[str, Sequence[str]], before: Mapping[str, bytes],
                    access: Access | None, say: Log) -> RevertResult | None:
    """A revert that already ended before it could say so (every touched unit as in the
    snapshot again: `undone_already`): its result, with both proofs (the units', by that
    reading; then access), for whoever took it up again (the guard's next attempt, recover).
    None: not undone, revert as usual."""
    if not undone_already(touched, before):
        return None
    result = RevertResult(attempts=0, notes=[ALREADY_UNDONE],
                          proofs={name: proof_of(SNAPSHOT_UNITS) for name in touched})
    prove_access(result, access, touched, before, say)
    return result


def _ask(access: Access, known: Mapping[str, tuple[int, bytes]]) -> tuple[bool | None, str]:
    try:
        return access(known)
    except Exception as exc:  # noqa: BLE001 - a proof that cannot run did not hold
        return None, f"access not proved: the check could not run ({type(exc).__name__}: {exc})"
