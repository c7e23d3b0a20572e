"""`fwsafe check RULES --client IP --port 22 --json`: how long the lockout prediction takes.

Issue 15: <= 0.5 s at 10k rules, <= 2 s at 50k (iptables). The lab runs a real sshd (so the
exposure part of the check has a listener to try) and holds ruleset A of the same size (loaded
with iptables-restore); the check is of ruleset B. Timed bare in the server namespace, the
default command and the same with --no-exposure, interleaved (the order alternates per run).

The command is new; where this fwsafe does not have it yet, the section says "not available"
instead of failing."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

from bench.labkit import INDEX_SCALE, fwsafe_bin, open_lab
from bench.rules import iptables_rules

VARIANTS = ("default", "no_exposure")


def check_help() -> subprocess.CompletedProcess[str]:
    return subprocess.run([fwsafe_bin(), "check", "--help"], capture_output=True, text=True,
                          timeout=60, check=False)


def check_available() -> str | None:
    """None if `fwsafe check` exists; else why not (run outside any lab: --help only)."""
    result = check_help()
    if result.returncode == 0:
        return None
    text = (result.stderr or result.stdout).strip().splitlines()
    return "not available: " + (text[-1] if text else f"exit {result.returncode}")


def _summary(times: list[float], codes: list[int], errors: list[str]) -> dict[str, Any]:
    return {"available": bool(times), "exit_codes": codes,
            "median_s": statistics.median(times) if times else None,
            "max_s": max(times) if times else None, "errors": errors[:2]}


def run_check(sizes: list[int], runs: int, log: Callable[[str], None]) -> dict[str, Any]:
    why = check_available()
    if why is not None:
        return {"available": False, "why": why, "rows": [
            {"rules": n, "available": False, "median_s": None} for n in sizes]}
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", check_help().stdout))
    variants = [v for v in VARIANTS if v == "default" or "--no-exposure" in flags]
    bl = open_lab("c", INDEX_SCALE, sshd=True)
    rows = []
    try:
        fw = fwsafe_bin()
        for n in sizes:
            a = bl.write(f"check-a{n}.rules", iptables_rules(n, 0))
            b = bl.write(f"check-b{n}.rules", iptables_rules(n, 1))
            loaded = bl.time1(["iptables-restore", str(a)])
            if loaded.rc != 0:
                raise RuntimeError(f"loading A ({n} rules) exited {loaded.rc}: "
                                   f"{loaded.stderr.strip()[-300:]}")
            base = [fw, "check", str(b), "--client", bl.lab.cli_ip4, "--port",
                    str(bl.lab.ssh_port), "--json"]
            argvs = {"default": base, "no_exposure": [*base, "--no-exposure"]}
            times: dict[str, list[float]] = {v: [] for v in variants}
            codes: dict[str, list[int]] = {v: [] for v in variants}
            errors: dict[str, list[str]] = {v: [] for v in variants}
            exposure: dict[str, Any] | None = None
            for i in range(runs):
                order = variants if i % 2 == 0 else variants[::-1]
                for variant in order:
                    log(f"  check {n} rules, {variant}, run {i + 1}/{runs}")
                    t = bl.time1(argvs[variant])
                    codes[variant].append(t.rc)
                    if t.rc in (0, 1):  # 1: a lockout is predicted; both are answers
                        times[variant].append(t.elapsed)
                        if variant == "default" and exposure is None:
                            exposure = _exposure(t.stdout)
                    else:
                        errors[variant].append(t.stderr.strip()[-300:])
            row: dict[str, Any] = {"rules": n, "runs": runs, "live": f"A ({n} rules)",
                                   **_summary(times["default"], codes["default"],
                                              errors["default"]),
                                   "exposure": exposure}
            if "no_exposure" in variants:
                row["no_exposure"] = _summary(times["no_exposure"], codes["no_exposure"],
                                              errors["no_exposure"])
            rows.append(row)
    finally:
        bl.close()
    return {"available": all(r["available"] for r in rows), "why": None, "rows": rows,
            "setup": "sshd listening, ruleset A of the same size live; check of B, bare in the "
                     "server namespace"}


def _exposure(stdout: str) -> dict[str, Any] | None:
    """What the check's exposure part reported (counts), or None if it did not run."""
    try:
        data = json.loads(stdout)
    except ValueError:
        return None
    exp = data.get("exposure") if isinstance(data, dict) else None
    if not isinstance(exp, dict):
        return None
    return {k: len(v) for k, v in exp.items() if isinstance(v, list)}
