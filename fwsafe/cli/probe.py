"""`fwsafe probe URL...`: run connectivity probes once, now, and report."""

from __future__ import annotations

import json
import sys

import click

from fwsafe.core.probes import ProbeResult, parse_probe, run_probes

PROBE_EPILOG = """\b
Probe forms:
  tcp://HOST:PORT                a TCP connect (the port is required)
  ssh://[USER@]HOST[:PORT]       TCP connect, SSH banner and key exchange; no login
  ssh-auth://USER@HOST[:PORT]    a full SSH key login that runs `true` (never a password)
  http://... / https://...       an HTTP(S) GET; any status below 500 counts as up
  cmd:COMMAND                    a local command (no shell); exit 0 is up
IPv6 literals go in brackets: tcp://[fd00::1]:22

\b
Exit codes (this is a query; nothing is changed):
  0  every probe passed
  1  at least one probe failed
  2  a bad probe URL or option
"""


def format_table(results: list[ProbeResult]) -> str:
    """The results as a table: url, result, latency, error (or detail when it passed)."""
    rows = [("URL", "RESULT", "LATENCY", "ERROR")]
    for result in results:
        rows.append((
            result.url,
            "ok" if result.ok else "FAIL",
            f"{result.latency_s * 1000:.0f} ms",
            result.error or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
    return "\n".join(lines)


@click.command(epilog=PROBE_EPILOG)
@click.argument("urls", nargs=-1, required=True, metavar="URL...")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=3.0,
              show_default=True, help="Seconds each probe may take.")
@click.option("-i", "--identity", metavar="KEY",
              help="SSH private key for ssh-auth:// probes (default: ssh-agent, default keys).")
@click.option("--known-hosts", metavar="FILE",
              help="Verify ssh-auth:// host keys against FILE (default: not verified).")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object on stdout: {"ok": ..., "results": [...]}.')
def probe(urls: tuple[str, ...], timeout_s: float, identity: str | None,
          known_hosts: str | None, as_json: bool) -> None:
    """Run the probes URL... once, all at the same time, and report each result.

    The same probes `fwsafe apply --probe` runs during the confirmation window: use this to
    check them before a change. Exit 0 if every probe passed, 1 if any failed, 2 for a bad
    URL.

    \b
    Examples:
      fwsafe probe tcp://10.0.0.1:22 https://10.0.0.1/healthz
      fwsafe probe --json ssh-auth://root@[fd00::1] -i ~/.ssh/id_ed25519
    """
    probes = [parse_probe(url) for url in urls]  # a bad URL: UsageError, exit 2
    results = run_probes(probes, timeout=timeout_s, key_filename=identity,
                         known_hosts=known_hosts)
    ok = all(result.ok for result in results)
    if as_json:
        click.echo(json.dumps({"ok": ok, "results": [r.to_json() for r in results]},
                              sort_keys=True))
    else:
        click.echo(format_table(results))
    if not ok:
        # Not an error to report (the results say it all) and not click's Exit (whose code
        # fwsafe.cli.main does not pass on with standalone_mode=False): just the status.
        sys.exit(1)


COMMANDS = [probe]
