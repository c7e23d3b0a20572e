"""Apply and revert cost against ruleset size, against the floor: the bare restore tool.

For each backend (iptables, nft) and size N the lab holds ruleset A (N rules); the change is
ruleset B (N other rules). Per round, in alternating order:

* floor: `iptables-restore B` then `iptables-restore A` (`nft -f` for nft), bare;
* fwsafe: `fwsafe apply --detach --json B` (validate, snapshot, apply, guard armed: the wall
  time until the command returns) then `fwsafe revert` (the guard restores A and verifies it).

Each command is timed inside the server namespace (neither `ip netns exec` nor the timing
interpreter is inside the timed region). Alongside: the guard's RSS after the apply, the bytes
of the transaction's directory, the phases of every transaction from its record's events, and
the pieces (CLI start, validation, each layer's capture and parse) timed on their own.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.labkit import (
    BASELINE_V4,
    INDEX_SCALE,
    BenchLab,
    Timed,
    apply_flags,
    dir_bytes,
    fwsafe_bin,
    open_lab,
    proc_status_kb,
)
from bench.rules import NFT_TABLE, iptables_rules, nft_rules

BACKENDS = ("iptables", "nft")
LONG_TIMEOUT = "3600"

# Runs in the server namespace with fwsafe importable: each layer's capture and parse, timed
# (read-only: nothing is changed).
_PIECES_SCRIPT = r"""
import json, time
from fwsafe.backends import available_layers, layer_for
out = {}
for name in available_layers():
    layer = layer_for(name)
    t = time.perf_counter()
    data = layer.capture()
    c = time.perf_counter() - t
    t = time.perf_counter()
    layer.units(data)
    out[name] = {"capture_s": c, "units_s": time.perf_counter() - t, "bytes": len(data)}
print(json.dumps(out))
"""


def _files(bl: BenchLab, backend: str, n: int) -> tuple[Path, Path]:
    if backend == "iptables":
        return (bl.write(f"a{n}.rules", iptables_rules(n, 0)),
                bl.write(f"b{n}.rules", iptables_rules(n, 1)))
    return (bl.write(f"a{n}.nft", nft_rules(n, 0)), bl.write(f"b{n}.nft", nft_rules(n, 1)))


def _restore_argv(backend: str, path: Path) -> list[str]:
    if backend == "iptables":
        return ["iptables-restore", str(path)]
    return ["nft", "-f", str(path)]


def _check(t: Timed, what: str, ok: tuple[int, ...] = (0,)) -> Timed:
    if t.rc not in ok:
        raise RuntimeError(f"{what} exited {t.rc}: {t.stderr.strip()[-400:]}")
    return t


def _phases(info: dict[str, Any], start: float, end: float, kind: str) -> dict[str, float]:
    """Where the time went, from the transaction record's events (wall-clock stamps)."""
    ev: dict[str, float] = {}
    for e in info.get("events", []):
        ev.setdefault(e["event"], e["t"])
    if kind == "apply" and {"preparing", "applying", "pending"} <= set(ev):
        return {
            "cli_validate_snapshot_s": ev["preparing"] - start,
            "guard_start_s": ev["applying"] - ev["preparing"],
            "apply_capture_compare_s": ev["pending"] - ev["applying"],
            "cli_notices_s": end - ev["pending"],
        }
    if kind == "revert" and {"reverting", "reverted"} <= set(ev):
        return {
            "cli_request_s": ev["reverting"] - start,
            "guard_restore_verify_s": ev["reverted"] - ev["reverting"],
            "cli_exit_s": end - ev["reverted"],
        }
    return {}


class ScaleRun:
    def __init__(self, bl: BenchLab, log: Callable[[str], None]) -> None:
        self.bl = bl
        self.log = log
        self.fw = fwsafe_bin()

    def floor(self, backend: str, a: Path, b: Path) -> tuple[float, float]:
        t = self.bl.timed([{"argv": _restore_argv(backend, b)}, {"argv": _restore_argv(backend, a)}])
        _check(t[0], "floor apply")
        _check(t[1], "floor revert")
        return t[0].elapsed, t[1].elapsed

    def variants(self) -> list[tuple[str, list[str], dict[str, str]]]:
        """fwsafe apply as run from an SSH session (SSH_CONNECTION set: the lockout check, where
        this fwsafe has one, protects that client) and, where it exists, with --no-check."""
        lab = self.bl.lab
        ssh = {"SSH_CONNECTION": f"{lab.cli_ip4} 50022 {lab.srv_ip4} 22"}
        out: list[tuple[str, list[str], dict[str, str]]] = [("", [], ssh)]
        if "--no-check" in apply_flags():
            out.append(("_nocheck", ["--no-check"], ssh))
        return out

    def fwsafe(self, b: Path, args: list[str], env: dict[str, str]) -> dict[str, Any]:
        applied = _check(self.bl.time1([self.fw, "apply", "--detach", "--json", "--timeout",
                                        LONG_TIMEOUT, *args, str(b)], env=env), "fwsafe apply")
        armed = applied.json()
        guard = armed.get("guard_pid")
        rss = proc_status_kb(guard, "VmRSS") if isinstance(guard, int) else None
        tx_dir = self.bl.state_dir / "tx" / str(armed["id"])
        pending_bytes = dir_bytes(tx_dir)[0]
        info_pending = self.bl.status()
        reverted = _check(self.bl.time1([self.fw, "revert"]), "fwsafe revert", ok=(4,))
        info = self.bl.status()
        if info["state"] != "reverted":
            raise RuntimeError(f"fwsafe revert left the transaction {info['state']}")
        return {
            "apply_s": applied.elapsed, "apply_cpu_s": applied.cpu,
            "revert_s": reverted.elapsed, "revert_cpu_s": reverted.cpu,
            "guard_rss_kb": rss, "tx_bytes_pending": pending_bytes,
            "tx_bytes": dir_bytes(tx_dir)[0],
            "apply_phases": _phases(info_pending, applied.start, applied.start + applied.elapsed,
                                    "apply"),
            "revert_phases": _phases(info, reverted.start, reverted.start + reverted.elapsed,
                                     "revert"),
        }

    def pieces(self, backend: str, b: Path) -> dict[str, Any]:
        """The parts of fwsafe's work, each on its own, with B live."""
        check_argv = (["iptables-restore", "--test", str(b)] if backend == "iptables"
                      else ["nft", "-c", "-f", str(b)])
        t = self.bl.timed([
            {"argv": [sys.executable, "-c", "pass"]},
            {"argv": [self.fw, "--version"]},
            {"argv": [sys.executable, "-c", "import fwsafe.guard.process"]},
            {"argv": check_argv},
        ])
        layers = self.bl.lab.srv_exec([sys.executable, "-c", _PIECES_SCRIPT], timeout=900)
        out: dict[str, Any] = {
            "python_start_s": t[0].elapsed,
            "cli_start_s": t[1].elapsed,
            "guard_import_s": t[2].elapsed,
            "validate_s": t[3].elapsed,
            "layers": json.loads(layers.stdout),
        }
        if "--no-check" in apply_flags():  # `fwsafe check` exists: the lockout check alone
            chk = self.bl.time1([self.fw, "check", str(b), "--client", self.bl.lab.cli_ip4,
                                 "--port", "22", "--json"])
            out["check_s"] = chk.elapsed if chk.rc in (0, 1) else None
        return out

    def reset(self, backend: str) -> None:
        if backend == "iptables":
            self.bl.lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
        else:
            self.bl.lab.srv_exec(["nft", "delete", "table", *NFT_TABLE.split()], check=False)


def run_scale(sizes: list[int], rounds: int, log: Callable[[str], None], *,
              pieces_sizes: list[int] | None = None) -> dict[str, Any]:
    """`pieces_sizes`: the sizes whose pieces are timed on their own (default: every size)."""
    bl = open_lab("s", INDEX_SCALE, sshd=False)
    try:
        return _run(ScaleRun(bl, log), sizes, rounds,
                    sizes if pieces_sizes is None else pieces_sizes)
    finally:
        bl.close()


def _run(sr: ScaleRun, sizes: list[int], rounds: int, pieces_sizes: list[int]) -> dict[str, Any]:
    samples: dict[tuple[str, int], dict[str, list[Any]]] = {}
    pieces: dict[tuple[str, int], dict[str, Any]] = {}
    files = {(be, n): _files(sr.bl, be, n) for be in BACKENDS for n in sizes}
    for r in range(rounds):
        for backend in BACKENDS:
            for n in sizes:
                a, b = files[(backend, n)]
                sr.log(f"  scale round {r + 1}/{rounds}: {backend} {n} rules")
                _check(sr.bl.time1(_restore_argv(backend, a)), "loading A")
                s = samples.setdefault((backend, n), {})
                # The floor and each fwsafe variant, in an order that rotates every round.
                steps: list[tuple[str, list[str], dict[str, str]] | None] = [
                    None, *sr.variants()]
                shift = r % len(steps)
                for step in steps[shift:] + steps[:shift]:
                    if step is None:
                        fl = sr.floor(backend, a, b)
                        s.setdefault("floor_apply_s", []).append(fl[0])
                        s.setdefault("floor_revert_s", []).append(fl[1])
                        continue
                    suffix, args, env = step
                    for key, value in sr.fwsafe(b, args, env).items():
                        if key.startswith("revert") or key in ("guard_rss_kb", "tx_bytes",
                                                               "tx_bytes_pending"):
                            s.setdefault(key, []).append(value)  # the same work either way
                        else:
                            s.setdefault(key.replace("apply", "apply" + suffix, 1),
                                         []).append(value)
                if r == rounds - 1 and n in pieces_sizes:
                    _check(sr.bl.time1(_restore_argv(backend, b)), "loading B")
                    pieces[(backend, n)] = sr.pieces(backend, b)
            sr.reset(backend)
    rows = []
    for backend in BACKENDS:
        for n in sizes:
            s = samples[(backend, n)]
            fa = statistics.median(s["floor_apply_s"])
            fr = statistics.median(s["floor_revert_s"])
            ap = statistics.median(s["apply_s"])
            rv = statistics.median(s["revert_s"])
            nocheck: dict[str, Any] = {}
            if s.get("apply_nocheck_s"):
                apn = statistics.median(s["apply_nocheck_s"])
                nocheck = {"fwsafe_apply_nocheck_s": apn, "apply_nocheck_ratio": apn / fa,
                           "apply_nocheck_phases": _median_dicts(s["apply_nocheck_phases"])}
            rows.append({
                "backend": backend, "rules": n, "rounds": len(s["apply_s"]),
                "floor_apply_s": fa, "fwsafe_apply_s": ap, "apply_ratio": ap / fa, **nocheck,
                "floor_revert_s": fr, "fwsafe_revert_s": rv, "revert_ratio": rv / fr,
                "fwsafe_apply_max_s": max(s["apply_s"]),
                "fwsafe_revert_max_s": max(s["revert_s"]),
                "apply_cpu_s": statistics.median(s["apply_cpu_s"]),
                "guard_rss_kb": max((x for x in s["guard_rss_kb"] if x), default=None),
                "tx_bytes": statistics.median(s["tx_bytes"]),
                "apply_phases": _median_dicts(s["apply_phases"]),
                "revert_phases": _median_dicts(s["revert_phases"]),
                "pieces": pieces.get((backend, n), {}),
                "samples": {k: v for k, v in s.items() if not k.endswith("_phases")},
            })
    return {"sizes": sizes, "rounds": rounds, "rows": rows}


def _median_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in items for k in d}
    return {k: statistics.median([d[k] for d in items if k in d]) for k in sorted(keys)}
