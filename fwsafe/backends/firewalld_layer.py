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
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
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
from fwsafe.errors import InvalidRulesError
from fwsafe.ondisk import hatch_rules
from fwsafe.ondisk.firewalld_files import (
    FILES_ONLY,
    FIREWALLD_DIR,
    FIREWALLD_TABLES,
    read_tree,
    restore_tree,
    tree_from_json,
    tree_json,
)
from fwsafe.persistence.command_shims import REAL_SUFFIX
from fwsafe.runner import find_binary, run, run_persistently

FIREWALL_CMD = "firewall-cmd"
TOOL_TIMEOUT = 30.0
RELOAD_TIMEOUT = 90.0
KERNEL_TABLES = tuple(sorted(FIREWALLD_TABLES))
NOT_RUNNING = 252   # firewall-cmd's exit status when firewalld is not running
FILE_UNITS = ("file ", "dir ")   # the units kept on disk; the rest is firewalld's runtime
# After a reload: firewalld flushes every iptables table (ip/ip6 filter, nat, mangle, raw:
# Docker's chains and the admin's rules in DOCKER-USER), says "Reloaded" on D-Bus, and Docker
# writes its chains again, one firewall-cmd passthrough at a time (about 0.1 s apart, done
# 0.2-0.5 s after the reload here). Others are done when nf_tables' generation has not moved
# for SETTLE_QUIET s; waited for at most SETTLE_LIMIT s (a program that commits all the time),
# less than the backstop's grace for a guard that says nothing (guard/backstop.py, 5 s).
HANDLE_TABLE = "inet firewalld"   # its handle is new after every reload
SETTLE_QUIET = 1.0
SETTLE_LIMIT = 4.0
SETTLE_POLL = 0.05

# `--list-all-zones` / `--list-all-policies` keys -> the firewall-cmd option that sets them
# at runtime (--add-X / --remove-X), lists of values ...
_LISTS = {"services": "service", "ports": "port", "protocols": "protocol",
          "source-ports": "source-port", "icmp-blocks": "icmp-block",
          "forward-ports": "forward-port", "rich rules": "rich-rule",
          "sources": "source", "interfaces": "interface",
          "ingress-zones": "ingress-zone", "egress-zones": "egress-zone"}
# ... and yes/no switches
_SWITCHES = {"masquerade": "masquerade", "icmp-block-inversion": "icmp-block-inversion",
             "forward": "forward"}
# Bound to one zone at a time: added with --change-X (moved from another zone).
_MOVED = frozenset({"sources", "interfaces"})


_LISTINGS = ("default-zone", "zones", "policies", "chains", "rules", "passthroughs", "ipsets",
             "panic")

# Run with firewall-cmd's own interpreter (-I: nothing from the current directory): the same
# client and printing code as `firewall-cmd --get-default-zone`, `--list-all-zones`,
# `--list-all-policies` and `--direct --get-all-chains/-rules/-passthroughs`, in one process.
READER = r"""
import contextlib, inspect, io, json, sys
from firewall.client import FirewallClient
from firewall.command import FirewallCommand
from firewall.functions import joinArgs
fw = FirewallClient()
if not fw.connected or fw.get_property("state") != "RUNNING":
    print(json.dumps({"state": "not running"}))
    sys.exit(0)
cmd = FirewallCommand(False, False)
cmd.set_fw(fw)
def text(show):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        show()
    return out.getvalue()
# firewalld 2.x's firewall-cmd marks the default and active zones and the active policies
# ("public (default, active)", "allow-host-ipv6 (active)"); 1.x's neither (its printing code
# takes no active_*): what the installed one does
def marks(show, active, **wanted):
    if active not in inspect.signature(show).parameters:
        return {}
    return {key: get() for key, get in wanted.items()}
def zones():
    extra = marks(cmd.print_zone_info, "active_zones", default_zone=fw.getDefaultZone,
                  active_zones=fw.getActiveZones)
    for zone in fw.getZones():
        cmd.print_zone_info(zone, fw.getZoneSettings(zone), **extra)
        cmd.print_msg("")
def policies():
    extra = marks(cmd.print_policy_info, "active_policies",
                  active_policies=fw.getActivePolicies)
    for policy in fw.getPolicies():
        cmd.print_policy_info(policy, fw.getPolicySettings(policy), **extra)
        cmd.print_msg("")
def ipsets():
    lines = []
    for ipset in fw.getIPSets():
        try:   # an ipset with a timeout has no entries firewalld keeps: left out
            entries = fw.getEntries(ipset)
        except Exception:
            continue
        lines.append(" ".join([ipset] + sorted(entries)) + "\n")
    return "".join(lines)
found = {
    "state": "running",
    "default-zone": fw.getDefaultZone() + "\n",
    "zones": text(zones),
    "policies": text(policies),
    "chains": "".join("%s %s %s\n" % c for c in fw.getAllChains()),
    "rules": "".join("%s %s %s %d %s\n" % (ipv, table, chain, priority, joinArgs(args))
                     for ipv, table, chain, priority, args in fw.getAllRules()),
    "passthroughs": "".join("%s %s\n" % (ipv, joinArgs(args))
                            for ipv, args in fw.getAllPassthroughs()),
    "ipsets": ipsets(),
    "panic": "yes\n" if fw.queryPanicMode() else "no\n",
}
print(json.dumps(found))
"""


# Run with firewall-cmd's own interpreter: firewall-cmd itself (its file, argv[1]) for each
# command of the JSON list on stdin, in this one process; [[status, stdout, stderr], ...].
RUNNER = r"""
import contextlib, io, json, runpy, sys
tool = sys.argv[1]
done = []
for argv in json.load(sys.stdin):
    sys.argv = [tool] + list(argv)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(tool, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:
            code = 1
            err.write(repr(exc))
    done.append([code, out.getvalue(), err.getvalue()])
sys.stdout = sys.__stdout__
print(json.dumps(done))
"""


class _NotRunning(Exception):
    pass


def _interpreter_of(tool: str | None) -> str | None:
    """The interpreter of a Python script (its #! line), None when it is not one."""
    if tool is None:
        return None
    try:
        with open(tool, "rb") as handle:
            first = handle.readline(256)
    except OSError:
        return None
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    if not words or "python" not in os.path.basename(words[-1] if words[0].endswith("env")
                                                     else words[0]):
        return None
    if words[0].endswith("/env"):
        return find_binary(words[1]) if len(words) > 1 else None
    return words[0]


def is_firewall_cmd(argv: Sequence[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == FIREWALL_CMD


def parse_listing(text: str) -> dict[str, dict[str, list[str]]]:
    """`firewall-cmd --list-all-zones` (or `--list-all-policies`) output ->
    {name: {key: [values]}}. A header line is the name (with "(active)"/"(default, active)"
    left out: those follow from the rest); "  key: a b c" gives words; lines starting with a
    tab under a key (forward-ports, rich rules) give one value each."""
    found: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    key = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t"):
            if current is not None and key:
                current.setdefault(key, []).append(line.strip())
            continue
        if not line.startswith(" "):
            name = line.split(" (", 1)[0].strip()
            current = found.setdefault(name, {})
            key = ""
            continue
        if current is None:
            continue
        key, _, value = line.strip().partition(":")
        current[key] = value.split() if key not in ("forward-ports", "rich rules") else (
            [value.strip()] if value.strip() else [])
    for entries in found.values():
        for name in entries:
            if name in _LISTS:
                entries[name] = sorted(entries[name])
    return found


def parse_ipsets(text: str) -> dict[str, list[str]]:
    """The ipsets listing (a line per ipset: its name, then its entries) -> {name: entries}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if words:
            found[words[0]] = sorted(words[1:])
    return found


def _normal_kernel(text: str) -> list[str]:
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        lines.append(" ".join(w for w in line.split() if w))
    return sorted(lines)


def _kernel_lines(state: Mapping[str, Any]) -> set[str]:
    """firewalld's tables in a capture as "table / chain / rule" lines (set elements and
    declarations included), for a three-way comparison."""
    lines: set[str] = set()
    for table, text in (state.get("kernel") or {}).items():
        where, elements = "", ""
        for raw in text.splitlines():
            line = " ".join(raw.split())
            if not line or line.startswith("#"):
                continue
            if elements or line.startswith("elements = {"):
                # a set's elements, one by one (others add theirs to the same line)
                elements += " " + line.removeprefix("elements = {")
                if not line.endswith("}"):
                    continue
                for element in elements.rstrip("}").split(","):
                    if element.strip():
                        lines.add(f"{table} / {where} / element {element.strip()}")
                elements = ""
                continue
            if line.startswith(("chain ", "set ", "map ")) and line.endswith("{"):
                where = line[:-1].strip()
            lines.add(f"{table} / {where} / {line}")
    return lines


def kernel_delta_left(before: Mapping[str, Any], after: Mapping[str, Any],
                      now: Mapping[str, Any]) -> list[str]:
    """The change's own delta in firewalld's tables (before -> after) that is still live in
    `now`: lines it added still there, lines it removed still missing."""
    old, changed, live = _kernel_lines(before), _kernel_lines(after), _kernel_lines(now)
    return sorted({f"added {line}" for line in changed - old if line in live}
                  | {f"removed {line}" for line in old - changed if line not in live})


def wait_quiet(generation: Callable[[], int | None] = nflist.generation, *,
               quiet: float = SETTLE_QUIET, limit: float = SETTLE_LIMIT,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> tuple[bool, int]:
    """Wait until nf_tables' generation has not moved for `quiet` seconds, `limit` seconds at
    most: (quiet reached, the commits seen meanwhile). (False, 0) at once when the generation
    cannot be read."""
    start = clock()
    first = generation()
    if first is None:
        return False, 0
    last, moved = first, start
    while True:
        now = clock()
        if now - moved >= quiet:
            return True, last - first
        if now - start >= limit:
            return False, last - first
        sleep(SETTLE_POLL)
        got = generation()
        if got is None:
            return False, last - first
        if got != last:
            last, moved = got, clock()


def in_thread(task: Callable[[], None] | None) -> Callable[[], None]:
    """`task` started in a thread; the call returned waits until it is done (again: at once)."""
    if task is None:
        return lambda: None
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(task)

    def wait() -> None:
        try:
            future.result()
        finally:
            pool.shutdown(wait=True)
    return wait


def settle_after_reload() -> str:
    """Wait for the programs that answer firewalld's reload (Docker: its iptables chains
    written again) to be done, so that what is read next (the iptables layers' three-way
    merge) is the state they leave, and nothing they write lands after it. What to log."""
    started = time.monotonic()
    quiet, commits = wait_quiet()
    waited = time.monotonic() - started
    if quiet:
        return (f"firewalld: others done answering its reload ({commits} commit(s) in "
                f"{waited:.1f} s, the last {SETTLE_QUIET:g} s quiet)")
    return (f"firewalld: nf_tables still moving {waited:.1f} s after the reload "
            f"({commits} commit(s)); going on")


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


def same_shape(now: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Runtime commands alone can turn `now` into `want`: the same zones, policies and
    default zone (those change with the permanent configuration and a reload)."""
    return (now.get("default-zone") == want.get("default-zone")
            and set(now.get("zones") or {}) == set(want.get("zones") or {})
            and set(now.get("policies") or {}) == set(want.get("policies") or {})
            and set(now.get("ipsets") or {}) == set(want.get("ipsets") or {}))


def merge_models(before: Mapping[str, Any], after: Mapping[str, Any], live: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], list[str]]:
    """The three-way merge of firewalld's runtime model: `before` (the snapshot) with what
    others changed between `after` (right after the change) and `live` (now), value by
    value: a value others added stays, one they removed stays removed, a switch they turned
    keeps their setting. Returns the merged model and a note per change kept."""
    merged: dict[str, Any] = json.loads(json.dumps(before))
    kept: list[str] = []
    for kind, key in (("zone", "zones"), ("policy", "policies")):
        b_all, a_all, l_all = (m.get(key) or {} for m in (before, after, live))
        for name in sorted(set(b_all) & set(a_all) & set(l_all)):
            b, a, lv = b_all[name], a_all[name], l_all[name]
            target = merged[key][name]
            for field in set(_LISTS) & (set(a) | set(lv)):
                old, new = set(a.get(field, [])), set(lv.get(field, []))
                if old == new:
                    continue
                values = (set(b.get(field, [])) | (new - old)) - (old - new)
                target[field] = sorted(values)
                kept += [f"{kind} {name} {field} +{v}" for v in sorted(new - old)]
                kept += [f"{kind} {name} {field} -{v}" for v in sorted(old - new)]
            for field in _SWITCHES:
                if a.get(field) != lv.get(field) and field in lv:
                    target[field] = lv[field]
                    kept.append(f"{kind} {name} {field} {' '.join(lv[field])}")
    b_sets, a_sets, l_sets = (m.get("ipsets") or {} for m in (before, after, live))
    for name in sorted(set(b_sets) & set(a_sets) & set(l_sets)):
        old, new = set(a_sets[name]), set(l_sets[name])
        if old != new:
            merged["ipsets"][name] = sorted((set(b_sets[name]) | (new - old)) - (old - new))
            kept += [f"ipset {name} +{v}" for v in sorted(new - old)]
            kept += [f"ipset {name} -{v}" for v in sorted(old - new)]
    b_direct, a_direct, l_direct = (m.get("direct") or {} for m in (before, after, live))
    direct = dict(merged.get("direct") or {})
    for field in ("chains", "rules", "passthroughs"):
        old, new = set(a_direct.get(field, [])), set(l_direct.get(field, []))
        if old != new:
            direct[field] = sorted((set(b_direct.get(field, [])) | (new - old)) - (old - new))
            kept += [f"direct {v} (+)" for v in sorted(new - old)]
            kept += [f"direct {v} (-)" for v in sorted(old - new)]
    merged["direct"] = direct
    if after.get("panic") != live.get("panic") and live.get("panic") in ("yes", "no"):
        merged["panic"] = live["panic"]
        kept.append(f"panic mode {live['panic']}")
    if after.get("default-zone") != live.get("default-zone") and live.get("default-zone"):
        merged["default-zone"] = live["default-zone"]
        kept.append(f"default zone {live['default-zone']}")
    return merged, kept


def firewall_cmd_path() -> str | None:
    """firewall-cmd, the real one where `fwsafe shim install` diverted it (PATH.fwsafe-real;
    the shim in its place is a shell script): the layer's own calls, and its readers run in
    firewall-cmd's own Python, never go through the shim."""
    tool = find_binary(FIREWALL_CMD)
    if tool is not None and os.access(tool + REAL_SUFFIX, os.X_OK):
        return tool + REAL_SUFFIX
    return tool


def firewall_cmd(*args: str, timeout: float = TOOL_TIMEOUT) -> tuple[int, str, str]:
    result = run_persistently([firewall_cmd_path() or FIREWALL_CMD, *args], timeout=timeout)
    return (result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"))


def is_running() -> bool:
    code, out, _ = firewall_cmd("--state")
    return code == 0 and out.strip() == "running"


def read_model() -> dict[str, Any] | None:
    """firewalld's runtime model, None when it is not running: read in one process with
    firewall-cmd's own Python and printing code (the same text as its listings); where
    that cannot run, with one firewall-cmd per listing, at once."""
    try:
        answers = listings_in_one_process()
    except _NotRunning:
        return None
    if answers is None:
        answers = listings_from_firewall_cmd()
    if answers is None:
        return None
    return {
        "default-zone": answers["default-zone"].strip(),
        "zones": parse_listing(answers["zones"]),
        "policies": parse_listing(answers["policies"]),
        "direct": {key: sorted(ln.strip() for ln in answers[key].splitlines()
                               if ln.strip())
                   for key in ("chains", "rules", "passthroughs")},
        "ipsets": parse_ipsets(answers["ipsets"]),
        "panic": answers["panic"].strip(),
    }


def listings_in_one_process() -> dict[str, str] | None:
    """The listings from one run of READER; None when it cannot run here (then the
    caller asks firewall-cmd itself), {"state": ...} alone when firewalld is not running."""
    python = _interpreter_of(firewall_cmd_path())
    if python is None:
        return None
    try:
        result = run_persistently([python, "-I", "-c", READER], timeout=TOOL_TIMEOUT)
        answers = json.loads(result.stdout.decode() or "null")
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if result.returncode != 0 or not isinstance(answers, dict):
        return None
    if answers.get("state") != "running":
        raise _NotRunning
    if not all(isinstance(answers.get(k), str) for k in _LISTINGS):
        return None
    return {k: answers[k] for k in _LISTINGS}


def listings_from_firewall_cmd() -> dict[str, str] | None:
    """The listings, one firewall-cmd each, at once (each spends most of its time
    starting Python); None when firewalld is not running."""
    queries = {
        "state": ("--state",),
        "default-zone": ("--get-default-zone",),
        "zones": ("--list-all-zones",),
        "policies": ("--list-all-policies",),
        "chains": ("--direct", "--get-all-chains"),
        "rules": ("--direct", "--get-all-rules"),
        "passthroughs": ("--direct", "--get-all-passthroughs"),
        "ipset names": ("--get-ipsets",),
        "panic": ("--query-panic",),
    }
    with ThreadPoolExecutor(max_workers=len(queries)) as pool:
        futures = {key: pool.submit(firewall_cmd, *args) for key, args in queries.items()}
        answers = {key: future.result() for key, future in futures.items()}
    code, out, _err = answers.pop("state")
    if code != 0 or out.strip() != "running":
        return None
    code, out, err = answers.pop("panic")   # `--query-panic`: 0 yes, 1 no
    if code not in (0, 1):
        raise ApplyError(f"firewall-cmd --query-panic failed (exit {code}): {err.strip()}")
    panic = out
    code, out, _err = answers.pop("ipset names")
    names = out.split() if code == 0 else []
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        entries = list(pool.map(lambda n: firewall_cmd(f"--ipset={n}", "--get-entries"), names))
    # an ipset with a timeout has no entries firewalld keeps (the command fails): left out
    ipsets = "".join(" ".join([name, *sorted(got[1].split())]) + "\n"
                     for name, got in zip(names, entries, strict=True) if got[0] == 0)
    for key, (code, _out, err) in answers.items():
        if code != 0:
            raise ApplyError(f"firewall-cmd {' '.join(queries[key])} failed "
                             f"(exit {code}): {err.strip()}")
    return {**{key: out for key, (_code, out, _err) in answers.items()}, "ipsets": ipsets,
            "panic": panic}


def commands_in_one_process(commands: list[list[str]]) -> list[tuple[int, str, str]] | None:
    """(exit status, stdout, stderr) of each firewall-cmd command, run one after the other by
    RUNNER; None when it cannot run here."""
    tool = firewall_cmd_path()
    python = _interpreter_of(tool)
    if tool is None or python is None:
        return None
    try:
        result = run_persistently([python, "-I", "-c", RUNNER, tool],
                                  input=json.dumps(commands).encode(),
                                  timeout=TOOL_TIMEOUT + 5 * len(commands))
        answers = json.loads(result.stdout.decode() or "null")
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if (result.returncode != 0 or not isinstance(answers, list)
            or len(answers) != len(commands)):
        return None
    return [(int(code), str(out), str(err)) for code, out, err in answers]


def kernel_tables() -> dict[str, str]:
    """firewalld's tables as the kernel has them (nft text, without counters)."""
    nft = find_binary("nft")
    tables: dict[str, str] = {}
    if nft is None:
        return tables
    for table in KERNEL_TABLES:
        result = run_persistently([nft, "list", "table", *table.split()],
                                  timeout=TOOL_TIMEOUT)
        if result.returncode == 0:   # the kernel escape hatch is nobody's rule
            tables[table] = hatch_rules.strip(result.stdout).decode(errors="replace")
    return tables


def run_all(commands: list[list[str]], say: RetryLog) -> None:
    """firewall-cmd commands, in one process (firewall-cmd itself, run again and again by
    RUNNER in its own Python: it starts once); where that cannot run, one firewall-cmd each,
    at once (firewalld takes them one by one)."""
    answers = commands_in_one_process(commands)
    if answers is None:
        with ThreadPoolExecutor(max_workers=min(8, len(commands))) as pool:
            answers = list(pool.map(lambda argv: firewall_cmd(*argv), commands))
    for argv, (code, _out, err) in zip(commands, answers, strict=True):
        if code != 0:
            say(f"firewall-cmd {shlex.join(argv)} failed (exit {code}): {err.strip()}")


def systemctl_firewalld(verb: str, say: RetryLog) -> None:
    systemctl = find_binary("systemctl")
    if systemctl is None:
        raise ApplyError(f"firewalld must be {verb}ed and there is no systemctl")
    if verb == "start":
        run_persistently([systemctl, "reset-failed", "firewalld.service"],
                         timeout=TOOL_TIMEOUT)
    result = run_persistently([systemctl, verb, "firewalld.service"], timeout=RELOAD_TIMEOUT)
    if result.returncode != 0:
        say(f"systemctl {verb} firewalld failed: "
            f"{result.stderr.decode(errors='replace').strip()}")


def ensure_running(say: RetryLog) -> None:
    """Start firewalld (its caller found it not running) and wait until it answers."""
    say("firewalld is not running: starting it")
    systemctl_firewalld("start", say)
    end = time.monotonic() + RELOAD_TIMEOUT
    while not is_running():
        if time.monotonic() > end:
            raise ApplyError("firewalld does not start")
        time.sleep(0.2)


def _systemd_says(*args: str) -> str | None:
    """systemctl's one-word answer (`is-active UNIT`, `is-system-running`); None without
    systemctl or an answer."""
    systemctl = find_binary("systemctl")
    if systemctl is None:
        return None
    try:
        result = run([systemctl, *args], timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.decode(errors="replace").strip()


def unit_active() -> bool | None:
    """firewalld.service active, as systemd says (no Python started: `firewall-cmd --state`
    takes a second on a small host); None without systemctl or an answer."""
    state = _systemd_says("is-active", "firewalld.service")
    return {"active": True, "reloading": True, "inactive": False, "failed": False}.get(
        state or "")


def booting() -> bool:
    """systemd is still starting the system (or shutting it down): no unit is started from a
    unit of the boot."""
    return _systemd_says("is-system-running") in ("initializing", "starting", "stopping")


def runtime_commands(now: Mapping[str, Any], want: Mapping[str, Any]) -> list[list[list[str]]]:
    """The firewall-cmd runtime commands that turn the model `now` into `want`, in two phases
    whose commands may run at once: the removals (a source or interface may move between
    zones; a direct chain's rules go before it) and the direct chains to add, then the
    additions (direct rules after the chains they use) and the direct chains to remove. One
    command per zone or policy and kind of value (firewall-cmd takes several values of one
    kind, not two kinds)."""
    removals: list[list[str]] = []
    additions: list[list[str]] = []
    for kind, key in (("zone", "zones"), ("policy", "policies")):
        have_all, want_all = now.get(key) or {}, want.get(key) or {}
        for name in sorted(set(have_all) & set(want_all)):
            scope = f"--{kind}={name}"
            have, wanted = have_all[name], want_all[name]
            for field, option in _LISTS.items():
                old, new = set(have.get(field, [])), set(wanted.get(field, []))
                gone, added = sorted(old - new), sorted(new - old)
                verb = "change" if field in _MOVED else "add"
                if gone:
                    removals.append([scope, *(f"--remove-{option}={v}" for v in gone)])
                if added:
                    additions.append([scope, *(f"--{verb}-{option}={v}" for v in added)])
            for field, option in _SWITCHES.items():
                old_on, new_on = have.get(field), wanted.get(field)
                if old_on != new_on and new_on in (["yes"], ["no"]):
                    verb = "add" if new_on == ["yes"] else "remove"
                    (additions if verb == "add" else removals).append(
                        [scope, f"--{verb}-{option}"])
    have_sets, want_sets = now.get("ipsets") or {}, want.get("ipsets") or {}
    for name in sorted(set(have_sets) & set(want_sets)):
        old, new = set(have_sets[name]), set(want_sets[name])
        if old - new:
            removals.append([f"--ipset={name}", *(f"--remove-entry={v}" for v in sorted(old - new))])
        if new - old:
            additions.append([f"--ipset={name}", *(f"--add-entry={v}" for v in sorted(new - old))])
    have_direct, want_direct = now.get("direct") or {}, want.get("direct") or {}

    def direct(verb: str, fields: tuple[tuple[str, str], ...]) -> list[list[str]]:
        found = []
        for field, option in fields:
            old, new = set(have_direct.get(field, [])), set(want_direct.get(field, []))
            values = old - new if verb == "remove" else new - old
            found += [["--direct", f"--{verb}-{option}", *shlex.split(v)]
                      for v in sorted(values)]
        return found

    rules = (("rules", "rule"), ("passthroughs", "passthrough"))
    chains = (("chains", "chain"),)
    phases = [removals + direct("remove", rules) + direct("add", chains),
              additions + direct("add", rules) + direct("remove", chains)]
    # panic mode (every packet dropped; firewalld refuses most changes in it, and a reload
    # keeps it): turned off before anything else, on after everything
    panic_off = [["--panic-off"]] if now.get("panic") == "yes" and want.get("panic") == "no" else []
    panic_on = [["--panic-on"]] if now.get("panic") == "no" and want.get("panic") == "yes" else []
    return [phase for phase in (panic_off, *phases, panic_on) if phase]
