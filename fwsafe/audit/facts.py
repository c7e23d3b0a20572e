"""The host facts behind the findings that are not about listeners, each read without changing
anything: Docker's published ports (the live iptables rules), sshd's effective configuration
(`sshd -T`), the boot recovery unit (systemd hosts) and the transaction in the state directory.
Each returns its findings, or one "info" finding saying what could not be read."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from fwsafe.audit.docker import DockerState, docker_state
from fwsafe.audit.findings import (
    Finding,
    docker_findings,
    parse_sshd_t,
    pending_finding,
    sshd_findings,
)
from fwsafe.backends import available_layers, layer_for
from fwsafe.backends.base import ApplyError
from fwsafe.core import transaction
from fwsafe.core.config import OpenPort
from fwsafe.core.statedir import StateDir
from fwsafe.errors import FwsafeError
from fwsafe.guard.spawn import systemd_is_init
from fwsafe.persistence import boothook
from fwsafe.runner import find_binary, run

__all__ = ["boot_unit_findings", "docker_facts", "host_findings", "pending_findings",
           "running_sshd_options", "sshd_facts"]

_IPT = (("ipv4", 4), ("ipv6", 6), ("ipv4-legacy", 4), ("ipv6-legacy", 6))


def docker_facts(expected: Sequence[OpenPort]) -> tuple[DockerState, list[Finding]]:
    """Ports Docker publishes, from every iptables flavour this host has, and the findings."""
    present = set(available_layers())
    saves: list[tuple[int, str]] = []   # each flavour apart: a leftover legacy DOCKER chain
                                        # must not replace iptables-nft's (issue 29 point 6)
    for name, family in _IPT:
        if name not in present:
            continue
        try:
            text = layer_for(name).capture().decode(errors="replace")
        except ApplyError as exc:
            return DockerState(), [Finding(
                "info", f"could not read the {name} rules to look for Docker's published "
                f"ports: {exc.message}", exc.hint or "run the audit as root", "not-read")]
        saves.append((family, text))
    state = docker_state(saves)
    return state, docker_findings(state, expected)


def running_sshd_options(proc: Path = Path("/proc")) -> list[list[str]]:
    """The configuration options (``-f FILE``, ``-o K=V``) of every sshd daemon running in
    this network namespace (a listener, not a session: its parent is not an sshd), distinct;
    [] where none runs."""
    try:
        mine = os.stat(proc / "self" / "ns" / "net").st_ino
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []
    found: list[list[str]] = []
    for pid in pids:
        try:
            if (proc / pid / "comm").read_text().strip() != "sshd" \
                    or os.stat(proc / pid / "ns" / "net").st_ino != mine:
                continue
            argv = (proc / pid / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = (proc / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if (proc / ppid / "comm").read_text().strip() == "sshd":
                continue   # a session's process
        except (OSError, IndexError):
            continue
        options = _config_options(argv[1:])
        if options not in found:
            found.append(options)
    return found


def _config_options(args: list[str]) -> list[str]:
    options: list[str] = []
    for i, arg in enumerate(args[:-1]):
        if arg in ("-f", "-o"):
            options += [arg, args[i + 1]]
    for arg in args:
        if arg.startswith(("-f", "-o")) and len(arg) > 2:
            options += [arg[:2], arg[2:]]
    return options


def sshd_facts() -> list[Finding]:
    """Password logins allowed by sshd (if it is installed): the running daemons' own
    configuration (their -f and -o), else the default one."""
    sshd = find_binary("sshd")
    if sshd is None:
        return []
    found: list[Finding] = []
    for options in running_sshd_options() or [[]]:
        for finding in _sshd_t(sshd, options):
            if finding not in found:
                found.append(finding)
    return found


def _sshd_t(sshd: str, options: list[str]) -> list[Finding]:
    try:
        result = run([sshd, "-T", *options], timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [Finding("info", f"could not run `sshd -T`: {exc}", "run it by hand",
                        "not-read")]
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace").strip().splitlines()
        return [Finding("info", "could not read sshd's configuration: `sshd -T` failed"
                        + (f" ({error[0]})" if error else ""),
                        "run `sshd -T` as root to see why", "not-read")]
    return sshd_findings(parse_sshd_t(result.stdout.decode(errors="replace")))


def boot_unit_findings(state_dir: Path, boot_hook: bool) -> list[Finding]:
    """On a systemd host: is the boot recovery unit (fwsafe-recover.service) in place?"""
    if not systemd_is_init():
        return []
    if boothook.is_installed(Path("/"), str(state_dir)):
        return []
    if not boot_hook:
        return [Finding("low", f"the boot recovery unit ({boothook.UNIT_NAME}) is not "
                        "installed, and boot_hook = false in the config: a reboot while a change "
                        "is pending comes back with the new rules",
                        "set boot_hook = true (apply then installs it), or run "
                        "`fwsafe install-boot-hook`", "no-boot-unit")]
    return [Finding("medium", f"the boot recovery unit ({boothook.UNIT_NAME}) is not installed "
                    "(or is out of date): a reboot while a change is pending comes back with "
                    "the new rules", "`fwsafe install-boot-hook` (the next `fwsafe apply` "
                    "installs it too)", "no-boot-unit")]


def pending_findings(state_dir: Path) -> list[Finding]:
    """A transaction that is still open (pending, reverting, or whose revert failed)."""
    state = StateDir(state_dir)
    try:
        if not state.exists():
            return []
        record = transaction.load_current(state)
    except FwsafeError as exc:
        return [Finding("info", f"could not read the state directory {state_dir}: "
                        f"{exc.message}", exc.hint or "see `fwsafe status`", "not-read")]
    if record is None:
        return []
    open_states = transaction.OPEN_STATES | {transaction.PREPARING, transaction.REVERT_FAILED}
    if record.state not in open_states:
        return []
    return [pending_finding(record.id, record.state, record.remaining_s())]


def shim_findings() -> list[Finding]:
    """Whether plain `ufw`/`firewall-cmd` typed over SSH run under the guard
    (fwsafe.persistence.command_shims)."""
    # the shim's module is needed only when ufw/firewall-cmd's diversions are looked at
    from fwsafe.persistence import command_shims

    return [Finding("info", f"the shim is active: plain `{e['tool']}` typed in an SSH session "
                    "runs under the guard" if e["active"] else
                    f"plain `{e['tool']}` runs without the guard (no shim)",
                    "`fwsafe shim remove` restores the plain command" if e["active"] else
                    "`fwsafe shim install` makes it guard itself (opt-in)",
                    "shim" if e["active"] else "no-shim") for e in command_shims.status()]


def host_findings(state_dir: Path, boot_hook: bool) -> list[Finding]:
    """sshd, the boot unit, the shim and the transaction (Docker's: `docker_facts`)."""
    return [*sshd_facts(), *boot_unit_findings(state_dir, boot_hook), *shim_findings(),
            *pending_findings(state_dir)]
