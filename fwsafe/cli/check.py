"""`fwsafe check`: predict a lockout before applying, with the kernel's own verdict."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import click

from fwsafe.check.check_report import check_lines, left_out_line
from fwsafe.check.host import capture_host
from fwsafe.check.precheck import candidate_layers, warm_layers, warm_up
from fwsafe.check.predict import (
    DEFAULT_TIMEOUT,
    CheckReport,
    default_sessions,
    parse_clients,
    predict,
)
from fwsafe.cli.common import (
    EXIT_CODES_EPILOG,
    SeparatorCommand,
    after_separator,
    backend_option,
    echo_styled,
    partial_option,
    rules6_option,
)
from fwsafe.cli.ticker import StepTicker
from fwsafe.context import RUN
from fwsafe.core.change import Change, change_from_files, resolve_partial, validate_change
from fwsafe.core.config import load_config
from fwsafe.errors import LockoutPredicted, RejectedError, UsageError

if TYPE_CHECKING:
    from fwsafe.audit.audit_report import ExposureChange


@click.command(name="check", cls=SeparatorCommand, epilog=EXIT_CODES_EPILOG)
@click.argument("rules", nargs=-1, metavar="RULES... | -- COMMAND...")
@rules6_option
@click.option("--client", "clients", multiple=True, metavar="IP[,IP...]",
              help="Management client address(es); repeatable. Default: the client of this SSH "
                   "session ($SSH_CONNECTION), else the clients of the established SSH sessions.")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Management (SSH) port. Default: this session's server port, else sshd's "
                   "Port/ListenAddress (22).")
@backend_option
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1, max=60),
              default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds one connection attempt may take in the sandbox.")
@partial_option()
@click.option("--no-exposure", is_flag=True,
              help="Skip the exposure section (which services the change opens or closes to "
                   "the world and the local subnets, as `fwsafe audit` sees them).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def check(rules: tuple[str, ...], rules6: str | None, clients: tuple[str, ...],
          port: int | None, backend: str, timeout_s: float, partial: bool, no_exposure: bool,
          as_json: bool) -> None:
    """Predict whether applying RULES (or running `-- COMMAND`, e.g. `-- ufw deny 22/tcp`,
    which is first run on a copy of the firewall) would lock you out, without changing
    anything.

    RULES are an iptables-save file (IPv4) and/or an nftables file (recognised by content);
    --rules6 an ip6tables-save file. The candidate is loaded into a throwaway pair of network
    namespaces that mimics this host's management path (the interface name and addresses the
    SSH traffic arrives on, the client's address, the port), on top of a copy of the current
    firewall; then real packets test, with the real kernel:

    \b
      - a NEW TCP connection from each client to the management port;
      - a connection opened under the CURRENT rules, after the switch;
      - the same over IPv6 for IPv6 clients.

    Where packets are lost, the rule that dropped them is named with its file and line (from
    the kernel's packet counters or nft trace). Rules whose outcome the sandbox cannot
    reproduce (rate limits, socket owners, marks, time, ...) are listed as NOT checked where
    the management path's packets meet them and they could decide their fate (-v: all).
    Then, as `fwsafe audit` does, every listening service is tried from the world and the
    local subnets under the current rules and the candidate: the services the change opens
    or closes are listed (JSON: "exposure"). The live firewall is only read.

    A command runs in a sandbox where every file is a private copy and no daemon of this
    host is reachable; one that talks to a daemon (firewall-cmd to firewalld over D-Bus)
    cannot be tried there and is refused unrun (exit 3).

    Exit 0: the management path stays open; 1: lockout predicted; 3: invalid rules, or a
    command that failed on the copy or cannot be tried on one (nothing changed).
    """
    # Beside the main thread: reading the host, the validation, the pruning analysis (of the
    # candidate and of the host's layers), the exposure and its sandbox.
    with StepTicker(sys.stderr, total=2, enabled=not as_json and RUN.verbosity >= 0) as tick, \
            ThreadPoolExecutor(max_workers=5) as pool:
        _check(tick, pool, rules, rules6, clients, port, backend, timeout_s, partial,
               no_exposure, as_json)


def _check(tick: StepTicker, pool: ThreadPoolExecutor, rules: tuple[str, ...],
           rules6: str | None, clients: tuple[str, ...], port: int | None, backend: str,
           timeout_s: float, partial: bool, no_exposure: bool, as_json: bool) -> None:
    # The host's firewall is read once, while the candidate is validated, for the lockout
    # check and the exposure alike.
    tick.step("reading the live firewall and validating the rules")
    host = pool.submit(capture_host)
    validating: Future[None] | None = None
    if after_separator():  # `fwsafe check -- ufw deny 22/tcp`: run on a copy, check the result
        # loaded by the command that uses it only: every other command (and --help) starts faster
        from fwsafe.backends.ufw_layer import prepare_command

        change = Change(run=prepare_command(list(rules))[0])
        validate_change(change)
    elif not rules and not rules6:
        raise click.UsageError("give RULES (IPv4 or nft) and/or --rules6 RULES6, or -- COMMAND")
    else:
        change = change_from_files(rules, rules6, backend,
                                   limit=load_config(None).max_rules_bytes)
        if partial:
            # loaded by the command that uses it only: every other command (and --help) starts
            # faster
            from fwsafe.backends import layer_for

            change.partial = True
            change = resolve_partial(change, {name: layer_for(name).capture()
                                              for name in change.layers})
        pool.submit(warm_up, change)   # beside the validation, for the sandbox's pruning
        # The validation runs beside the reading and the lockout check; it is heard first:
        # an invalid file is reported as such, whatever the rest made of it.
        validating = pool.submit(validate_change, change)
    try:
        report, exposure = _predict(tick, pool, change, host, validating is not None, clients,
                                    port, timeout_s, no_exposure)
    except Exception:   # an interruption is not waited for
        if validating is not None:
            validating.result()
        raise
    if validating is not None:
        validating.result()
    if as_json:
        data = report.to_json()
        if exposure is not None:
            data["exposure"] = exposure[0]
        tick.step("")
        click.echo(json.dumps(data, sort_keys=True))
        if report.lockout:
            click.echo(f"fwsafe: error: {report.lockout_message()}", err=True)
            # The report above is the one JSON object on stdout (it carries "kind", "error" and
            # "exit_code" as fwsafe's error objects do): exit 1 without printing a second one.
            # (click returns, not raises, an Exit when not in standalone mode, so: SystemExit.)
            sys.exit(int(LockoutPredicted.exit_code))
        return
    tick.step("")
    verbose = RUN.verbosity >= 1
    lines, left_out = check_lines(report, verbose)
    section = exposure[1] if exposure is not None else None
    if isinstance(section, str):
        lines.append(section)
    elif section is not None:
        more_lines, more = section.summary(verbose, rules_listed=True)
        lines += more_lines
        left_out += more
    line = left_out_line(left_out)
    text = "\n".join(lines + ([line] if line else []))
    first, _, rest = text.partition("\n")
    echo_styled(first, fg="red" if report.lockout else "yellow" if report.unknown else "green",
                bold=True)
    click.echo(rest)
    if report.lockout:  # the report above names the paths and the culprits: not again here
        raise LockoutPredicted(f"lockout predicted on port {report.port}",
                               hint="nothing was changed; fix the rule named above and check again")


def _predict(tick: StepTicker, pool: ThreadPoolExecutor, change: Change,
             host: Future[dict[str, bytes]], validated: bool, clients: tuple[str, ...],
             port: int | None, timeout_s: float, no_exposure: bool
             ) -> tuple[CheckReport, tuple[dict[str, Any], ExposureChange | str] | None]:
    """The lockout check, and the exposure beside it (each its own sandbox), on the host's
    layers as read; the pruning analysis of those goes on in the pool meanwhile."""
    # A rules file is checked without the host's reading: each sandbox is built while it
    # goes on, and waits for it then (a command runs on a copy of the host's layers: first).
    pool.submit(lambda: warm_layers(host.result()))   # the sandboxes are built meanwhile
    layers = candidate_layers(change, host.result() if change.run is not None else None)
    sessions, default_port = default_sessions(port=port)   # --port: sshd's not looked up
    chosen = parse_clients(list(clients))
    if not chosen:
        chosen = [s.client for s in sessions]
    if not chosen:
        raise UsageError(
            f"no SSH client known: not in an SSH session and no established connection to port "
            f"{default_port} found; give the address you manage this host from with --client IP")
    servers = {s.client: s.server for s in sessions if s.client in chosen}
    tick.step("predicting a lockout" + ("" if no_exposure else " and the exposure")
              + " in scratch namespaces")
    pending = None if no_exposure or not validated else pool.submit(
        lambda: _exposure(layers, timeout_s, host.result()))
    report = predict(layers, clients=chosen, port=port or default_port, servers=servers,
                     timeout=timeout_s, validate=not validated, captured=host.result)
    exposure = None if no_exposure else (
        pending.result() if pending is not None else _exposure(layers, timeout_s,
                                                                host.result()))
    return report, exposure


def _exposure(layers: dict[str, tuple[bytes, str]], timeout: float,
              captured: Mapping[str, bytes]) -> tuple[dict[str, Any], ExposureChange | str]:
    """What the change opens or closes to outside addresses (fwsafe audit's difference), as
    JSON and for the text; a sandbox that cannot be built is reported in the section, never
    fails the check (an interruption still ends it)."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.audit import exposure_change

    try:
        change = exposure_change(layers, timeout=timeout, captured=captured)
    except RejectedError as exc:
        return {"error": exc.message}, f"Exposure: not checked ({exc.message})"
    return change.to_json(), change


COMMANDS = [check]
