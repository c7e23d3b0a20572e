"""The kernel escape hatch: SSH comes back even when no fwsafe process can run.

The guard reverts at the deadline and its backstop takes over when the guard dies or is stuck;
both are processes. On a host where every process can be frozen or killed at once (memory
pressure, a container without CAP_SYS_RESOURCE, a hung disk), neither runs. So every apply
also loads, with the change, a rule that the kernel itself enforces: at the top of every base
chain that can drop on the hooks SSH packets traverse (prerouting, input, output,
postrouting), in every table of the layers the change can alter, it accepts SSH (sshd's ports;
any state; both directions) from and to the addresses the lockout check protects (the applying
SSH client and `admin_sources`), from the deadline + `hatch_grace` on:

    iptables   -s CLIENT -p tcp -m multiport --dports 22 -m time --datestart 2026-...T...
               -m comment --comment "fwsafe-hatch:TX:OPENS:ID" -j ACCEPT      (UTC)
    nftables   ip saddr { CLIENT } tcp dport { 22 } meta time >= OPENS accept
               comment "fwsafe-hatch:TX:OPENS:ID"                             (Unix time)

Before that moment the rule matches nothing. Confirm and revert remove it (each layer in one
transaction) and read the tables back to prove it gone; extend moves it. It only ever opens
SSH, only for the listed sources; a wall-clock step (NTP) moves the moment it opens, nothing
else (the guard moves it back when it sees one).

Nobody else sees it: every capture of iptables or nft text goes through `strip` (the backends'
`capture`), so snapshots, the merge, the boot files, the history, the rescue tool, `check`,
`diff` and the neighbours' refusal never find it.

The hatch is loaded in the same transaction as a rules-file change (`with_change`: the
`iptables-restore` payload or the `nft -f` script carries it); where that transaction is
refused with it and accepted without it (a kernel without the time match), the change is
loaded alone and the hatch is marked unsupported. A command run under the guard (`ufw ...`)
makes its own transactions: the hatch is put in before the command runs and checked again
(and put back where the command's restore removed it) right after it (`sync`).

This module keeps it (`Keeper`, the guard's side; `removed`, the way back's) and says what
status shows (`describe`). What it is and its rules: fwsafe.guard.hatch_spec; loaded with a
rules-file change: fwsafe.guard.hatch_change; the chains as listed: fwsafe.guard.hatch_chains;
made what it must be in the kernel: fwsafe.guard.hatch_sync; the lo bridge past an owned
table: fwsafe.guard.hatch_bridge.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from fwsafe.guard.hatch_bridge import BRIDGE_PASSED
from fwsafe.guard.hatch_chains import OWNED
from fwsafe.guard.hatch_spec import Log, Spec, plan_from_options, spec_for
from fwsafe.guard.hatch_sync import Proved, available_layers, sync


def may_be_loaded(info: Mapping[str, Any] | None) -> bool:
    """A transaction's hatch (its record's `hatch`) may still be in the kernel: armed, or its
    removal begun and not proved."""
    return (info or {}).get("state") in ("armed", "removing")


def describe(info: Mapping[str, Any] | None, final: bool = False) -> str | None:
    """One line for `fwsafe status` (`final`: the transaction is over)."""
    if not info:
        return None
    state = info.get("state")
    if final and may_be_loaded(info):
        return ("hatch: STILL LOADED although the transaction is over (its guard ended before "
                "removing it, and it could not be removed yet): every fwsafe command tries "
                "again, and `fwsafe apply` removes it first")
    if state == "off":
        return f"hatch: none ({info.get('why', 'off')})"
    layers = info.get("layers") or {}
    failed = {k: v for k, v in layers.items() if str(v).startswith("error")}
    where = ", ".join(k for k, v in layers.items() if str(v).split(";")[0] == "loaded") \
        or "no layer"
    opens = info.get("opens")
    when = time.strftime("%H:%M:%S", time.localtime(opens)) if opens else "?"
    who = ", ".join([*info.get("sources4", []), *info.get("sources6", [])])
    ports = ",".join(str(p) for p in info.get("ports", []))
    if state == "removed":
        text = "hatch: removed (checked: none left)"
    elif state in ("removing", "armed"):
        verb = "still loaded, being removed" if state == "removing" else "armed"
        text = (f"hatch: {verb}: SSH (port {ports}) from {who} is let in by the kernel from "
                f"{when} (deadline + {info.get('grace', '?')} s) in {where}")
    else:
        text = f"hatch: {state}"
    if failed:
        text += "; NOT loaded in " + "; ".join(f"{k} ({v[7:]})" for k, v in failed.items())
    owned = [str(v).split("; not in ", 1)[1].split(" (", 1)[0] for v in layers.values()
             if "; not in " in str(v)]
    if owned and state in ("removing", "armed"):
        text += f"; it CANNOT open SSH through {', '.join(owned)} ({OWNED})"
    bridged = [str(v).split(f"; {BRIDGE_PASSED} ", 1)[1] for v in layers.values()
               if f"; {BRIDGE_PASSED} " in str(v)]
    if bridged and state in ("removing", "armed"):
        text += (f"; past {', '.join(bridged)} (owned by another program) it loops SSH "
                 f"through lo, which that table accepts")
    return text


# --------------------------------------------------------------------------------------------
# Keeping it: the guard's side, and the way back's
# --------------------------------------------------------------------------------------------
def removed(record: Any, log: Log | None = None,
            proved: Mapping[str, Proved] | None = None) -> bool:
    """Remove every hatch rule (this transaction's and any left behind) from every layer of
    this system, and prove it by reading them back (or by the layers' states a revert just
    proved, `proved`: RevertResult.known); `record.hatch` says how it went. True when none is
    left."""
    states = sync(None, available_layers(), log, proved=proved)
    failed = any(state.startswith("error") for state in states.values())
    if record.hatch or failed:
        info = dict(record.hatch or {})
        info["layers"] = states
        info["state"] = "removing" if failed else (
            "removed" if info.get("state") != "off" else "off")
        record.hatch = info
    return not failed


class Keeper:
    """The guard's hatch: armed with the change, moved with the deadline, removed at the end."""

    def __init__(self, record: Any, log: Log) -> None:
        self.record = record
        self.log = log
        self.plan = plan_from_options(record.options)
        self.spec: Spec | None = None
        self.dirty = False      # a load or move that did not work yet: tried again
        self.removing = False   # the transaction ended: the hatch must go
        self.retry_at = 0.0

    def arm(self, deadline: float) -> Spec | None:
        """The hatch for the wall-clock `deadline` (None: no hatch for this transaction)."""
        wanted = self.record.options.get("hatch")
        if self.plan is None:
            why = wanted.get("why") if isinstance(wanted, dict) else None
            self.record.hatch = {"state": "off", "why": why or "not asked for"}
            return None
        self.spec = spec_for(self.record.id, self.plan, deadline)
        self.record.hatch = {
            "state": "armed", "opens": self.spec.opens, "grace": self.plan.get("grace"),
            "sources4": list(self.spec.sources4), "sources6": list(self.spec.sources6),
            "ports": list(self.spec.ports), "layers": {}}
        return self.spec

    def load(self, layers: Sequence[str]) -> int | None:
        """Put the hatch where it belongs in `layers` (and nowhere else), proved by reading.
        Returns the nf_tables commits made (None: not known, a load failed)."""
        if self.spec is None or self.removing:
            return 0
        commits: list[int] = []
        states = sync(self.spec, layers, self.log, commits)
        info = dict(self.record.hatch or {})
        info.update(layers=states, opens=self.spec.opens)
        self.record.hatch = info
        self.dirty = any(s.startswith("error") for s in states.values())
        self.log(f"hatch: SSH from {', '.join([*self.spec.sources4, *self.spec.sources6])} "
                 f"opens at {time.strftime('%H:%M:%S', time.localtime(self.spec.opens))}: "
                 + ", ".join(f"{k} {v}" for k, v in states.items()))
        return None if self.dirty or -1 in commits else sum(commits)

    def retime(self, deadline: float) -> bool:
        """Make the hatch open at `deadline` + grace (a new deadline, or the wall clock was
        stepped); True when that is another moment than the one loaded (2 s or more)."""
        if self.spec is None or self.removing or self.plan is None:
            return False
        wanted = spec_for(self.record.id, self.plan, deadline)
        if abs(wanted.opens - self.spec.opens) < 2:
            return False
        self.spec = wanted
        return True

    def follow(self, deadline: float, layers: Sequence[str]) -> None:
        """The deadline moved (extend) or the wall clock was stepped: move the hatch (one
        transaction per layer); a load that failed is tried again (at most every 5 s)."""
        moved = self.retime(deadline)
        if moved or (self.dirty and time.monotonic() >= self.retry_at):
            self.retry_at = time.monotonic() + 5.0
            self.load(layers)

    def remove(self, proved: Mapping[str, Proved] | None = None) -> bool:
        """The transaction ended: remove the hatch (and any left behind), proved by reading
        (`proved`: the layers' states a revert just proved, see `removed`)."""
        self.removing = True
        done = removed(self.record, self.log, proved)
        self.log("hatch: removed (checked: none left)" if done else
                 f"hatch: NOT removed yet: {self.record.hatch}")
        self.removing = not done
        return done
