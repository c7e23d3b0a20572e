"""`python3 -m bench`: fwsafe against its anchors, in the namespace lab, in one run.

1. time to recover from a lockout (fwsafe at its deadline, with an early-revert probe, and
   iptables-apply; sessions that stay and sessions hung up);
2. apply and revert cost against ruleset size, as a ratio to the floor: the restore tool
   (iptables-restore / nft -f) on the same file. Each command runs over its own SSH login from
   the lab's client (issue 15's targets), and bare in the server namespace; ufw adding the same
   rules one by one;
3. the guard's footprint (RSS, CPU while waiting, bytes on disk per transaction);
4. `fwsafe check` time (with sshd listening and a ruleset of the same size live).
5. apply and check on the shapes real hosts have (bench/shapes.py: blocklist, kube-proxy, ufw,
   Docker, nft blocklist, an nft set), as ratios to the floor of the same run (issue 27).

Prints a table and writes JSON (bench/results/latest.json unless --json-out). Never asserts on
time: the targets are reported as met or missed. Needs root; the machine's own network
namespace is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import checkcmd, footprint, recovery, report, scale, shapecost, shapes, ufwbench
from fwsafe import __version__
from fwsafe.lab import require_lab_capable

SECTIONS = ("recovery", "scale", "ufw", "footprint", "check", "shapes")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return f"{argv[0]}: not installed"
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0] if text else "?"


def _meminfo_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "mem_total_mb": _meminfo_mb(),
        "kernel": platform.release(),
        "os": _version(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "iptables": _version(["iptables", "--version"]),
        "nft": _version(["nft", "--version"]),
        "ufw": _version(["ufw", "--version"]),
        "python": platform.python_version(),
        "fwsafe": __version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one run each, short timeouts (a smoke test, < 1 minute)")
    p.add_argument("--json-out", type=Path, default=DEFAULT_OUT, metavar="PATH",
                   help=f"where to write the JSON (default {DEFAULT_OUT})")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--runs", type=int, help="recovery runs per scenario (default 5, quick 1)")
    p.add_argument("--timeout", type=int, help="the deadline in the recovery runs, seconds "
                                               "(default 10, quick 2)")
    p.add_argument("--sizes", help="ruleset sizes, comma-separated (default 1000,10000,50000; "
                                   "quick 100,1000)")
    p.add_argument("--rounds", type=int, help="rounds per size in the scale runs (default 3, "
                                              "quick 1)")
    p.add_argument("--check-sizes", help="ruleset sizes of the check section, comma-separated "
                                         "(default 10000,50000; quick: the smallest of --sizes)")
    p.add_argument("--check-runs", type=int, help="runs per size and variant in the check "
                                                  "section (default 5, quick 1)")
    p.add_argument("--ufw-counts", help="ufw rules to add one by one, comma-separated "
                                        "(default 100,1000; quick 10)")
    p.add_argument("--shapes", help="shapes of the shapes section (issue 27), comma-separated "
                                    "(default: all of bench/shapes.py)")
    p.add_argument("--shape-sizes", help="sizes of the shapes section, comma-separated (default "
                                         "10000,50000; quick 500)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="measure nothing: re-evaluate the targets of an earlier run's JSON "
                        "(written back to it) and print its table")
    p.add_argument("--wait", type=float, help="footprint window, seconds (default 5, quick 1)")
    args = p.parse_args(argv)
    q = args.quick
    args.runs = args.runs or (1 if q else 5)
    args.timeout = args.timeout or (2 if q else 10)
    args.sizes = [int(x) for x in (args.sizes or ("100,1000" if q else "1000,10000,50000"))
                  .split(",")]
    args.rounds = args.rounds or (1 if q else 3)
    args.check_sizes = sorted({int(x) for x in args.check_sizes.split(",")} if args.check_sizes
                              else {min(args.sizes)} if q else {10000, 50000})
    args.check_runs = args.check_runs or (1 if q else 5)   # about a second each: 5 steady the median
    args.ufw_counts = [int(x) for x in (args.ufw_counts or ("10" if q else "100,1000"))
                       .split(",")]
    args.wait = args.wait or (1.0 if q else 5.0)
    args.shapes = [x for x in (args.shapes or ",".join(shapes.SHAPES)).split(",") if x]
    args.shape_sizes = [int(x) for x in (args.shape_sizes or ("500" if q else "10000,50000"))
                        .split(",")]
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {"meta": {
        **machine(), "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python3 -m bench", *sys.argv[1:]]),
        "loadavg_start": _loadavg(), "sections": args.only,
    }, "errors": {}}

    def section(name: str, func: Callable[[], Any]) -> None:
        if name not in args.only:
            return
        _log(f"== {name}")
        t0 = time.monotonic()
        try:
            results[name] = func()
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the rest
            results["errors"][name] = f"{exc!r}"
            _log(traceback.format_exc())
        results["meta"].setdefault("section_s", {})[name] = round(time.monotonic() - t0, 1)

    holder = recovery.LabHolder(_log)
    try:
        section("recovery", lambda: recovery.run_recovery(
            holder, runs=args.runs, timeout_s=args.timeout, long_s=120,
            hangup_limit_s=args.timeout + (2 if args.quick else 10), log=_log))
        section("footprint", lambda: footprint.run_footprint(holder.get(), args.wait))
    finally:
        holder.close()
    section("scale", lambda: scale.run_scale(
        args.sizes, args.rounds, _log, pieces_sizes=[max(args.sizes)] if args.quick else None))
    section("ufw", lambda: ufwbench.run_ufw(args.ufw_counts, args.sizes, _log))
    section("check", lambda: checkcmd.run_check(args.check_sizes, args.check_runs, _log))
    section("shapes", lambda: shapecost.run_shapes(args.shapes, args.shape_sizes, args.rounds,
                                                   _log))
    results["targets"] = report.evaluate_targets(results)
    results["meta"]["loadavg_end"] = _loadavg()
    results["meta"]["duration_s"] = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        results = json.loads(args.report.read_text())
        results["targets"] = report.evaluate_targets(results)
        args.report.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
        print(report.render(results))
        return 0
    reason = require_lab_capable()
    if reason:
        _log(f"bench: cannot build the namespace lab: {reason}")
        return 2
    results = run(args)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json_out.with_name(args.json_out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(args.json_out)
    print(report.render(results))
    _log(f"bench: results written to {args.json_out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
