"""`fwsafe audit --json` on a host with N per-address rules: what the audit costs (issue 29:
within 2x of the audit before it).

A lab server (a default route via the client, so the world is tried) holds N rules
``-A INPUT -s 10.A.B.C/32 -j DROP``, a DROP policy and one ``--sport 80`` ACCEPT (the
listener is reachable from the world through it: exit 1 is right), and a listener on
0.0.0.0:7001. The audit is timed three times in the server namespace with this tree's fwsafe
and, with ``--other DIR``, with another copy's (``PYTHONPATH=DIR python -S -m fwsafe``; e.g.
``git archive main fwsafe | tar -x -C DIR``), interleaved. Run as root:

    .venv/bin/python -m bench.auditcost 50000 [--other DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from fwsafe.lab import create_lab

LISTENER = "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 7001))\n" \
           "s.listen()\ntime.sleep(3600)\n"


def rules(count: int) -> str:
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT -s 10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32 -j DROP"
              for i in range(count)]
    return "\n".join([*lines, "-A INPUT -p tcp --sport 80 -j ACCEPT", "COMMIT", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("count", type=int)
    parser.add_argument("--other", help="another copy of fwsafe (its parent directory)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    fwsafe = os.path.join(os.path.dirname(sys.executable), "fwsafe")
    commands = {"this": ["env", fwsafe]}
    if args.other:
        # -S: no site, so this tree's editable install (a .pth finder) cannot shadow it
        site = next(p for p in sys.path if p.endswith("site-packages"))
        # (and run from DIR: `-m` puts the working directory first on the path)
        commands["other"] = ["env", "-C", args.other, f"PYTHONPATH={args.other}:{site}",
                             sys.executable, "-S", "-m", "fwsafe"]
    lab = create_lab(f"fwac{os.getpid()}"[:14], 94)
    try:
        lab.srv_exec(["iptables-restore"], input=rules(args.count))
        lab.srv_exec(["ip", "route", "add", "default", "via", lab.cli_ip4])
        listener = lab.srv_popen(["python3", "-c", LISTENER])
        time.sleep(0.5)
        times: dict[str, list[float]] = {name: [] for name in commands}
        codes: dict[str, int] = {}
        for _ in range(args.runs):
            for name, argv_ in commands.items():
                started = time.monotonic()
                result = lab.srv_exec([*argv_, "audit", "--json", "-q"], check=False,
                                      timeout=600)
                times[name].append(time.monotonic() - started)
                codes[name] = result.returncode
        for name, found in times.items():
            print(f"{name}: {args.count} rules: audit {statistics.median(found):.2f} s median "
                  f"({' '.join(f'{t:.2f}' for t in found)}), exit {codes[name]}")
        listener.kill()
        listener.wait(timeout=10)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
