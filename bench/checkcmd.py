"""`fwsafe check RULES --client IP --port 22 --json`: how long the lockout prediction takes.

The command is new; where this fwsafe does not have it yet, the section says "not available"
instead of failing."""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Callable
from typing import Any

from bench.labkit import INDEX_SCALE, fwsafe_bin, open_lab
from bench.rules import iptables_rules


def check_available() -> str | None:
    """None if `fwsafe check` exists; else why not (run outside any lab: --help only)."""
    result = subprocess.run([fwsafe_bin(), "check", "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode == 0:
        return None
    text = (result.stderr or result.stdout).strip().splitlines()
    return "not available: " + (text[-1] if text else f"exit {result.returncode}")


def run_check(sizes: list[int], runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    why = check_available()
    if why is not None:
        return {"available": False, "why": why, "rows": [
            {"rules": n, "available": False, "median_s": None} for n in sizes]}
    bl = open_lab("c", INDEX_SCALE, sshd=False)
    rows = []
    try:
        fw = fwsafe_bin()
        for n in sizes:
            path = bl.write(f"check{n}.rules", iptables_rules(n, 0))
            argv = [fw, "check", str(path), "--client", bl.lab.cli_ip4, "--port", "22", "--json"]
            times, codes, errors = [], [], []
            for i in range(runs):
                log(f"  check {n} rules, run {i + 1}/{runs}")
                t = bl.time1(argv)
                codes.append(t.rc)
                if t.rc in (0, 1):  # 1: a lockout is predicted; both are answers
                    times.append(t.elapsed)
                else:
                    errors.append(t.stderr.strip()[-300:])
            rows.append({"rules": n, "available": bool(times), "runs": runs, "exit_codes": codes,
                         "median_s": statistics.median(times) if times else None,
                         "max_s": max(times) if times else None, "errors": errors[:2]})
    finally:
        bl.close()
    return {"available": all(r["available"] for r in rows), "why": None, "rows": rows}
