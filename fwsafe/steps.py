"""The steps of an apply that live above `fwsafe.core`, handed to it by its callers: the lockout
check (`fwsafe.check`, and `fwsafe.sshd` for a change of sshd's config) and its head start, the
SSH clients and ports the kernel escape hatch lets in, the boot recovery unit and what a
confirm keeps (`fwsafe.persistence`). `core` names none of these packages
(tests/unit/test_architecture.py): `ApplyFlow` calls what `ApplyOptions` carries, `Manager`
what it was given. Every caller that applies (the CLI: fwsafe.cli.common; the lab tests) takes
them from here (`apply_steps`, `on_confirmed`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from fwsafe.backends import ON_DEMAND, layer_has
from fwsafe.check.proof import PROVER
from fwsafe.control.flow import ApplyOptions
from fwsafe.core.change import Change
from fwsafe.core.statedir import StateDir
from fwsafe.core.transaction import Record
from fwsafe.errors import CannotSimulateError, EnvironmentProblem, LockoutRefused
from fwsafe.guard.spawn import systemd_is_init

# The check's modules (the sandbox, the rules' analysis: some 100 ms to import) are imported in
# the steps that use them, so that a command that never checks (status, confirm) never loads
# them: "loaded only when used" below.


def lockout_check(change: Change, options: ApplyOptions,
                  captured: Mapping[str, bytes] | Callable[[], Mapping[str, bytes]] | None
                  = None) -> dict[str, Any]:
    """Predict a lockout (`options.check` is on); refuse a predicted one unless forced
    (exit 3). Returns the verdict kept in the record (its clients and port are the revert's
    second proof)."""
    if any(layer_has(name, ON_DEMAND) for name in change.layers):  # sshd's config
        # fwsafe.sshd imports fwsafe.check: loaded only for such a change
        from fwsafe.sshd.lockout import check_sshd_change

        return check_sshd_change(change, force=options.force, user=options.login_user)
    # loaded only when used (above)
    from fwsafe.check.check_report import precheck_summary, refusal_hint
    from fwsafe.check.clients import default_sessions
    from fwsafe.check.precheck import precheck

    try:
        report = precheck(change, captured=captured)
    except CannotSimulateError as exc:
        # A command that acts on a live daemon (firewall-cmd: firewalld over D-Bus) cannot be
        # tried on a copy, and was not run: the snapshot, taken before it, stays the state
        # before it; the guard runs it for the first time and reverts it unless confirmed.
        summary = (f"lockout NOT checked: the command cannot be tried on a copy (it reaches "
                   f"{exc.reached}); it runs for the first time under the guard, after the "
                   "snapshot")
        change.notes.append(summary)
        # The clients are still the revert's second proof (the kernel's verdict after it).
        sessions, port = default_sessions()
        return {"ran": False, "summary": summary, "clients": [s.client for s in sessions],
                "port": port}
    if report is None:
        return {"ran": False, "summary": "lockout check skipped: no SSH client known"}
    if report.lockout and not options.force:
        raise LockoutRefused(report.lockout_message(),
                             hint=refusal_hint(change.run, report.port))
    # The clients and port are the revert's second proof: they must get in again after it.
    return {"ran": True, "lockout": report.lockout, "summary": precheck_summary(report),
            "clients": report.clients, "port": report.port}


def ssh_access() -> tuple[list[str], list[int]]:
    """Who the kernel escape hatch lets in, and on which ports: this SSH session's client (or
    the established SSH sessions'), on its port, the sessions' and sshd's ports."""
    # loaded only when used (above)
    from fwsafe.check.clients import default_sessions, sshd_ports

    sessions, port = default_sessions()
    ports = sorted({port, *(s.server_port for s in sessions), *sshd_ports()})
    return [s.client for s in sessions], ports


def install_boot_hook(state_root: str) -> str | None:
    """On a systemd host, the boot recovery unit, installed before the first change (a reboot
    while a change is pending must come back with the old rules); if it cannot be, nothing is
    changed (exit 3). Returns the note for the change when it was installed now."""
    if not systemd_is_init():
        return None
    # the boot unit's writer is needed on the first apply only
    from fwsafe.persistence import boothook

    try:
        done = boothook.ensure_on_systemd(state_root)
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(
            f"cannot install the boot recovery unit ({boothook.UNIT_NAME}): {exc}",
            hint="nothing was changed; fix that, or set boot_hook = false in the config "
                 "to apply without a way back after a reboot") from exc
    if not done:
        return None
    return (f"installed the boot recovery unit {boothook.UNIT_NAME}: a reboot while a change "
            "is pending comes back with the old rules")


def on_confirmed(state: StateDir, record: Record) -> str:
    """What a confirm keeps (the state as known good, the boot files); never raises: the
    confirm stands (fwsafe.persistence.known_good.keep_confirmed)."""
    # the history and boot files' writers are needed on a confirm only
    from fwsafe.persistence.known_good import keep_confirmed

    return keep_confirmed(state, record)


def warm_change(change: Change) -> None:
    """The lockout check's work that needs only the change, done ahead; never raises."""
    # loaded only when used (above)
    from fwsafe.check.precheck import warm_up

    warm_up(change)


def warm_captures(captures: Mapping[str, Future[bytes]]) -> None:
    """The same for the host's layers, each as soon as it is read; never raises."""
    # loaded only when used (above)
    from fwsafe.check.precheck import warm_current

    warm_current(captures)


def apply_steps() -> dict[str, Any]:
    """The `ApplyOptions` fields of the steps above: every caller that applies passes them."""
    return {"lockout_check": lockout_check, "warm_change": warm_change,
            "warm_captures": warm_captures, "ssh_access": ssh_access,
            "install_boot_hook": install_boot_hook, "prover": PROVER}
