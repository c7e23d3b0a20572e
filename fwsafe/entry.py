"""The `fwsafe` command (and `python -m fwsafe`).

`fwsafe apply` and `fwsafe check` start reading the live firewall here, before the command line
interface is imported (`fwsafe.core.prefetch`), and list nftables tables in this process
(`fwsafe.backends.libnft`); everything else is `fwsafe.cli.main`.
"""

from __future__ import annotations

import os
import sys

from fwsafe.tool_stack import raise_for_tools


def reads_the_firewall(args: list[str]) -> bool:
    """An `apply` or a `check` on this host (not `--host`, not `--help`)."""
    if args[:1] not in (["apply"], ["check"]):
        return False
    return not any(arg in ("-h", "--help") or arg.startswith("--host") for arg in args[1:])


def main() -> None:
    raise_for_tools()   # before any thread or tool starts (iptables-save of 80k chains)
    if reads_the_firewall(sys.argv[1:]):
        # the early firewall read is started only for an apply or a check on this host
        from fwsafe.backends import libnft
        from fwsafe.core import prefetch

        libnft.enable()

        try:
            prefetch.start()
        except Exception:  # noqa: BLE001 - the apply reads the firewall itself, and reports
            pass
    # the CLI is loaded after the firewall read has started (that is the point of entry.py)
    from fwsafe.cli import main as run

    try:
        run()
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):
            raise
    else:
        code = 0
    # Done: skip the interpreter's teardown (freeing every object of a large ruleset costs
    # tens of milliseconds); what is still buffered is written first.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
