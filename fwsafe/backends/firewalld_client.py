"""Talking to firewalld: firewall-cmd (the real one behind the shim), its listings read in one
process with firewall-cmd's own Python, runtime commands run the same way, the kernel's
firewalld tables, and systemd asked to start or stop it or whether it is active.

The firewalld layer (fwsafe.backends.firewalld_layer) reverts through these; the model they
read and the commands they run are parsed and computed in fwsafe.backends.firewalld_model.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fwsafe.backends.base import ApplyError, RetryLog
from fwsafe.backends.firewalld_model import parse_ipsets, parse_listing
from fwsafe.ondisk import hatch_rules
from fwsafe.ondisk.firewalld_files import FIREWALLD_TABLES
from fwsafe.persistence.command_shims import REAL_SUFFIX
from fwsafe.runner import find_binary, run, run_persistently

FIREWALL_CMD = "firewall-cmd"
TOOL_TIMEOUT = 30.0
RELOAD_TIMEOUT = 90.0
KERNEL_TABLES = tuple(sorted(FIREWALLD_TABLES))
NOT_RUNNING = 252   # firewall-cmd's exit status when firewalld is not running

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


