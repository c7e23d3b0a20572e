"""`fwsafe apply` (rules files, or `-- COMMAND` under the guard; `--host` from a workstation),
`fwsafe ufw`, and what follows an apply: the countdown, or the report that the guard is armed."""

from __future__ import annotations

import sys
import time

import click

from fwsafe.backends.ufw_layer import prepare_command
from fwsafe.cli.common import (
    EXIT_CODES_EPILOG,
    TIMEOUT_HELP,
    SeparatorCommand,
    after_separator,
    apply_options,
    backend_option,
    clock,
    config_from,
    echo_styled,
    emit,
    manager_for,
    partial_option,
    progress,
    rules6_option,
    state_options,
)
from fwsafe.cli.screens import after_apply
from fwsafe.cli.ticker import StepTicker
from fwsafe.context import RUN
from fwsafe.control.flow import ApplyOptions
from fwsafe.control.manager import Manager
from fwsafe.core import transaction
from fwsafe.core.change import Change, change_from_files
from fwsafe.core.probes import parse_probe
from fwsafe.core.transaction import Record
from fwsafe.errors import (
    FwsafeError,
)


@click.command(cls=SeparatorCommand, epilog=EXIT_CODES_EPILOG)
@click.argument("args", nargs=-1, metavar="[RULES] | -- COMMAND...")
@rules6_option
@click.option("--timeout", "timeout_s", metavar="SECONDS", default=None, help=TIMEOUT_HELP)
@click.option("--detach", is_flag=True,
              help="Return once the change is live and the guard armed (confirm later).")
@click.option("--probe", "probes", multiple=True, metavar="URL",
              help="Run this probe during the window (tcp://, ssh://, ssh-auth://, http(s)://, "
                   "cmd:); repeatable. N failures in a row revert at once.")
@click.option("--probe-interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between probe rounds (default 2).")
@click.option("--probe-failures", type=click.IntRange(min=1), default=None,
              help="Consecutive failures of one probe that revert early (default 3).")
@click.option("--probe-timeout", type=click.FloatRange(min=0.1), default=None,
              help="Seconds each probe attempt may take (default 3, or the probe interval if "
                   "that is shorter: a failing round then takes no longer than the interval).")
@click.option("--confirm-on-probe", type=click.IntRange(min=1), default=None, metavar="M",
              help="Confirm by itself once every probe passed M times in a row.")
@click.option("--yes", is_flag=True,
              help="No prompt: wait for the probes (or the remote login) to decide.")
@click.option("--host", metavar="[USER@]HOST[:PORT]",
              help="Run from your workstation: apply on HOST over SSH and confirm only through a "
                   "NEW SSH login (a host name from the config works too).")
@click.option("-i", "--identity", metavar="KEY", help="SSH private key for --host.")
@click.option("--known-hosts", metavar="FILE", help="known_hosts for --host (default ~/.ssh/known_hosts).")
@click.option("--accept-new-host-key", is_flag=True,
              help="With --host: trust an unknown host key and record it (a changed key is "
                   "always refused).")
@backend_option
@click.option("--force", is_flag=True,
              help="Apply even when the lockout check predicts that SSH would be cut, or when "
                   "the file would delete chains that fail2ban, Docker, kube-proxy, ... created "
                   "(the guard still reverts unless confirmed).")
@partial_option("Replace only the chains the file names (nft: the tables it defines); every "
                "other chain, such as fail2ban's or Docker's, stays as it is live.")
@click.option("--no-check", is_flag=True,
              help="Skip the lockout check (e.g. after running `fwsafe check` yourself).")
@click.option("--exposure/--no-exposure", default=None,
              help="Show which services the change opens or closes to outside addresses "
                   "(`fwsafe audit`'s difference; a second sandbox, 1-2 s). Default: on a "
                   "terminal, not with --json or --no-check.")
@click.option("--sshd-set", "sshd_set", multiple=True, metavar="KEY=VALUE",
              help="Also change sshd's configuration (repeatable), e.g. Port=2222: one guard, "
                   "one confirmation, reverted together (see `fwsafe sshd set`).")
@click.option("--sshd-config", metavar="PATH", help="The sshd configuration for --sshd-set.")
@state_options
def apply(args: tuple[str, ...], rules6: str | None, timeout_s: str | None, detach: bool,
          probes: tuple[str, ...], probe_interval: float | None, probe_failures: int | None,
          probe_timeout: float | None, confirm_on_probe: int | None, yes: bool,
          host: str | None, identity: str | None,
          known_hosts: str | None, accept_new_host_key: bool, backend: str, force: bool,
          partial: bool, no_check: bool, exposure: bool | None, sshd_set: tuple[str, ...],
          sshd_config: str | None,
          as_json: bool, state_dir: str | None, config_path: str | None) -> None:
    """Apply RULES and/or --rules6 RULES6, or run `-- COMMAND`, under the guard.

    RULES is an iptables-save file (IPv4) or an nftables file (recognised by content);
    RULES6 an ip6tables-save file. Everything changes under one guard and reverts together.
    A full file replaces the tables it names. One that would delete chains other programs
    created since it was written (fail2ban's f2b-*, Docker's DOCKER*, kube-proxy's KUBE-*,
    ufw's) is refused with exit 3, naming them, unless --force; --partial replaces only the
    chains the file names (iptables-restore --noflush style) and leaves the rest.

    After `--`, a command (typically ufw) runs under the guard: every layer (iptables,
    nftables, ufw's files) is snapshotted first, and a revert restores what the command
    touched. ufw's "may disrupt existing ssh connections" prompt is answered with --force:
    the guard is the safety net.

    Order: validate, predict a lockout (`fwsafe check`: the candidate is tried with the real
    kernel in a scratch namespace against the SSH clients of this host; a predicted lockout is
    refused with exit 3 unless --force), snapshot, record the transaction, start the guard,
    apply atomically, then wait for confirmation.

    On a terminal (and without --detach) a countdown runs: type `yes` to keep the change;
    `no`, Ctrl-C, end of input or losing the session reverts at once. The stronger proof is
    `fwsafe confirm` from a NEW SSH session: established connections survive rules that drop
    new ones, so a keypress in the old session proves little.

    Without a terminal, or with --detach, fwsafe returns as soon as the change is live and
    prints the transaction id, the deadline and the confirm command.

    \b
    Examples:
      fwsafe apply new.rules --rules6 new.rules6
      fwsafe apply new.nft
      fwsafe apply --timeout 120 -- ufw deny 23/tcp
      fwsafe apply --detach --json --timeout 120 new.rules
      fwsafe apply --probe tcp://10.0.0.1:22 --confirm-on-probe 3 --yes new.rules
      fwsafe apply --host admin@web1 -i ~/.ssh/id_ed25519 new.rules     (from your laptop)
    """
    config = config_from(config_path)
    options = apply_options(
        config, timeout_s,
        probes=list(probes) or list(config.probes),
        probe_interval=probe_interval if probe_interval is not None else config.probe_interval,
        probe_failures=probe_failures if probe_failures is not None else config.probe_failures,
        probe_timeout=probe_timeout if probe_timeout is not None else min(
            config.probe_timeout,
            probe_interval if probe_interval is not None else config.probe_interval),
        confirm_on_probe=confirm_on_probe or 0,
        check=not no_check,
        force=force,
    )
    for url in options.probes:
        parse_probe(url)  # a bad probe is a usage error before anything happens
    if options.confirm_on_probe and not options.probes:
        raise click.UsageError("--confirm-on-probe needs at least one --probe")
    if sshd_set and (after_separator() or host):
        raise click.UsageError("--sshd-set takes rules files on this host, not a command or --host")
    if after_separator():  # command mode: `fwsafe apply [OPTIONS] -- ufw deny 22/tcp`
        if partial:
            raise click.UsageError("--partial takes rules files, not a command")
        if host:
            raise click.UsageError("--host takes rules files, not a command")
        _apply_command(list(args), options, detach=detach, yes=yes, as_json=as_json,
                       manager=manager_for(state_dir, config, converge=False))
        return
    rules = args[0] if len(args) == 1 else None
    if len(args) > 1:
        raise click.UsageError("give one RULES file (IPv4) and --rules6 for IPv6; "
                               "to run a command under the guard put it after `--`")
    if not rules and not rules6 and not sshd_set:
        raise click.UsageError("give RULES (IPv4 or nft) and/or --rules6 RULES6")
    if host:
        # loaded by the command that uses it only: every other command (and --help) starts faster
        from fwsafe.remote.remote_apply import RemoteRequest, apply_remote

        if detach:
            raise click.UsageError("--detach does not go with --host: the workstation's job is "
                                   "to confirm through a new SSH login")
        target = config.resolve_host(host)
        options.partial = partial
        result = apply_remote(RemoteRequest(
            target=target, rules=rules, rules6=rules6, options=options,
            identity=identity or target.key, known_hosts=known_hosts or target.known_hosts,
            accept_new_host_key=accept_new_host_key, remote_state_dir=state_dir,
        ), progress=timestamped_progress)
        emit(result, as_json, f"confirmed ({result.get('confirmed_via')}): transaction "
                               f"{result.get('id')} on {target} stays")
        return
    change = change_from_files([rules] if rules else [], rules6, backend,
                               limit=config.max_rules_bytes)
    for note in change.notes:  # e.g. Windows line ends made plain
        progress(note)
    change.partial = partial
    if sshd_set:
        # loaded by the command that uses it only: every other command (and --help) starts faster
        from fwsafe.cli.sshd import add_sshd_settings

        add_sshd_settings(change, sshd_config, sshd_set)
    manager = manager_for(state_dir, config, converge=False)
    if exposure if exposure is not None else (options.check and not as_json
                                               and sys.stderr.isatty()):
        options.before_apply = show_exposure
    steps = 3 + int(options.check) + int(options.before_apply is not None)
    with StepTicker(sys.stderr, total=steps, enabled=not as_json and RUN.verbosity >= 0) as tick:
        options.step = tick.step
        record = manager.apply(change, options)
    after_apply(manager, record, detach=detach, yes=yes, as_json=as_json)


def show_exposure(complete: Change) -> None:
    """Once the change is validated and passed the lockout check, before it is live: which
    services it newly exposes to, or closes for, outside addresses (`fwsafe audit`'s
    difference), on stderr. A sandbox that cannot be built is said in one line."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.audit import exposure_change
    from fwsafe.check.precheck import candidate_layers

    try:
        layers = candidate_layers(complete)
        if not layers:
            return
        text = exposure_change(layers).describe(RUN.verbosity >= 1)
    except FwsafeError as exc:
        progress(f"exposure: not checked ({exc.message})")
        return
    for line in text.splitlines():
        progress(line)


def _apply_command(argv: list[str], options: ApplyOptions, *, detach: bool, yes: bool,
                   as_json: bool, manager: Manager) -> None:
    """Run a command (typically ufw) under the guard: every layer is snapshotted first, and a
    revert restores whatever the command touched (files and rules)."""
    run, notes = prepare_command(argv)
    for note in notes:
        progress(note)
    change = Change(run=run, notes=notes)
    steps = 3 + int(options.check) + int(options.before_apply is not None)
    started = time.time()
    try:
        with StepTicker(sys.stderr, total=steps,
                        enabled=not as_json and RUN.verbosity >= 0) as tick:
            options.step = tick.step
            record = manager.apply(change, options)
    finally:
        _show_command_output(manager, started)
    if record.state == transaction.PENDING and not record.options.get("check", {}).get("ran"):
        _live_verdict(record)
    after_apply(manager, record, detach=detach, yes=yes, as_json=as_json)


def _live_verdict(record: Record) -> None:
    """A command that could not be tried on a copy (firewall-cmd) ran without a lockout check:
    ask the kernel now whether the SSH clients still get in through the live rules
    (firewalld's tables included), and say so. It changes nothing: the guard reverts at the
    deadline unless confirmed."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.check.proof import access_check

    access = access_check(record)
    if access is None:
        return
    try:
        ok, text = access({})   # nothing known: the layers are read now
    except Exception as exc:  # noqa: BLE001 - only a report; the guard decides
        progress(f"lockout check of the live change: could not run ({exc})")
        return
    if ok is False:
        echo_styled(f"fwsafe: lockout check of the live change: YOUR SSH CLIENT IS LOCKED OUT "
                    f"({text.removeprefix('access FAILED: ')}); it is reverted at "
                    f"{clock(record.deadline)} unless confirmed, `fwsafe revert` reverts now",
                    err=True, fg="red")
    else:
        progress(f"lockout check of the live change: {text.removeprefix('access: ')}")


def _show_command_output(manager: Manager, since: float) -> None:
    """What the command printed, if this apply ran it (a change refused before its
    transaction began ran it on a copy only: nothing to show, nothing changed)."""
    current = manager.current()
    if current is None or current.run is None or current.created < since:
        return
    out = manager.state.tx_dir(current.id) / "command.out"
    if out.exists():
        for line in out.read_text(errors="replace").splitlines():
            click.echo(f"  {current.run[0]}: {line}", err=True)


def timestamped_progress(message: str) -> None:
    click.echo(f"{time.strftime('%H:%M:%S')} fwsafe: {message}", err=True)


@click.command(epilog=EXIT_CODES_EPILOG, context_settings={
    "ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--timeout", "timeout_s", metavar="SECONDS", default=None, help=TIMEOUT_HELP)
@click.option("--detach", is_flag=True, help="Return once the change is live (confirm later).")
@click.option("--force", is_flag=True,
              help="ufw's own --force (no y/n prompt; fwsafe adds it where ufw would ask). It "
                   "does not override the lockout check: `fwsafe apply --force -- ufw ...` does.")
@click.option("--no-check", is_flag=True, help="Skip the lockout check.")
@state_options
@click.argument("ufw_args", nargs=-1, type=click.UNPROCESSED, metavar="UFW-ARGS...")
def ufw(timeout_s: str | None, detach: bool, force: bool, no_check: bool, as_json: bool,
        state_dir: str | None, config_path: str | None, ufw_args: tuple[str, ...]) -> None:
    """Run `ufw UFW-ARGS...` under the guard (same as `fwsafe apply -- ufw UFW-ARGS...`).

    fwsafe's own options come before the ufw arguments:

    \b
      fwsafe ufw deny 23/tcp
      fwsafe ufw --timeout 120 enable
    """
    config = config_from(config_path)
    # `fwsafe ufw --force enable` is what ufw's users type: ufw's --force, never fwsafe's.
    if force:
        ufw_args = ("--force", *ufw_args)
    options = apply_options(config, timeout_s, check=not no_check, force=False)
    _apply_command(["ufw", *ufw_args], options, detach=detach, yes=False, as_json=as_json,
                   manager=manager_for(state_dir, config, converge=False))



@click.command("firewall-cmd", epilog=EXIT_CODES_EPILOG, context_settings={
    "ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--timeout", "timeout_s", metavar="SECONDS", default=None, help=TIMEOUT_HELP)
@click.option("--detach", is_flag=True, help="Return once the change is live (confirm later).")
@state_options
@click.argument("firewall_cmd_args", nargs=-1, type=click.UNPROCESSED,
                metavar="FIREWALL-CMD-ARGS...")
def firewall_cmd(timeout_s: str | None, detach: bool, as_json: bool, state_dir: str | None,
                 config_path: str | None, firewall_cmd_args: tuple[str, ...]) -> None:
    """Run `firewall-cmd FIREWALL-CMD-ARGS...` under the guard (same as
    `fwsafe apply -- firewall-cmd FIREWALL-CMD-ARGS...`).

    firewalld's files (/etc/firewalld) and its runtime model are snapshotted first; a revert
    puts the files back, reloads firewalld and puts the runtime back through firewall-cmd.
    firewall-cmd talks to the live firewalld, so it is not tried on a copy first: the lockout
    check does not run. A permanent change and its reload go in one apply:
    `fwsafe apply -- sh -c 'firewall-cmd --permanent ... && firewall-cmd --reload'`.

    \b
      fwsafe firewall-cmd --remove-service=dhcpv6-client
      fwsafe firewall-cmd --timeout 120 --zone=public --add-port=8080/tcp
    """
    config = config_from(config_path)
    options = apply_options(config, timeout_s, check=True, force=False)
    _apply_command(["firewall-cmd", *firewall_cmd_args], options, detach=detach, yes=False,
                   as_json=as_json, manager=manager_for(state_dir, config, converge=False))


COMMANDS = [apply, ufw, firewall_cmd]
