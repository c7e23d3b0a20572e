"""Timings of `fwsafe apply --host` in a namespace lab (real sshd, real netfilter).

    sudo python3 -m bench.remote_confirm [RUNS]        (from the repository root)

Measures, as the median (and min/max) of RUNS runs (default 5), the wall time of the workstation
command (run in the client namespace) from its start until it exits:

  good      good rules: apply -> confirmed through a new SSH login (exit 0)
  drop-new  rules that drop NEW SSH connections (--timeout 6): apply -> reverted and SSH
            answering again (exit 4)
  probe     rules that cut a web service on 8080 (--timeout 30, guard-side probe
            tcp://SRV:8080 with --probe-failures 2): apply -> reverted early (exit 4)

Everything runs in network namespaces made here; the root namespace's firewall is untouched.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

from fwsafe.lab import Lab, create_lab, require_lab_capable
from tests.bins import FWSAFE
from tests.conftest import FwLab
from tests.lab.test_remote import CUT_8080, start_web
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_NEW_SSH, GOOD


def reset(lab: Lab) -> None:
    lab.srv_exec(["iptables-restore"], input=BASELINE_V4)
    lab.srv_exec(["ip6tables-restore"], input=BASELINE_V6)


def timed(fw: FwLab, expect: int, *args: str) -> tuple[float, dict[str, object]]:
    lab = fw.lab
    argv = [FWSAFE, "apply", "--host", f"root@{lab.srv_ip4}", "-i", str(lab.key),
            "--known-hosts", str(lab.known_hosts), "--json", *args]
    started = time.monotonic()
    result = lab.cli_exec(argv, check=False, timeout=300)
    elapsed = time.monotonic() - started
    if result.returncode != expect:
        raise SystemExit(f"expected exit {expect}, got {result.returncode}:\n{result.stderr}")
    data: dict[str, object] = json.loads(result.stdout)
    return elapsed, data


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    reason = require_lab_capable()
    if reason:
        print(f"cannot build a lab: {reason}", file=sys.stderr)
        return 2
    lab = create_lab("fwbench", 88)
    try:
        reset(lab)
        lab.start_sshd(env={"FWSAFE_STATE_DIR": str(lab.workdir / "state")})
        fw = FwLab(lab)
        start_web(fw)
        good = fw.write("good.rules", GOOD)
        drop_new = fw.write("drop-new.rules", DROP_NEW_SSH)
        cut = fw.write("cut-8080.rules", CUT_8080)
        url = f"tcp://{lab.srv_ip4}:8080"
        cases: dict[str, tuple[int, list[str]]] = {
            "good": (0, ["--timeout", "30", str(good)]),
            "drop-new": (4, ["--force", "--timeout", "6", str(drop_new)]),  # past the check
            "probe": (4, ["--timeout", "30", "--probe", url, "--probe-failures", "2", str(cut)]),
        }
        detail: dict[str, Callable[[dict[str, object]], str]] = {
            "good": lambda d: f"armed {d['armed_s']} s, confirmed {d['confirmed_s']} s",
            "drop-new": lambda d: "",
            "probe": lambda d: "",
        }
        for name, (expect, args) in cases.items():
            times = []
            for index in range(runs):
                reset(lab)
                elapsed, data = timed(fw, expect, *args)
                times.append(elapsed)
                extra = detail[name](data)
                print(f"{name} run {index + 1}: {elapsed:.2f} s {extra}", flush=True)
            print(f"== {name}: median {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f}, n={runs})", flush=True)
    finally:
        lab.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
