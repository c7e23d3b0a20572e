"""firewalld: its permanent configuration, its runtime model, and commands run under the guard.

firewalld owns the ruleset on its hosts and keeps a model of it; the kernel's tables
(`table inet firewalld`, nftables backend) are what it generates from that model. Restoring the
tables behind its back would leave the model wrong, and the next `firewall-cmd --reload` or
boot would bring the change back. So the "firewalld" layer holds:

    files     /etc/firewalld, every file and directory with its mode and owner
              (fwsafe.ondisk.firewalld_files), one unit per file: "file /etc/firewalld/zones/public.xml"
    runtime   firewalld's model as `firewall-cmd` lists it: one unit per zone ("zone public":
              target, services, ports, protocols, sources, interfaces, rich rules, masquerade,
              forward-ports, source-ports, icmp-blocks, ...) and per policy ("policy NAME"),
              "direct" (chains, rules, passthroughs), "ipset NAME" (its entries),
              "panic" (panic mode: yes/no), "default-zone", "running"
    kernel    firewalld's tables as the kernel has them ("kernel": the lines of
              `nft list table inet firewalld`, sorted, counters left out): the proof that what
              firewalld generated is what it had before

A revert goes through firewalld: the files back (byte-identical), firewalld started if it was
running and is not, then its runtime model put back: with runtime commands alone when the
files did not change (no `--reload`: Docker rewrites its iptables chains at every reload of
firewalld), else `firewall-cmd --reload` and the runtime-only differences put back; then a
check that the model, the files and the kernel's tables are as in the snapshot. What others
changed in the runtime model during the window (Docker's bridges in its zone, another
program's rich rules or ports) is kept: a three-way merge of the model (merge_models).
A reload (or firewalld started, stopped) flushes every iptables table, and Docker writes its
chains again: the layer says so (FLUSHES_IPTABLES, Layer.disturbed), runs `before_flush` first
(core reads the iptables layers there) and waits until Docker is done (settle_after_reload);
core then reverts the iptables layers from what others had left (core.revert).
The nft layer leaves firewalld's tables to this layer (backends.owned_elsewhere).

Commands run under the guard in command mode (`fwsafe apply -- firewall-cmd ...`,
`fwsafe firewall-cmd ...`); firewall-cmd talks to the live daemon over D-Bus, so it is never
tried on a copy: it runs for the first time under the guard, after the snapshot.

This module is the layer; firewalld is talked to in fwsafe.backends.firewalld_client
(firewall-cmd, its Python, systemd), its model parsed, merged and turned into runtime commands
in fwsafe.backends.firewalld_model, and the wait after a reload is fwsafe.backends.firewalld_settle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fwsafe.backends import nflist
from fwsafe.backends.base import (
    FILES,
    FLUSHES_IPTABLES,
    MERGE,
    ROLLBACK,
    SNAPSHOT_TABLES,
    ApplyError,
    Layer,
    RetryLog,
)
from fwsafe.backends.firewalld_client import (
    FIREWALL_CMD,
    NOT_RUNNING,
    RELOAD_TIMEOUT,
    booting,
    ensure_running,
    firewall_cmd,
    is_running,
    kernel_tables,
    read_model,
    run_all,
    systemctl_firewalld,
    unit_active,
)
from fwsafe.backends.firewalld_model import (
    kernel_delta_left,
    merge_models,
    runtime_commands,
    same_shape,
)
from fwsafe.backends.firewalld_settle import HANDLE_TABLE, in_thread, settle_after_reload
from fwsafe.errors import InvalidRulesError
from fwsafe.ondisk.firewalld_files import (
    FILES_ONLY,
    FIREWALLD_DIR,
    read_tree,
    restore_tree,
    tree_from_json,
    tree_json,
)
from fwsafe.runner import find_binary

FILE_UNITS = ("file ", "dir ")   # the units kept on disk; the rest is firewalld's runtime


def _normal_kernel(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        lines.append(" ".join(w for w in line.split() if w))
    return sorted(lines)


class FirewalldLayer(Layer):
    name = "firewalld"
    label = "firewalld"
    tools = (FIREWALL_CMD,)
    # firewalld's files (it starts from them); its reload flushes the iptables tables
    facts = frozenset({FILES, ROLLBACK, FLUSHES_IPTABLES})

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def available(self) -> bool:
        return (find_binary(FIREWALL_CMD) is not None
                and (self.root / FIREWALLD_DIR.lstrip("/")).is_dir())

    # -- reading --------------------------------------------------------------------------
    def capture(self) -> bytes:
        return self._capture(read_model())

    def _capture(self, runtime: dict[str, Any] | None) -> bytes:
        dirs, files = read_tree(self.root)
        state = {"running": runtime is not None, "runtime": runtime,
                 "kernel": kernel_tables() if runtime is not None else {},
                 **tree_json(dirs, files)}
        handles = nflist.table_handles() if runtime is not None else None
        if handles and handles.get(HANDLE_TABLE) is not None:
            state["handle"] = handles[HANDLE_TABLE]   # made again at each reload: settle
        return json.dumps(state, sort_keys=True, indent=1).encode() + b"\n"

    def in_nf_tables(self) -> bool:
        return False   # the files and firewalld's model are not: always read again

    def settle(self, before: bytes | None, log: RetryLog) -> None:
        """A change that reloaded firewalld (`firewall-cmd --reload`: its table made again, a
        new handle since the capture `before`): the capture after it waits until Docker has
        written its chains again (settle_after_reload). Not after a runtime change (the same
        table): what others do right after it stays theirs."""
        try:
            old = self._load(before).get("handle") if before else None
        except InvalidRulesError:
            old = None
        handles = nflist.table_handles()
        now = handles.get(HANDLE_TABLE) if handles is not None else None
        if now is not None and old == now:
            return
        log(settle_after_reload())

    @staticmethod
    def _load(data: bytes) -> dict[str, Any]:
        try:
            state = json.loads(data.decode() if data.strip() else "{}")
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRulesError(f"damaged firewalld snapshot: {exc}") from exc
        if not isinstance(state, dict):
            raise InvalidRulesError("damaged firewalld snapshot: not a JSON object")
        return state

    def units(self, data: bytes) -> dict[str, str]:
        state = self._load(data)
        dirs, files = tree_from_json(state)
        units = {f"file {path}": f"mode {m:o} owner {u}:{g} sha256 "
                                 f"{hashlib.sha256(c).hexdigest()}"
                 for path, (m, u, g, c) in files.items()}
        units.update({f"dir {path}": f"mode {m:o} owner {u}:{g}"
                      for path, (m, u, g) in dirs.items()})
        if state.get(FILES_ONLY):   # the power cycle's: no runtime model
            return units
        units["running"] = "yes" if state.get("running") else "no"
        runtime = state.get("runtime")
        if isinstance(runtime, dict):
            units["default-zone"] = str(runtime.get("default-zone", ""))
            for kind, key in (("zone", "zones"), ("policy", "policies")):
                for name, entries in (runtime.get(key) or {}).items():
                    units[f"{kind} {name}"] = json.dumps(entries, sort_keys=True)
            units["direct"] = json.dumps(runtime.get("direct"), sort_keys=True)
            if "panic" in runtime:
                units["panic"] = str(runtime["panic"])
            for name, entries in (runtime.get("ipsets") or {}).items():
                units[f"ipset {name}"] = " ".join(entries)
            kernel = state.get("kernel") or {}
            units["kernel"] = "\n".join(f"{table}\n" + "\n".join(_normal_kernel(text))
                                        for table, text in sorted(kernel.items()))
        return units

    def unit_texts(self, data: bytes) -> dict[str, str]:
        state = self._load(data)
        _dirs, files = tree_from_json(state)
        texts = {f"file {path}": c.decode(errors="replace")
                 for path, (_m, _u, _g, c) in files.items()}
        runtime = state.get("runtime")
        if isinstance(runtime, dict):
            for kind, key in (("zone", "zones"), ("policy", "policies")):
                for name, entries in (runtime.get(key) or {}).items():
                    texts[f"{kind} {name}"] = "".join(
                        f"{k}: {' '.join(v) if k not in ('forward-ports', 'rich rules') else ''}"
                        + "".join(f"\n\t{x}" for x in v
                                  if k in ("forward-ports", "rich rules")) + "\n"
                        for k, v in sorted(entries.items()))
            for name, entries in (runtime.get("ipsets") or {}).items():
                texts[f"ipset {name}"] = "".join(f"{e}\n" for e in entries)
            texts["direct"] = "".join(f"{k}: {line}\n" for k, lines in
                                      sorted((runtime.get("direct") or {}).items())
                                      for line in lines)
        return texts

    def validate(self, change: bytes, source: str) -> None:
        try:
            tree_from_json(self._load(change))
        except ValueError as exc:
            raise InvalidRulesError(f"{source}: {exc}", path=source) from exc

    def apply(self, change: bytes, source: str) -> None:
        """Put firewalld as a whole into the state of a snapshot (a rollback)."""
        left = self.revert(change, None, sorted(self.units(change)))
        if left:
            raise ApplyError("firewalld is not as in the snapshot: " + ", ".join(left))

    # -- the way back -----------------------------------------------------------------------
    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        """The files back, firewalld running (or stopped) as before, its runtime model put
        back, then compared whole with the snapshot. What others changed in the runtime
        model during the window (`after` -> live: Docker's bridges in its zone, fail2ban's
        rich rules) is kept (merge_models). When the files are as in the snapshot, the model
        is put back with runtime commands alone: no `--reload`, which would make Docker
        rewrite its iptables chains (and lose DOCKER-USER's place at the top of FORWARD);
        else `firewall-cmd --reload` and the runtime-only differences put back. When that
        did not do (the caller tries the next `level`): always the reload; at the last level
        (SNAPSHOT_TABLES) the snapshot's model alone, others' changes undone too."""
        say = on_retry or (lambda _message: None)
        # read while this revert reads firewalld's model; waited for before anything that
        # flushes the iptables tables (a reload, firewalld started or stopped)
        self.ready_to_flush = in_thread(self.before_flush)
        try:
            return self._revert(before, after, units, level, say)
        finally:
            self.ready_to_flush()

    def _revert(self, before: bytes, after: bytes | None, units: Sequence[str], level: str,
                say: RetryLog) -> list[str]:
        state = self._load(before)
        dirs, files = tree_from_json(state)
        files_back = read_tree(self.root) != (dirs, files)
        if files_back:
            restore_tree(dirs, files, self.root)
        wanted = set(units)
        if state.get(FILES_ONLY):   # the files alone (the power cycle's): firewalld follows them
            wanted = {u for u in wanted if u.startswith(FILE_UNITS)}
            if is_running():
                say("firewalld: its files are as in the snapshot (files only); "
                    "firewall-cmd --reload")
                self.ready_to_flush()
                code, _out, err = firewall_cmd("--reload", timeout=RELOAD_TIMEOUT)
                if code != 0:
                    raise ApplyError(f"firewall-cmd --reload failed (exit {code}): "
                                     f"{err.strip()}")
                self.disturbed = True
                say(settle_after_reload())
        runtime = any(not u.startswith(FILE_UNITS) for u in wanted)
        model: dict[str, Any] | None = None   # the runtime model now, when known
        regenerated = True   # firewalld made its tables again from its model (a reload)
        want: dict[str, Any] = dict(state.get("runtime") or {})
        if runtime and state.get("running"):
            after_model = (self._load(after).get("runtime")
                           if after is not None and level != SNAPSHOT_TABLES else None)
            in_place = level == MERGE and not files_back
            # the live model: for the merge and for the runtime commands (about 1 s: read
            # only when one of them needs it)
            now = read_model() if in_place or isinstance(after_model, dict) else None
            if now is not None and isinstance(after_model, dict):
                want, kept = merge_models(want, after_model, now)
                if kept:
                    say("firewalld: keeping what others changed in its runtime model during "
                        "the window: " + "; ".join(kept))
            if in_place and now is not None and same_shape(now, want):
                say("firewalld: its files are as in the snapshot; putting its runtime model "
                    "back without a reload")
                booted, model = True, put_back(now, want, say)
                regenerated = False
            else:
                booted, model = self._reload_and_put_back(want, say)
                self.disturbed = booted
            if not booted:
                # At boot (the boot unit runs before firewalld.service): firewalld starts
                # from the files put back; starting it from here would wait for ourselves.
                say("firewalld is not started yet (boot): its files are back, it starts "
                    "from them")
                wanted = {u for u in wanted if u.startswith(FILE_UNITS)}
            else:
                wanted.add("running")
        elif runtime and is_running():
            self.ready_to_flush()
            self.disturbed = True
            systemctl_firewalld("stop", say)
            wanted.add("running")
        say("firewalld: comparing its files, model and tables with the snapshot")
        now_state = self._capture(model) if model is not None else self.capture()
        target = before
        if want != (state.get("runtime") or {}):
            # others' runtime changes kept: the model is compared with the merged one; the
            # kernel's tables follow from that model (firewalld generates them), so they are
            # not compared with the snapshot's
            target = json.dumps({**state, "runtime": want}).encode()
            if "kernel" in wanted and after is not None and not regenerated:
                # ... but without a reload, the change's own delta in them (an `nft add rule
                # inet firewalld ...` behind firewalld's back: no model explains it) must be
                # gone (a reload makes the tables from the model alone)
                left = kernel_delta_left(state, self._load(after), self._load(now_state))
                if left:
                    say("firewalld: the change's own lines are still in its tables: "
                        + "; ".join(left[:5]))
                    return [f"{self.label} kernel"]
            wanted.discard("kernel")
        old, new = self.units(target), self.units(now_state)
        return [f"{self.label} {u}" for u in sorted(wanted) if old.get(u) != new.get(u)]

    def _reload_and_put_back(self, want: Mapping[str, Any], say: RetryLog
                             ) -> tuple[bool, dict[str, Any] | None]:
        """`--reload`, or firewalld started when it is not running (it reads the files put
        back: no reload after the start), then the runtime-only
        differences from `want` put back. (False, None) at boot, when firewalld is not
        started yet; else (True, the model now if nothing had to be put back, else None)."""
        self.ready_to_flush()
        code, err = NOT_RUNNING, ""
        if unit_active() is not False:
            say("firewalld: its files are as in the snapshot; firewall-cmd --reload")
            code, _out, err = firewall_cmd("--reload", timeout=RELOAD_TIMEOUT)
        if code != 0 and (code == NOT_RUNNING or not is_running()):
            if booting():
                return False, None
            # started, it reads the files put back: no reload after it (a firewall-cmd
            # --reload is a second start of its model, and one more flush for Docker)
            ensure_running(say)
            code = 0
        if code != 0:
            raise ApplyError(f"firewall-cmd --reload failed (exit {code}): {err.strip()}")
        say("firewalld: running with its files; reading its runtime model")   # (a heartbeat)
        # The reload flushed the iptables tables and Docker writes its chains again: waited
        # for while the model is read (that commits nothing; the runtime commands do, and
        # Docker answers a reload only), so that the iptables layers' revert, next, reads
        # what Docker leaves and nothing it writes lands after it.
        with ThreadPoolExecutor(max_workers=1) as pool:
            settled = pool.submit(settle_after_reload)
            now = read_model()
            say(settled.result())
        if now is None:
            raise ApplyError("firewalld stopped during its reload")
        return True, put_back(now, want, say)


def put_back(now: Mapping[str, Any], want: Mapping[str, Any], say: RetryLog
             ) -> dict[str, Any] | None:
    """The runtime commands that turn the model `now` into `want`, run; the model now when
    nothing had to be done (else None: read it again)."""
    phases = runtime_commands(now, want)
    if not phases:
        return dict(now)
    say(f"firewalld: putting back {sum(map(len, phases))} runtime difference(s) "
        "with firewall-cmd")
    for phase in phases:
        run_all(phase, say)
    return None


