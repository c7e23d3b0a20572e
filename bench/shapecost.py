"""Apply and check cost on the shapes real hosts have (issue 27), as ratios in one run.

For each shape of bench/shapes.py (iptables; nft for the nft- shapes, whose floor is `nft -f`)
and size N, the lab holds ruleset A of that shape
and the change is ruleset B (same shape and size, other addresses). Per round, in an order
that rotates every round, each over its own SSH login from the lab's client:

* floor: `iptables-restore B` then `iptables-restore A`;
* fwsafe: `fwsafe apply --detach --json --timeout 3600 --force B` (validation, the lockout check for
  the session's client, snapshot, apply, guard armed) then `fwsafe revert`;
* nft shapes also `--no-check` (issue 27 item 3: one nft transaction validates itself);

and, bare in the server namespace with A live (as the check section does), `fwsafe check B
--client CLIENT --port 22 --json` with its default options and with --no-exposure. Reported:
medians, the ratios to the floor of the same run, and the growth exponent k (cost ~ rules^k)
of each shape between its smallest and largest size.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import statistics
from collections.abc import Callable
from typing import Any

from bench.labkit import INDEX_SCALE, BenchLab, fwsafe_bin, open_lab
from bench.scale import ScaleRun, _check, _restore_argv
from bench.shapes import NFT_TABLE, SHAPES, backend, iptables_shape

APPLY_TARGET = 2.5
CHECK_TARGETS_S = {10000: 0.5, 50000: 2.0, 200000: 8.0}
GUARD_RSS_TARGET_KB = {200000: 40 * 1024}   # while it waits (issue 27 item 2)


def _left_out(stdout: str) -> int | None:
    """The check's sandbox.rules_left_out; the timer keeps only the end of a long output (a
    Docker host's report lists thousands of rules "not checked"): then read from the text."""
    try:
        data = json.loads(stdout)
    except ValueError:
        found = re.search(r'"rules_left_out": (\d+)', stdout)
        return int(found.group(1)) if found else None
    return (data.get("sandbox") or {}).get("rules_left_out") if isinstance(data, dict) else None


def run_shapes(shapes: list[str], sizes: list[int], rounds: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Every shape at every size; one that fails (a tool's error, a timeout) gets a row with
    its error, and the others are still measured."""
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"unknown shape(s): {', '.join(sorted(unknown))}")
    bl = open_lab("h", INDEX_SCALE, sshd=True)
    rows: list[dict[str, Any]] = []
    try:
        bl.check_ssh_env()
        sr = ScaleRun(bl, log)
        for shape in shapes:
            for n in sizes:
                try:
                    rows.append(_measure(bl, sr, shape, n, rounds, log))
                except Exception as exc:  # noqa: BLE001 - reported in its row; the rest goes on
                    log(f"  shapes: {shape} {n} FAILED: {exc}")
                    rows.append({"shape": shape, "rules": n, "rounds": rounds,
                                 "error": f"{type(exc).__name__}: {exc}"[:600]})
                    with contextlib.suppress(Exception):   # a change left pending: undone
                        bl.lab.srv_exec(["env", f"FWSAFE_STATE_DIR={bl.state_dir}",
                                         fwsafe_bin(), "revert"], check=False, timeout=900)
                if backend(shape) == "nft":
                    bl.lab.srv_exec(["nft", "delete", "table", *NFT_TABLE.split()], check=False)
            bl.lab.srv_exec(["iptables-restore"], input=_EMPTY)
    finally:
        bl.close()
    return {"shapes": shapes, "sizes": sizes, "rounds": rounds, "fwsafe": fwsafe_bin(),
            "rows": rows, "growth": _growth([r for r in rows if "error" not in r])}


def _measure(bl: BenchLab, sr: ScaleRun, shape: str, n: int, rounds: int,
             log: Callable[[str], None]) -> dict[str, Any]:
    """One shape at one size: its row."""
    fw = fwsafe_bin()
    be = backend(shape)
    ext = "nft" if be == "nft" else "rules"
    a = bl.write(f"{shape}-a{n}.{ext}", iptables_shape(shape, n, 0))
    b = bl.write(f"{shape}-b{n}.{ext}", iptables_shape(shape, n, 1))
    _check(bl.time1(_restore_argv(be, a)), f"loading A ({shape} {n})")
    check = [fw, "check", str(b), "--client", bl.lab.cli_ip4, "--port",
             str(bl.lab.ssh_port), "--json"]
    s: dict[str, list[Any]] = {}
    steps = ["floor", "apply", "check", "check_ne"]
    if be == "nft":   # issue 27 item 3: one nft transaction validates itself
        steps.append("apply_nc")
    for r in range(rounds):
        log(f"  shapes round {r + 1}/{rounds}: {shape} {n} rules")
        for step in steps[r % len(steps):] + steps[:r % len(steps)]:
            if step == "floor":
                fa, fr = sr.floor(be, a, b, True)
                s.setdefault("floor_apply_s", []).append(fa)
                s.setdefault("floor_revert_s", []).append(fr)
            elif step == "apply":
                # --force: B replaces every chain of A, kube-proxy's and Docker's too (the
                # check still runs; only a refusal is overridden)
                got = sr.fwsafe(b, ("--force",), True)
                s.setdefault("apply_s", []).append(got["apply_s"])
                s.setdefault("revert_s", []).append(got["revert_s"])
                for key in ("guard_rss_waiting_kb", "guard_peak_kb"):
                    if got.get(key) is not None:
                        s.setdefault(key, []).append(got[key])
            elif step == "apply_nc":
                got = sr.fwsafe(b, ("--force", "--no-check"), True)
                s.setdefault("apply_nc_s", []).append(got["apply_s"])
            else:
                argv = check if step == "check" else [*check, "--no-exposure"]
                t = bl.time1(argv)
                if t.rc not in (0, 1):
                    raise RuntimeError(f"fwsafe check ({shape} {n}) exited {t.rc}: "
                                       f"{t.stderr.strip()[-300:]}")
                s.setdefault(step + "_s", []).append(t.elapsed)
                s.setdefault(step + "_rc", []).append(t.rc)
                s.setdefault("left_out", []).append(_left_out(t.stdout))
    med = {k: statistics.median(v) for k, v in s.items() if k.endswith("_s")}
    return {"shape": shape, "rules": n, "rounds": rounds, **med,
            "apply_ratio": med["apply_s"] / med["floor_apply_s"],
            "revert_ratio": med["revert_s"] / med["floor_revert_s"],
            **({"apply_nc_ratio": med["apply_nc_s"] / med["floor_apply_s"]}
               if "apply_nc_s" in med else {}),
            **{key: max(s[key]) for key in ("guard_rss_waiting_kb", "guard_peak_kb")
               if s.get(key)},
            "check_rc": s["check_rc"], "left_out": max(
                (x for x in s["left_out"] if x is not None), default=None)}


_EMPTY = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n" \
         "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
         ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


def _growth(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per shape, k in cost ~ rules^k between its smallest and largest size."""
    out: dict[str, dict[str, float]] = {}
    for shape in {r["shape"] for r in rows}:
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["rules"])
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        scale = math.log(hi["rules"] / lo["rules"])
        out[shape] = {key: math.log(hi[key] / lo[key]) / scale
                      for key in ("floor_apply_s", "apply_s", "check_s", "check_ne_s")}
    return out


def render(res: dict[str, Any]) -> list[str]:
    lines = ["", "5. Shapes (issue 27): A live, change B; apply/floor over SSH, "
             f"medians of {res['rounds']}; check bare (default | --no-exposure); guard MiB: "
             "its RSS once idle while it waits / its peak (VmHWM), the largest of the rounds",
             f"   fwsafe: {res['fwsafe']}",
             f"   {'shape':<13} {'rules':>7} {'floor':>8} {'apply':>8} {'ratio':>7} "
             f"{'revert x':>8} {'check':>8} {'no-exp':>8} {'left out':>9} {'guard MiB':>11}"
             "  targets"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"   {r['shape']:<13} {r['rules']:>7}  FAILED: {r['error'][:300]}")
            continue
        ok_apply = r["apply_ratio"] <= APPLY_TARGET
        limit = CHECK_TARGETS_S.get(r["rules"])
        ok_check = None if limit is None else r["check_s"] <= limit
        met = f"apply {'met' if ok_apply else 'MISSED'}" + (
            "" if ok_check is None else f", check {'met' if ok_check else 'MISSED'}")
        rss, peak = r.get("guard_rss_waiting_kb"), r.get("guard_peak_kb")
        rss_limit = GUARD_RSS_TARGET_KB.get(r["rules"])
        if rss_limit is not None and rss is not None:
            met += f", guard RSS {'met' if rss <= rss_limit else 'MISSED'}"
        guard = "-" if rss is None else f"{rss / 1024:.0f}/{(peak or 0) / 1024:.0f}"
        lines.append(f"   {r['shape']:<13} {r['rules']:>7} {r['floor_apply_s']:>7.2f}s "
                     f"{r['apply_s']:>7.2f}s {r['apply_ratio']:>6.2f}x {r['revert_ratio']:>7.2f}x "
                     f"{r['check_s']:>7.2f}s {r['check_ne_s']:>7.2f}s "
                     f"{'-' if r['left_out'] is None else r['left_out']:>9} {guard:>11}  {met}"
                     + (f"; --no-check {r['apply_nc_ratio']:.2f}x" if "apply_nc_ratio" in r
                        else ""))
    for shape, k in sorted(res.get("growth", {}).items()):
        lines.append(f"   growth {shape:<10} " + ", ".join(
            f"{key.removesuffix('_s')} k={v:.2f}" for key, v in k.items()))
    return lines
