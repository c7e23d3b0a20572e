"""`fwsafe audit`: what can the world reach? Every listener, and who outside gets through."""

from __future__ import annotations

import json
import sys

import click

from fwsafe.audit import DEFAULT_TIMEOUT, audit
from fwsafe.check.precheck import candidate_layers
from fwsafe.cli.common import (
    CONFIG_HELP,
    EXIT_CODES_EPILOG,
    STATE_DIR_HELP,
    backend_option,
    echo_styled,
    partial_option,
    rules6_option,
)
from fwsafe.cli.ticker import StepTicker
from fwsafe.context import RUN
from fwsafe.core.change import change_from_files, resolve_partial, validate_change
from fwsafe.core.config import load_config
from fwsafe.core.statedir import resolve_state_dir


@click.command(name="audit", epilog=EXIT_CODES_EPILOG)
@click.argument("rules", nargs=-1, metavar="[RULES...]")
@rules6_option
@backend_option
@partial_option()
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1, max=60),
              default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds one connection attempt may take in the sandbox.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--state-dir", help=STATE_DIR_HELP)
@click.option("--config", "config_path", help=CONFIG_HELP)
def audit_command(rules: tuple[str, ...], rules6: str | None, backend: str, partial: bool,
                  timeout_s: float, as_json: bool, state_dir: str | None,
                  config_path: str | None) -> None:
    """What can the world reach? Every listening socket (TCP and UDP, IPv4 and IPv6, with its
    process), and whether an outside address gets through to it under the live firewall, or
    under RULES before they are applied (an iptables-save file and/or an nftables file;
    --rules6 an ip6tables-save file).

    The kernel decides, not a reading of the rules: the lockout check's sandbox is built with
    this host's interfaces and addresses and its current firewall (RULES loaded on top, as
    apply would), each listener is mirrored there, and real packets are sent, a TCP connection
    attempt or a UDP datagram, from a "world" address arriving as the default route's traffic
    does and from an address of each local subnet. Loopback-only listeners are never exposed.

    \b
    Findings beside the listeners:
      - services the world reaches that the config's expected_open (default 22/tcp) omits;
      - ports Docker publishes past ufw / the INPUT rules (read from the live iptables);
      - sshd allowing password (or root password) logins (`sshd -T`);
      - no boot recovery unit (systemd hosts); a pending transaction.

    Exit 0: nothing unexpected is reachable from the world; 1: something is (for
    monitoring); 3: invalid RULES or the sandbox cannot be built. Nothing is changed.
    """
    config = load_config(config_path)
    candidate = None
    if rules or rules6:
        change = change_from_files(rules, rules6, backend, limit=config.max_rules_bytes)
        if partial:
            # loaded by the command that uses it only: every other command (and --help) starts
            # faster
            from fwsafe.backends import layer_for

            change.partial = True
            change = resolve_partial(change, {name: layer_for(name).capture()
                                              for name in change.layers})
        validate_change(change)
        candidate = candidate_layers(change)
    elif partial:
        raise click.UsageError("--partial needs RULES")
    with StepTicker(sys.stderr, total=1, enabled=not as_json and RUN.verbosity >= 0) as tick:
        tick.step("trying every listener from outside, in a scratch namespace")
        report = audit(config, resolve_state_dir(state_dir, config.state_dir),
                       candidate=candidate, timeout=timeout_s)
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=True))
    else:
        first, _, rest = report.describe(RUN.verbosity >= 1).partition("\n")
        echo_styled(first, fg="red" if report.exit_code else "green", bold=True)
        click.echo(rest)
    if report.exit_code:
        # (click returns, not raises, an Exit when not in standalone mode, so: SystemExit.)
        sys.exit(report.exit_code)


COMMANDS = [audit_command]
