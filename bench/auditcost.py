"""What `fwsafe audit` costs (issue 29: within 2x of the audit before it), measured two ways.

``rules N``: a lab server (a default route via the client, so the world is tried) holds N
rules ``-A INPUT -s 10.A.B.C/32 -j DROP``, a DROP policy and one ``--sport 80`` ACCEPT (the
listener is reachable from the world through it: exit 1 is right), and a listener on
0.0.0.0:7001.

``setups [NAME ...]``: the ground-truth lab of tests/auditlab.py (about twenty listeners, four
links, world/LAN/neighbour/VM addresses), each of its firewall set-ups loaded in turn (all by
default; Docker's only when named).

The audit (``fwsafe audit --json``) is timed ``--runs`` times in the server namespace with this
tree's fwsafe and, with ``--other [NAME=]DIR`` (repeatable), with other copies' (``PYTHONPATH=DIR python -S
-m fwsafe``; e.g. ``git archive afeb33e fwsafe | tar -x -C DIR``, the audit before issue 29),
interleaved, and the ratios of the medians printed. Run as root:

    .venv/bin/python -m bench.auditcost rules 50000 [--other DIR]
    .venv/bin/python -m bench.auditcost setups [open ipset syn-flood] [--other before=DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from fwsafe.lab import create_lab

LISTENER = "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 7001))\n" \
           "s.listen()\ntime.sleep(3600)\n"
Runner = Callable[[list[str]], tuple[float, int]]


def rules(count: int) -> str:
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT -s 10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32 -j DROP"
              for i in range(count)]
    return "\n".join([*lines, "-A INPUT -p tcp --sport 80 -j ACCEPT", "COMMIT", ""])


def commands(others: Sequence[str]) -> dict[str, list[str]]:
    """name -> the argv that runs that fwsafe ("this", then each NAME=DIR or DIR of
    `others`)."""
    found = {"this": ["env", os.path.join(os.path.dirname(sys.executable), "fwsafe")]}
    # -S: no site, so this tree's editable install (a .pth finder) cannot shadow it
    site = next(p for p in sys.path if p.endswith("site-packages"))
    for other in others:
        name, _, directory = other.rpartition("=")
        directory = os.path.abspath(directory)
        # (and run from DIR: `-m` puts the working directory first on the path)
        found[name or os.path.basename(directory)] = [
            "env", "-C", directory, f"PYTHONPATH={directory}:{site}", sys.executable, "-S",
            "-m", "fwsafe"]
    return found


def measure(label: str, argvs: dict[str, list[str]], runs: int, runner: Runner) -> None:
    """Time each command `runs` times, interleaved; one line with the medians and ratio."""
    times: dict[str, list[float]] = {name: [] for name in argvs}
    codes: dict[str, int] = {}
    for _ in range(runs):
        for name, argv in argvs.items():
            elapsed, codes[name] = runner(argv)
            times[name].append(elapsed)
    medians = {name: statistics.median(found) for name, found in times.items()}
    parts = [f"{name} {medians[name]:.2f} s ({' '.join(f'{t:.2f}' for t in times[name])}; "
             f"exit {codes[name]})" for name in argvs]
    ratios = "".join(f"  this/{name} {medians['this'] / medians[name]:.2f}x"
                     for name in argvs if name != "this")
    print(f"{label:18} {'  '.join(parts)}{ratios}", flush=True)


def bench_rules(count: int, argvs: dict[str, list[str]], runs: int) -> None:
    lab = create_lab(f"fwac{os.getpid()}"[:14], 94)
    try:
        lab.srv_exec(["iptables-restore"], input=rules(count))
        lab.srv_exec(["ip", "route", "add", "default", "via", lab.cli_ip4])
        listener = lab.srv_popen(["python3", "-c", LISTENER])
        time.sleep(0.5)

        def runner(argv: list[str]) -> tuple[float, int]:
            started = time.monotonic()
            result = lab.srv_exec([*argv, "audit", "--json", "-q"], check=False,
                                  timeout=600)
            return time.monotonic() - started, result.returncode

        measure(f"{count} rules", argvs, runs, runner)
        listener.kill()
        listener.wait(timeout=10)
    finally:
        lab.close()


def bench_setups(names: Sequence[str], argvs: dict[str, list[str]], runs: int) -> None:
    from tests.auditlab import setups, truth_lab

    with truth_lab(argvs["this"], prefix=f"fwac{os.getpid()}"[:14], index=95) as lab:
        lab.env["FWSAFE_STATE_DIR"] = str(lab.lab.workdir / "state")

        def runner(argv: list[str]) -> tuple[float, int]:
            lab.fwsafe = argv
            elapsed, code, _, _ = lab.audit()
            return elapsed, code

        for setup in setups(lab.i):
            if (names and setup.name not in names) or (not names and setup.docker):
                continue
            lab.load(setup)
            try:
                measure(setup.name, argvs, runs, runner)
            finally:
                lab.unload(setup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("rules", help="N per-address rules")
    one.add_argument("count", type=int)
    lab = sub.add_parser("setups", help="the ground-truth lab's set-ups")
    lab.add_argument("names", nargs="*")
    for p in (one, lab):
        p.add_argument("--other", action="append", default=[], metavar="[NAME=]DIR",
                       help="another copy of fwsafe (its parent directory); repeatable")
        p.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    argvs = commands(args.other)
    if args.what == "rules":
        bench_rules(args.count, argvs, args.runs)
    else:
        bench_setups(args.names, argvs, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
