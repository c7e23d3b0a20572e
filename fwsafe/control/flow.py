"""apply: validate -> predict a lockout -> snapshot -> record durably -> start the guard -> the
guard applies -> wait until it reports the change live (or refused).

Once the guard may have started, an error says "nothing changed" (exit 3) only when the record
proves it; otherwise the change may be live (exit 5).

The refusals before anything changes are fwsafe.control.refusals, the snapshot's reading and
writing fwsafe.control.apply_snapshot; this module is the flow.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fwsafe import failpoints
from fwsafe.backends import (
    ON_DEMAND_LAYERS,
    available_layers,
    layer_for,
    layer_kind,
    nflist,
    watched_layers,
)
from fwsafe.context import RUN
from fwsafe.control.apply_snapshot import collect, refresh, remove_abandoned, save_snapshot
from fwsafe.control.refusals import (
    digests_ahead,
    disk_refusal,
    need_room,
    refuse_deleting_neighbours,
    refuse_if_open,
    refuse_lossy_tables,
)
from fwsafe.core import prefetch, transaction
from fwsafe.core.change import Change, require_root, resolve_partial, validate_change
from fwsafe.core.revert import Prover
from fwsafe.core.statedir import StateDir, make_private_dir
from fwsafe.core.transaction import DEFAULT_MAX_TIMEOUT, Record
from fwsafe.errors import (
    ChangeMayBeLiveError,
    FwsafeError,
    GuardError,
    InvalidRulesError,
    RevertedError,
    RevertFailedError,
    StateError,
)
from fwsafe.guard import hatch_spec, hatch_sync, spawn

GUARD_ARM_TIMEOUT = 30.0     # the guard must have started applying by then
GUARD_APPLY_TIMEOUT = 900.0  # and have finished applying by then
LIVE_HINT = ("run `fwsafe status`; if its guard is gone, `fwsafe recover` puts the old rules "
             "back")


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
    # Called with the complete change once it is validated and the lockout check passed,
    # before anything changes (the CLI shows what the change exposes or closes).
    before_apply: Callable[[Change], None] | None = None
    login_user: str | None = None   # sshd changes: who must log in again (default: this
                                    # session's user; fwsafe.sshd.lockout)
    # Told as each step begins (the CLI shows a step that takes long on a terminal).
    step: Callable[[str], None] = field(default=lambda _what: None, repr=False)
    hatch: bool = True             # load the kernel escape hatch with the change
    hatch_grace: float = 30.0      # ... opening this long after the deadline
    stuck_grace: float = 5.0       # the backstop kills a stuck guard this long after it
    admin_sources: list[str] = field(default_factory=list)   # who the hatch lets in, too
    # The steps that live above core, given by the caller (fwsafe.steps.apply_steps): the flow
    # names none of the packages they come from (check, sshd, persistence). Asked for and
    # missing: a TypeError (a bug), never a silent skip.
    lockout_check: Callable[[Change, ApplyOptions,
                             Mapping[str, bytes] | Callable[[], Mapping[str, bytes]] | None],
                            dict[str, Any]] | None = field(default=None, repr=False)
    warm_change: Callable[[Change], None] | None = field(default=None, repr=False)
    warm_captures: Callable[[Mapping[str, Future[bytes]]], None] | None = field(
        default=None, repr=False)
    # (the SSH clients, the ports) the kernel escape hatch lets in
    ssh_access: Callable[[], tuple[list[str], list[int]]] | None = field(default=None,
                                                                         repr=False)
    # Installs the boot recovery unit if need be (a systemd host); the note when it did.
    install_boot_hook: Callable[[str], str | None] | None = field(default=None, repr=False)
    # The revert's access proof, for a transaction left open that apply reverts first.
    prover: Prover | None = field(default=None, repr=False)


Step = TypeVar("Step")


def step(given: Step | None, name: str) -> Step:
    """A step of ApplyOptions the flow needs: the caller forgot it is a bug, said as such."""
    if given is None:
        raise TypeError(f"ApplyOptions.{name} is needed and was not given "
                            "(fwsafe.steps.apply_steps gives every step)")
    return given


def lockout_check(change: Change, options: ApplyOptions,
                  captured: Mapping[str, bytes] | Callable[[], Mapping[str, bytes]] | None
                  = None) -> dict[str, Any]:
    """Run the lockout check (the caller's step: fwsafe.steps.lockout_check); it refuses a
    predicted lockout unless forced (exit 3). `captured`: the host's layers, or what waits for
    them (the check's sandbox is built meanwhile)."""
    if not options.check:
        return {"ran": False, "summary": "lockout check skipped (--no-check)"}
    return step(options.lockout_check, "lockout_check")(change, options, captured)


def hatch_plan(options: ApplyOptions) -> dict[str, Any]:
    """The kernel escape hatch asked of the guard: who it lets in (this SSH session's client,
    or the established SSH sessions', and `admin_sources`), on which ports (this session's,
    sshd's), how long after the deadline. Off: why not."""
    if not options.hatch:
        return {"on": False, "why": "hatch = false in the config"}
    clients, ports = step(options.ssh_access, "ssh_access")()
    four, six = hatch_spec.split_sources([*clients, *options.admin_sources])
    if not four and not six:
        return {"on": False, "why": "no SSH client known and no admin_sources in the config"}
    return {"on": True, "grace": options.hatch_grace, "sources4": four, "sources6": six,
            "ports": ports}


def reported(state: StateDir, record: Record) -> Record:
    """What the guard's report means for `apply`: the record once the change is live
    (pending); else the typed error (exit 3 only when nothing changed). A guard that died while
    applying is waited for here, once the state lock is let go: its backstop takes over."""
    if record.state == transaction.APPLYING and not transaction.guard_alive(record):
        record = spawn.settle(state, record)   # the guard died while applying
        if record.state in transaction.OPEN_STATES:
            raise ChangeMayBeLiveError(
                f"the guard of transaction {record.id} died while applying and nobody "
                f"reverted it: the change may be live", hint=LIVE_HINT)
    if record.state == transaction.PENDING:
        failpoints.hit("apply.pending")
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
    if record.state == transaction.REVERTED:
        raise RevertedError(f"transaction {record.id} was applied and then reverted: "
                            f"{record.reason}", hint="the rules from before are back")
    raise GuardError(f"transaction {record.id} ended as {record.state}: {record.reason}")


class ApplyFlow:
    """One `apply`, from the checks to the guard's report that the change is live."""

    def __init__(self, state: StateDir) -> None:
        self.state = state

    def run(self, change: Change, options: ApplyOptions) -> Record:
        """Apply `change` under a guard; return the record once the change is live (pending).

        Raises InvalidRulesError (nothing changed), PendingError, GuardError,
        RevertFailedError (the refused change could not be undone).
        """
        require_root()
        self.state.ensure()
        with self.state.locked():
            failpoints.hit("apply.locked")
            settled = refuse_if_open(self.state, options.prover)
            if settled:
                change.notes.append(settled)
            self._ensure_boot_hook(change, options)
            layers = available_layers()
            layers += [name for name in change.layers if name not in layers]  # e.g. sshd's
            # The guard starts now, standing by: its start-up overlaps the reading and the
            # checks. It applies nothing before it is told to go, once the record is saved;
            # if the change is called off (or this process dies) it exits.
            remove_abandoned(self.state)
            tx_id = transaction.new_tx_id()
            tx_dir = self.state.tx_dir(tx_id)
            standby: spawn.Standby | None = None
            was_current = self.state.current_id()
            try:
                with disk_refusal(self.state):
                    make_private_dir(tx_dir)
                    standby = spawn.standby(self.state, tx_id, config_path=options.config_path)
                    failpoints.hit("apply.standby")
                    record = self._prepare(tx_id, change, options, layers)
                failpoints.hit("apply.prepared")
            except BaseException:
                if standby is not None:
                    standby.call_off()
                shutil.rmtree(tx_dir, ignore_errors=True)
                with contextlib.suppress(Exception):   # never point at what is gone
                    if self.state.current_id() == tx_id:
                        self.state.set_current(was_current) if was_current else \
                            (self.state.root / "current").unlink()
                raise
            # From here until the guard reports, Ctrl-C would leave the user not knowing
            # whether the change is live: ignore it (the guard takes moments to apply).
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                options.step("the guard is applying the change")
                record = self._start_guard(record, options, standby)
            finally:
                signal.signal(signal.SIGINT, previous)
        return reported(self.state, record)

    def _prepare(self, tx_id: str, change: Change, options: ApplyOptions,
                 layers: list[str]) -> Record:
        """Read, validate and check; save the snapshot and the record (`preparing`), the
        transaction's current. Nothing is changed."""
        with ThreadPoolExecutor(max_workers=len(layers) + 4) as pool:
            # The layers are read while the change is validated, and the lockout check uses
            # that reading. The snapshot must be as close as can be to the change: right
            # before the guard is told to go, what may have changed since is read again
            # (`refresh`: nothing, when nf_tables' generation is still the same).
            options.step("reading the live firewall and validating the change")
            # The reading the `fwsafe` command started before this was loaded, if any.
            generation, captures = prefetch.read(pool, layers)
            ahead = digests_ahead(pool, change, layers)
            if options.check and not change.partial:
                pool.submit(step(options.warm_change, "warm_change"), change)
                pool.submit(step(options.warm_captures, "warm_captures"), captures)
            if change.partial:
                complete = resolve_partial(change, collect(captures, list(change.layers)))
            else:
                complete = change
            # The lockout check needs the host's layers, not the validation's verdict: it runs
            # beside the validation, which is heard first (an invalid change is reported as
            # such, whatever the check made of it). sshd's config is checked after it.
            # Without the lockout check, a change that is one nft transaction is validated by
            # the guard's load itself (all of it or nothing: a refused file changes nothing).
            validating = pool.submit(validate_change, complete, by_transaction=not options.check)
            if any(layer_kind(name) in ON_DEMAND_LAYERS for name in complete.layers):
                validating.result()
            def collected() -> tuple[dict[str, bytes], Future[None], Future[None]]:
                """The layers once read; then the fidelity test and the snapshot's writing
                (durably, while the checks run; a layer read again is written again)."""
                captured = collect(captures, list(change.layers))
                return captured, pool.submit(refuse_lossy_tables, change, captured,
                                             generation, ahead, self.state), \
                    pool.submit(save_snapshot, self.state, tx_id, change, captured)

            # (the capture futures are in the pool before it, or in threads of their own)
            collecting = pool.submit(collected)
            if options.check:
                options.step("predicting a lockout in a scratch namespace")
            try:   # its sandbox is built while the layers are still being read
                verdict = lockout_check(complete, options, lambda: collecting.result()[0])
            except FwsafeError:
                validating.result()
                raise
            captured, lossy, saving = collecting.result()
            validating.result()
            lossy.result()
            if options.before_apply is not None:
                options.step("trying what the change exposes, in a scratch namespace")
                options.before_apply(complete)
            options.step("saving the snapshot")
            if RUN.hatch_seen:   # one left behind (a transaction that ended without removing it)
                hatch_sync.sync(None, hatch_sync.available_layers())
            fresh = refresh(pool, captured, generation, list(change.layers))
            # nf_tables' layers in the snapshot are its state at this stamp (the generation
            # they were read at, unchanged since): the guard's revert from the snapshot, for a
            # change whose layers all live there.
            stamp = nflist.ruleset_stamp()
            before_stamp = stamp if generation is not None and stamp is not None \
                and stamp.rpartition("/")[2] == str(generation) and all(
                    layer_for(n).in_nf_tables() for n in change.layers) else None
            saving.result()
            refusing = pool.submit(refuse_deleting_neighbours, change, fresh, options)
            save_snapshot(self.state, tx_id, None, fresh, captured)
            refusing.result()
        captured = fresh
        record = Record(
            id=tx_id, state=transaction.PREPARING, created=time.time(),
            timeout_s=options.timeout_s, backend="command" if change.run else "rules",
            layers=list(change.layers), run=change.run, captured=sorted(captured),
            watch=watched_layers(None if change.run is not None else change.layers,
                                 captured), notes=change.notes,
            who=transaction.who_am_i(), command=options.command, probes=options.probes,
            options={"probe_interval": options.probe_interval,
                     "probe_failures": options.probe_failures,
                     "probe_timeout": options.probe_timeout,
                     "confirm_on_probe": options.confirm_on_probe,
                     "sources": change.sources,
                     "partial": change.partial,
                     "config": options.config_path,
                     "max_timeout": options.max_timeout,
                     "stuck_grace": options.stuck_grace,
                     "hatch": hatch_plan(options),
                     "check": verdict},
            boot_id=transaction.current_boot_id(), before_stamp=before_stamp,
        )
        record.log(transaction.PREPARING, "validated; snapshot of " + ", ".join(sorted(captured)))
        need_room(self.state, sum(len(data) for data in captured.values()))
        transaction.save_record(self.state, record)
        self.state.set_current(tx_id)
        return record

    def _ensure_boot_hook(self, change: Change, options: ApplyOptions) -> None:
        """A reboot while a change is pending must come back with the old rules: on a systemd
        host the boot recovery unit is installed before the first change (unless the config
        says boot_hook = false; the caller's step: fwsafe.steps.install_boot_hook); if it
        cannot be, nothing is changed."""
        if not options.boot_hook:
            return
        note = step(options.install_boot_hook, "install_boot_hook")(str(self.state.root))
        if note:
            change.notes.append(note)

    def _start_guard(self, record: Record, options: ApplyOptions,
                     standby: spawn.Standby) -> Record:
        """Tell the standing-by guard to go and wait until it has applied the change (or
        refused it). Once the guard may have started, an error says "nothing changed" (exit 3)
        only when the record proves it (aborted under the transaction's lock); else the change
        may be live (exit 5)."""
        saves = spawn.watch_saves(self.state, record.id)
        try:
            try:
                standby.go()
                failpoints.hit("apply.go")
            except GuardError as exc:
                latest = self.abort(record, str(exc))
                if latest.state != transaction.ABORTED:
                    raise ChangeMayBeLiveError(
                        f"{exc.message}; yet the guard started: transaction {record.id} is "
                        f"{latest.state} and the change may be live", hint=LIVE_HINT) from exc
                raise GuardError(exc.message, hint=f"nothing was changed (transaction {record.id} "
                                 "is aborted); try again") from exc
            return self._wait_for_guard(record, saves)
        finally:
            try:
                standby.close()   # the guard has read `go` (or has been given up on)
            finally:
                spawn.stop_watching(self.state, record.id, saves)

    def abort(self, record: Record, why: str) -> Record:
        """fwsafe.core.transaction.abort_preparing for this flow's state directory."""
        return transaction.abort_preparing(self.state, record, why)

    def _wait_for_guard(self, record: Record, saves: int | None) -> Record:
        """Until the guard has applied the change or refused it: the record is read each time
        the guard says it saved it (`saves`), and at least every SAVED_POLL_S anyway."""
        started = time.monotonic()
        asked = started
        log = self.state.tx_dir(record.id) / "guard.log"
        while True:
            spawn.wait_saved(saves)
            try:
                record = transaction.load_record(self.state, record.id)
            except StateError as exc:
                raise ChangeMayBeLiveError(
                    f"the guard was started but its record cannot be read ({exc.message}): "
                    "the change may be live", hint=f"{LIVE_HINT} (log: {log})") from exc
            if record.state == transaction.APPLYING and time.monotonic() > asked + 0.5:
                asked = time.monotonic()   # the disk may refuse what the guard writes
                record = spawn.ask_record(self.state, record, timeout=1.0) or record
            undoing = (record.state == transaction.REVERTING and record.deadline is None
                       and transaction.guard_alive(record))   # a change refused part-way
            if record.state not in (transaction.PREPARING, transaction.APPLYING) \
                    and not undoing:
                return record
            waited = time.monotonic() - started
            if record.state == transaction.PREPARING and waited > GUARD_ARM_TIMEOUT:
                latest = self.abort(record, f"the guard did not arm within {GUARD_ARM_TIMEOUT:g} s")
                if latest.state == transaction.ABORTED:
                    raise GuardError(
                        f"the guard did not start within {GUARD_ARM_TIMEOUT:g} s; nothing was "
                        f"changed (see {log})")
                continue  # the guard got there first: wait for it as usual
            if record.state == transaction.APPLYING and not transaction.guard_alive(record):
                return record   # its backstop takes over, once the state lock is let go
            if waited > GUARD_APPLY_TIMEOUT:
                raise ChangeMayBeLiveError(
                    f"the guard has been {record.state} transaction {record.id} for "
                    f"{waited:.0f} s: the change may be live; unless confirmed, the guard "
                    "reverts it at its deadline", hint=f"{LIVE_HINT} (log: {log})")

