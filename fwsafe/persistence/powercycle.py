"""Recovery by power cycle: the first thing to try from a provider's panel.

A lockout that fwsafe did not guard (a plain `ufw delete allow 22/tcp`, an automation run, a
change confirmed by a keypress in the old session) is on the disk, and every boot brings it
back. The power button is what is left. So the boot unit (`fwsafe recover --boot`, before the
firewall loaders and before sshd) counts boots:

* at every boot it records ``STATE_DIR/boots.json``: this boot's id, the wall-clock time, a
  digest of the firewall files on the disk (the boot files, ufw's files, /etc/firewalld,
  sshd's) as the boot found them, and whether SSH logins are being marked
  (fwsafe.persistence.loginhook);
* when the host boots twice within `reboot_recovery_window` (default 10 minutes), no SSH
  login succeeded during the boot in between (no login mark of that boot), and the firewall
  files are still what that boot found, it puts back the last known-good state of the history
  (the boot files, ufw's and sshd's files with the rescue tool's own plan, fwsafe.rescue.tool;
  /etc/firewalld as the entry has it, byte-identical with modes and owners,
  fwsafe.ondisk.firewalld_files) before ufw, netfilter-persistent, nftables.service, firewalld and
  sshd start.

firewalld's runtime model is not on the disk: at boot firewalld builds it from /etc/firewalld.
So the power cycle knows /etc/firewalld only: its firewalld layer (the digest, and the
``before-recovery`` entry) is the files alone (``files_only_layer``; a rollback of it puts the
files back and reloads firewalld), and from a known-good entry, whose firewalld layer has the
runtime model too, it takes the files.

A single reboot never changes a state fwsafe did not guard: the state must have survived one
whole boot unchanged, with nobody getting in over SSH, and the host be power-cycled again
within the window. The state found on the disk is kept first as a history entry of kind
``before-recovery`` (never taken for the last known-good one): `fwsafe rollback ID` puts it
back, under the guard. The recovery is recorded in ``STATE_DIR/power-cycle.json``, shown by
`fwsafe status` and `fwsafe history`, and announced at the next login (``/run/motd.d``, gone
at the next boot). `reboot_recovery = false` in the config turns it off.

Clock caveats: the window is measured by the wall clock across boots (there is no other clock
that survives a reboot). Early at boot it is the hardware clock's time; a host whose clock is
wrong at boot and stepped later by NTP can see a gap longer or shorter than the real one. A
gap outside 0 .. window (a clock that went back, or far forward) never triggers a recovery:
a wrong clock errs on the side of changing nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwsafe.backends import NFT_TABLES, layer_has
from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir, atomic_write
from fwsafe.ondisk.atomic_files import local_path, write_file_atomically
from fwsafe.ondisk.boot import BOOT_FILES
from fwsafe.ondisk.firewalld_files import (
    FIREWALLD_DIR,
    files_only_layer,
    read_tree,
    restore_tree,
    tree_from_json,
)
from fwsafe.ondisk.history_format import (
    BEFORE_RECOVERY,
    Entry,
    HistoryError,
    format_time,
    last_good,
    layers_digest,
    list_history,
    normalize_layer,
)
from fwsafe.ondisk.ufw_files import capture_ufw_files
from fwsafe.persistence import known_good, loginhook
from fwsafe.rescue.rescue_plan import plan_restore
from fwsafe.rescue.rescue_write import write_plan

BOOTS = "boots.json"
RECOVERY = "power-cycle.json"
MOTD = "/run/motd.d/fwsafe-power-cycle"
DEFAULT_WINDOW = 600.0
FORMAT = 1


@dataclass
class Boot:
    """What the boot unit found at one boot."""

    boot_id: str
    time: float
    digest: str
    marked: bool    # SSH logins were being marked (the login hook was active)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "boot_id": self.boot_id, "time": self.time,
                "digest": self.digest, "logins_marked": self.marked}

    @classmethod
    def from_json(cls, data: Any) -> Boot | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(str(data["boot_id"]), float(data["time"]), str(data["digest"]),
                       data["logins_marked"] is True)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class Decision:
    recover: bool
    why: str


def decide(previous: Boot | None, now: Boot, login_boot: str | None, window: float, *,
           enabled: bool = True) -> Decision:
    """Whether this boot (`now`) puts back the last known-good state. Pure: the rules, one
    reason each (unit-tested in tests/unit/test_powercycle.py)."""
    if not enabled:
        return Decision(False, "off: reboot_recovery = false in the config")
    if not now.marked:
        return Decision(False, "off: SSH logins are not marked here, so nothing tells whether "
                               "anyone got in between two boots")
    if previous is None:
        return Decision(False, "no earlier boot recorded")
    if previous.boot_id == now.boot_id:
        return Decision(False, "the same boot (the unit ran again)")
    if not previous.marked:
        return Decision(False, "SSH logins were not marked during the previous boot")
    if login_boot == previous.boot_id:
        return Decision(False, "an SSH login succeeded during the previous boot")
    gap = now.time - previous.time
    if not 0 <= gap <= window:
        return Decision(False, f"the previous boot was {gap:.0f} s ago (wall clock), outside "
                               f"the window of {window:.0f} s")
    if previous.digest != now.digest:
        return Decision(False, "the firewall files changed during the previous boot")
    return Decision(True, f"two boots {gap:.0f} s apart (window {window:.0f} s) with no SSH "
                          "login in between")


# --------------------------------------------------------------------------------------------
def disk_layers(root: Path = Path("/")) -> dict[str, bytes]:
    """The files the next start of the loaders and of sshd reads, as history layers: the boot
    files that exist (ipv4, ipv6, nft), ufw's files, /etc/firewalld (files only) and sshd's
    (on `/` only)."""
    layers: dict[str, bytes] = {}
    for layer, path in BOOT_FILES.items():
        try:
            layers[layer] = local_path(root, path).read_bytes()
        except OSError:
            continue
    ufw = capture_ufw_files(root)
    if json.loads(ufw).get("files"):
        layers["ufw"] = ufw
    if local_path(root, FIREWALLD_DIR).is_dir():
        layers["firewalld"] = files_only_layer(root)
    if root == Path("/"):
        sshd, _ = known_good.capture_sshd()
        if sshd is not None:
            layers["sshd"] = sshd
    return {name: normalize_layer(name, data) for name, data in layers.items()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def last_recovery(state: StateDir) -> dict[str, Any] | None:
    data = _read_json(state.root / RECOVERY)
    return data if isinstance(data, dict) else None


def status_info(state: StateDir) -> dict[str, Any] | None:
    """For `fwsafe status`: the last power-cycle recovery, and whether it was this boot."""
    last = last_recovery(state)
    if last is None:
        return None
    return {**last, "this_boot": last.get("boot_id") == transaction.current_boot_id()}


def describe(info: dict[str, Any]) -> str:
    return (f"power-cycle recovery at {format_time(float(info.get('time') or 0))}: "
            f"{info.get('why')}; put back the known-good state {info.get('entry')} "
            f"({', '.join(info.get('written') or []) or 'no file'}); the state found on the "
            f"disk is kept as {info.get('undo')}: `fwsafe rollback {info.get('undo')}` "
            "puts it back (under the guard)")


def at_boot(state: StateDir, *, window: float = DEFAULT_WINDOW, enabled: bool = True,
            root: Path = Path("/"), now: float | None = None) -> tuple[Decision, dict[str, Any] | None]:
    """The boot unit's step: record this boot, and recover when `decide` says so. Returns the
    decision and, when it recovered, what it did (also in power-cycle.json)."""
    boot_id = transaction.current_boot_id() or ""
    marked, _ = loginhook.active(root, str(state.root))
    with state.locked(wait=True):
        layers = disk_layers(root)
        this = Boot(boot_id, time.time() if now is None else now, layers_digest(layers), marked)
        previous = Boot.from_json(_read_json(state.root / BOOTS))
        mark = loginhook.read_mark(state.root)
        decision = decide(previous, this, mark[0] if mark else None, window, enabled=enabled)
        if previous is not None and previous.boot_id == this.boot_id:
            return decision, None     # keep the record of this boot's start
        done: dict[str, Any] | None = None
        if decision.recover:
            try:
                done, decision = _recover(state, root, layers, decision)
            except (HistoryError, OSError, ValueError) as exc:   # said, and the boot counted
                why = exc.message if isinstance(exc, HistoryError) else str(exc)
                decision = Decision(False, f"{decision.why}, but the recovery FAILED: {why}")
            this.digest = layers_digest(disk_layers(root))
        atomic_write(state.root / BOOTS, json.dumps(this.to_json(), sort_keys=True).encode())
    return decision, done


def _recover(state: StateDir, root: Path, layers: dict[str, bytes],
             decision: Decision) -> tuple[dict[str, Any] | None, Decision]:
    try:
        found, damaged = list_history(state.root)
        entry = last_good(found, damaged)
    except HistoryError as exc:
        return None, Decision(False, f"{decision.why}, but no known-good state to put back: "
                                     f"{exc.message}")
    plan = plan_restore(entry, root)
    # /etc/firewalld exactly as the entry has it (modes, owners, the directories; the files
    # that appeared since removed): not with the rescue plan's backups next to the files, as
    # the state found is kept whole in the history (`undo`) anyway.
    plan.changes = [change for change in plan.changes if change.layer != "firewalld"]
    firewalld = _firewalld_changed(entry, root)
    if not plan.changes and not firewalld:
        return None, Decision(False, f"{decision.why}, but the files already hold the last "
                                     f"known-good state {entry.id}")
    replaced = {change.layer for change in plan.changes} | ({"firewalld"} if firewalld else set())
    undo_layers = {name: _undoable(name, data) for name, data in layers.items()
                   if name in replaced}
    undo, _ = known_good.add_entry(state, undo_layers, {
        "summary": f"the firewall files found at boot, before the power-cycle recovery put "
                   f"back {entry.id} ({decision.why}); `fwsafe rollback` of this entry undoes "
                   "it", "who": {}, "recovered_to": entry.id},
        dedup=False, kind=BEFORE_RECOVERY)
    written = [change.server_path for change in write_plan(plan, root)]
    if firewalld:
        restore_tree(*tree_from_json(json.loads(entry.layers["firewalld"])), root)
        written += firewalld
    info = {"format": FORMAT, "time": time.time(), "boot_id": transaction.current_boot_id(),
            "why": decision.why, "entry": entry.id, "undo": undo.id, "written": written,
            "notes": plan.notes + plan.warnings}
    atomic_write(state.root / RECOVERY, json.dumps(info, sort_keys=True).encode())
    _announce(root, info)
    return info, Decision(True, decision.why)


def _firewalld_changed(entry: Entry, root: Path) -> list[str]:
    """The paths below /etc/firewalld that differ from `entry` (content, mode, owner, there or
    not), when this host has firewalld and the entry a firewalld layer."""
    if "firewalld" not in entry.layers or not local_path(root, FIREWALLD_DIR).is_dir():
        return []
    try:
        dirs, files = tree_from_json(json.loads(entry.layers["firewalld"]))
    except ValueError as exc:   # FirewalldFilesError, JSONDecodeError
        raise HistoryError(f"the firewalld layer of {entry.id} is damaged: {exc}") from exc
    live_dirs, live_files = read_tree(root)
    return sorted({p for p in set(files) | set(live_files) if files.get(p) != live_files.get(p)}
                  | {p for p in set(dirs) | set(live_dirs) if dirs.get(p) != live_dirs.get(p)})


def _undoable(name: str, data: bytes) -> bytes:
    """A boot file as a layer `rollback` can apply: nftables.conf without `flush ruleset`
    (a rollback replaces the native tables it names; a flush would take iptables-nft's too)."""
    if not layer_has(name, NFT_TABLES):   # an nft script: nftables.conf
        return data
    return b"".join(line for line in data.splitlines(keepends=True)
                    if line.strip() != b"flush ruleset")


def _announce(root: Path, info: dict[str, Any]) -> None:
    """A message for the next login (pam_motd reads /run/motd.d; /run is empty at the next
    boot, so it is shown during this boot only). Best effort: the recovery is in the record."""
    motd = local_path(root, MOTD)
    text = ("\n*** fwsafe: " + describe(info) + ".\n*** `fwsafe status` and `fwsafe history` "
            "say more.\n\n")
    try:
        motd.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_file_atomically(motd, text.encode(), 0o644)
    except OSError:
        pass
