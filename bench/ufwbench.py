"""ufw adding the same kind of rules one by one: `ufw allow from 10.x.y.z to any port 22`, with
ufw enabled (every rule goes live), in a lab with private copies of ufw's files.

Measured up to the largest count given; 10k and 50k are extrapolated linearly from the largest
measured count (and, as a second estimate, from a straight-line fit of the per-rule time against
the number of rules already there, which is how ufw actually behaves: every `ufw allow` rewrites
and reloads all of its rules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.labkit import INDEX_UFW, open_lab

BATCH = 50


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def run_ufw(counts: list[int], extrapolate_to: list[int],
            log: Callable[[str], None]) -> dict[str, Any]:
    bl = open_lab("u", INDEX_UFW, private_ufw=True, sshd=False, baseline=False)
    try:
        bl.lab.srv_exec(["ufw", "default", "allow", "incoming"])
        bl.lab.srv_exec(["ufw", "--force", "enable"])
        total = max(counts)
        per_rule: list[float] = []
        while len(per_rule) < total:
            start = len(per_rule)
            cmds = [{"argv": ["ufw", "allow", "from", f"10.77.{i // 250}.{i % 250 + 1}", "to",
                              "any", "port", "22"]}
                    for i in range(start, min(total, start + BATCH))]
            for t in bl.timed(cmds, timeout=3600):
                if t.rc != 0:
                    raise RuntimeError(f"ufw allow exited {t.rc}: {t.stderr.strip()[-300:]}")
                per_rule.append(t.elapsed)
            if len(per_rule) % 200 == 0 or len(per_rule) == total:
                log(f"  ufw: {len(per_rule)}/{total} rules added one by one")
        live = bl.lab.srv_exec(["iptables-save"]).stdout.count("--dport 22")
    finally:
        bl.close()
    measured = {n: sum(per_rule[:n]) for n in counts}
    biggest = max(counts)
    a, b = _fit([float(i) for i in range(len(per_rule))], per_rule)
    estimates = {}
    for n in extrapolate_to:
        if n in measured:
            continue
        estimates[n] = {
            "linear_s": measured[biggest] * n / biggest,
            # Too few points for a slope below 100 rules: no growth-aware estimate then.
            "growth_fit_s": a * n + b * n * (n - 1) / 2 if len(per_rule) >= 100 else None,
            "extrapolated": True,
        }
    window = per_rule[-min(50, len(per_rule)):]
    return {
        "counts": counts,
        "measured_s": {str(n): measured[n] for n in counts},
        "per_rule_first_s": sum(per_rule[:min(50, len(per_rule))]) / min(50, len(per_rule)),
        "per_rule_last_s": sum(window) / len(window),
        "fit_per_rule": {"a_s": a, "b_s_per_rule": b},
        "extrapolated": {str(n): v for n, v in estimates.items()},
        "rules_live_in_iptables": live,
    }
