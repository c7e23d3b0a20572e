"""`python3 -m bench.checkab SHAPE N --other BIN`: `fwsafe check` of this fwsafe and of another
build (BIN: any executable running it, e.g. main's), interleaved in one lab, on a shape of
bench/shapes.py (issue 27). Ruleset A of the shape is live, the check is of B; printed per
build: exit code, seconds, the sandbox's own part (duration_s) and the rules it left out;
with --no-exposure first, then the default options. Needs root; namespaces only."""

from __future__ import annotations

import argparse
import re
import sys

from bench.labkit import INDEX_SCALE, fwsafe_bin, open_lab
from bench.shapes import SHAPES, iptables_shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.checkab", description=__doc__)
    p.add_argument("shape", choices=[s for s in SHAPES if not s.startswith("nft-")])
    p.add_argument("rules", type=int)
    p.add_argument("--other", required=True, help="the other fwsafe (an executable)")
    args = p.parse_args(argv)
    bins = {"other": args.other, "this": fwsafe_bin()}
    bl = open_lab("f", INDEX_SCALE, sshd=True)
    try:
        a = bl.write("a.rules", iptables_shape(args.shape, args.rules, 0))
        b = bl.write("b.rules", iptables_shape(args.shape, args.rules, 1))
        for label, path in (("restore B (floor)", b), ("restore A", a)):
            t = bl.time1(["iptables-restore", str(path)])
            print(f"{label}: exit {t.rc}, {t.elapsed:.2f} s", flush=True)
        for variant in (["--no-exposure"], []):
            for name in (("this", "other") if variant else ("other", "this")):
                t = bl.time1([bins[name], "check", str(b), "--client", bl.lab.cli_ip4, "--port",
                              str(bl.lab.ssh_port), "--json", *variant])
                found = re.findall(r'"(rules_left_out|duration_s)": ([\d.]+)', t.stdout)
                print(f"{name} {' '.join(variant) or 'default'}: exit {t.rc}, {t.elapsed:.2f} s, "
                      + ", ".join(f"{k} {v}" for k, v in found), flush=True)
    finally:
        bl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
