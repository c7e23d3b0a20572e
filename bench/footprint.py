"""The guard's footprint while it waits: RSS (VmRSS), CPU (utime + stime over a quiet window),
and the bytes a transaction leaves on disk (STATE/tx/ID). The guard's PID comes from
`fwsafe status --json` (guard_pid)."""

from __future__ import annotations

import os
import time
from typing import Any

from bench.labkit import (
    GOOD_V4,
    PROBE_PORT,
    BenchLab,
    dir_bytes,
    proc_cpu_ticks,
    proc_status_kb,
)

TICK = os.sysconf("SC_CLK_TCK")


def measure_guard(bl: BenchLab, wait_s: float, probe: bool) -> dict[str, Any]:
    rules = bl.write("good.rules", GOOD_V4)
    args = ["apply", "--detach", "--json", "--timeout", "600"]
    if probe:
        args += ["--probe", f"tcp://{bl.lab.srv_ip4}:{PROBE_PORT}", "--probe-interval", "0.5"]
    applied = bl.fw(*args, str(rules))
    if applied.returncode != 0:
        raise RuntimeError(f"fwsafe apply exited {applied.returncode}: {applied.stderr[-300:]}")
    try:
        info = bl.status()
        pid = info["guard_pid"]
        if not isinstance(pid, int):
            raise RuntimeError(f"no guard_pid in fwsafe status: {info}")
        time.sleep(0.5)  # let the guard settle after arming
        t0, c0 = time.monotonic(), proc_cpu_ticks(pid)
        time.sleep(wait_s)
        t1, c1 = time.monotonic(), proc_cpu_ticks(pid)
        rss = proc_status_kb(pid, "VmRSS")
        hwm = proc_status_kb(pid, "VmHWM")
        threads = proc_status_kb(pid, "Threads")
        tx_dir = bl.state_dir / "tx" / str(info["id"])
        pending_bytes = dir_bytes(tx_dir)[0]
    finally:
        bl.settle()
    final_bytes, final_alloc = dir_bytes(tx_dir)
    ticks = (c1 - c0) if c0 is not None and c1 is not None else None
    return {
        "probe": probe,
        "guard_pid": pid,
        "rss_kb": rss,
        "rss_peak_kb": hwm,
        "threads": threads,
        "window_s": t1 - t0,
        "cpu_ticks": ticks,
        "cpu_s": ticks / TICK if ticks is not None else None,
        "cpu_percent": 100.0 * ticks / TICK / (t1 - t0) if ticks is not None else None,
        "tick_s": 1.0 / TICK,
        "tx_bytes_pending": pending_bytes,
        "tx_bytes": final_bytes,
        "tx_allocated_bytes": final_alloc,
        "tx_files": sorted(p.name for p in tx_dir.iterdir()) if tx_dir.is_dir() else [],
    }


def run_footprint(bl: BenchLab, wait_s: float) -> dict[str, Any]:
    return {
        "wait_s": wait_s,
        "plain": measure_guard(bl, wait_s, probe=False),
        "with_probe": measure_guard(bl, wait_s, probe=True),
    }
