"""Targets and the printed table. The bench reports whether each target is met; it never
fails on time."""

from __future__ import annotations

from typing import Any

RATIO_TARGET = 1.3
RSS_TARGET_KB = 25 * 1024
CPU_TARGET_TICKS = 1          # "no measurable CPU": at most one clock tick in the window
DEADLINE_TARGET_S = 1.0
APPLY_PHASES = ("cli_validate_snapshot_s", "guard_start_s", "apply_capture_compare_s",
                "cli_notices_s")
REVERT_PHASES = ("cli_request_s", "guard_restore_verify_s", "cli_exit_s")


def _fmt_s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MB"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} kB"
    return f"{n:.0f} B"


def _target(name: str, target: str, value: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"name": name, "target": target, "value": value, "met": met, "note": note}


def _scenario(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    for sc in results.get("recovery", {}).get("scenarios", []):
        if sc["name"] == name:
            return dict(sc)
    return None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    scale = results.get("scale") or {}
    rows = {(r["backend"], r["rules"]): r for r in scale.get("rows", [])}
    whats = ["apply", "apply_nocheck", "revert"]
    if not any("apply_nocheck_ratio" in r for r in rows.values()):
        whats.remove("apply_nocheck")
    for what in whats:
        for backend in ("iptables", "nft"):
            for n in (10000, 50000):
                label = {"apply_nocheck": "apply --no-check"}.get(what, what)
                name = f"{label} {backend} {n // 1000}k"
                row = rows.get((backend, n))
                if row is None:
                    out.append(_target(name, f"<= {RATIO_TARGET}x floor", "not measured", None,
                                       "size not in this run"))
                    continue
                ratio = row[f"{what}_ratio"]
                out.append(_target(name, f"<= {RATIO_TARGET}x floor", _fmt_x(ratio),
                                   ratio <= RATIO_TARGET))
    fp = (results.get("footprint") or {}).get("plain")
    if fp:
        out.append(_target("guard RSS", "< 25 MB", _mb(fp["rss_kb"]),
                           fp["rss_kb"] is not None and fp["rss_kb"] < RSS_TARGET_KB))
        big = [r for r in rows.values() if r.get("guard_rss_kb")]
        if big:
            worst = max(big, key=lambda r: r["guard_rss_kb"])
            out.append(_target("guard RSS, largest ruleset", "< 25 MB",
                               f"{_mb(worst['guard_rss_kb'])} ({worst['backend']} "
                               f"{worst['rules']})", worst["guard_rss_kb"] < RSS_TARGET_KB,
                               "the guard holds the snapshot and the change in memory"))
        ticks = fp["cpu_ticks"]
        out.append(_target("guard CPU while waiting", f"<= {CPU_TARGET_TICKS} tick in "
                           f"{fp['window_s']:.0f} s",
                           f"{ticks} ticks ({fp['cpu_s']:.3f} s)" if ticks is not None else "-",
                           ticks is not None and ticks <= CPU_TARGET_TICKS))
    sc = _scenario(results, "fwsafe deadline, session stays")
    if sc:
        worst = sc["max_after_deadline_s"]
        out.append(_target("recovery after the deadline", f"<= deadline + {DEADLINE_TARGET_S:g} s",
                           f"+{worst:.2f} s (max)" if worst is not None else "never",
                           sc["recovered"] and worst is not None and worst <= DEADLINE_TARGET_S))
    rec = results.get("recovery") or {}
    limit = 2 * rec.get("probe_interval_s", 0.5) + 1.0
    for name, label in (("fwsafe probe, session stays", "recovery with a probe"),
                        ("fwsafe probe, probe_timeout 0.5", "  ... with probe_timeout 0.5")):
        sc = _scenario(results, name)
        if sc:
            worst = sc["max_s"]
            out.append(_target(label, f"<= 2 x interval + 1 s = {limit:g} s after lockout",
                               _fmt_s(worst) + " (max)" if worst is not None else "never",
                               sc["recovered"] and worst is not None and worst <= limit,
                               "" if name.endswith("stays") else "not the default: a config file"))
    return out


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = results.get("meta", {})
    lines.append(f"fwsafe bench ({'quick' if meta.get('quick') else 'full'}) {meta.get('date', '')}")
    lines.append(f"  machine: {meta.get('nproc')} CPUs, {meta.get('mem_total_mb', 0) / 1024:.1f} GiB, "
                 f"kernel {meta.get('kernel')}; {meta.get('iptables')}; {meta.get('nft')}; "
                 f"{meta.get('ufw')}")
    lines.append(f"  load average at start {meta.get('loadavg_start')}, at end "
                 f"{meta.get('loadavg_end')}; took {meta.get('duration_s', 0):.0f} s")
    rec = results.get("recovery")
    if rec:
        lines.append("")
        lines.append(f"1. Time to recover: lockout live -> a NEW SSH connection works "
                     f"(timeout {rec['timeout_s']} s, {rec['runs']} run(s) each, interleaved)")
        lines.append(f"   {'scenario':<36} {'median':>9} {'max':>9} {'vs deadline':>12}  note")
        for sc in rec["scenarios"]:
            if sc["recovered"]:
                med, mx = _fmt_s(sc["median_s"]), _fmt_s(sc["max_s"])
            else:
                med, mx = f"never (within {sc['never_within_s']:g} s)", ""
                if sc["recovered_runs"]:
                    med = f"{sc['recovered_runs']}/{sc['n']} recovered"
            after = sc["max_after_deadline_s"]
            vs = "-" if after is None else f"{after:+.2f} s"
            note = ""
            if sc["session"] == "hangup" and sc["recovered"]:
                hup = [r["from_hangup"] for r in sc["runs"] if r.get("from_hangup") is not None]
                note = f"{max(hup):.2f} s after the hang-up (max)" if hup else ""
            elif sc["kind"].startswith("probe") and sc["runs"]:
                note = str(sc["runs"][-1].get("fwsafe_reason") or "")[:60]
            lines.append(f"   {sc['name']:<36} {med:>9} {mx:>9} {vs:>12}  {note}")
        ref = rec.get("refused_by_check") or {}
        if ref.get("available"):
            what = ("refused (exit 3) before any change" if ref["all_refused"]
                    else f"NOT always refused: exits {[x['exit'] for x in ref['runs']]}")
            lines.append(f"   {'fwsafe without --force (check)':<36} {_fmt_s(ref['median_s']):>9} "
                         f"{_fmt_s(ref['max_s']):>9} {'-':>12}  {what}"
                         + ("; SSH never cut" if ref["never_locked_out"] else "; SSH CUT"))
        for sk in rec.get("skipped", []):
            lines.append(f"   {sk['name']:<36} skipped: {sk['why']}")
        if rec.get("lab_rebuilds"):
            lines.append(f"   (the lab was deleted and rebuilt {rec['lab_rebuilds']} time(s) after "
                         "runs that never recovered)")
    scale = results.get("scale")
    if scale:
        lines.append("")
        lines.append(f"2. Apply / revert cost vs the floor (bare iptables-restore / nft -f of the "
                     f"same size), median of {scale['rounds']} round(s)")
        lines.append("   apply = `fwsafe apply --detach --json` from an SSH session (the lockout "
                     "check runs); --no-check = the same without it")
        lines.append(f"   {'backend':<9}{'rules':>7} {'floor':>8} {'apply':>8} {'ratio':>7} "
                     f"{'--no-check':>10} {'ratio':>7}  {'floor':>8} {'revert':>8} {'ratio':>7}  "
                     f"{'guard RSS':>9} {'tx dir':>8}")
        for r in scale["rows"]:
            lines.append(
                f"   {r['backend']:<9}{r['rules']:>7} {_fmt_s(r['floor_apply_s'], 3):>8} "
                f"{_fmt_s(r['fwsafe_apply_s'], 3):>8} {_fmt_x(r['apply_ratio']):>7} "
                f"{_fmt_s(r.get('fwsafe_apply_nocheck_s'), 3):>10} "
                f"{_fmt_x(r.get('apply_nocheck_ratio')):>7}  "
                f"{_fmt_s(r['floor_revert_s'], 3):>8} {_fmt_s(r['fwsafe_revert_s'], 3):>8} "
                f"{_fmt_x(r['revert_ratio']):>7}  {_mb(r['guard_rss_kb']):>9} "
                f"{_bytes(r['tx_bytes']):>8}")
        lines.append("   where the time goes, s (apply: CLI+check+validate+snapshot | guard start | "
                     "apply+capture+compare | CLI notices;")
        lines.append("                           revert: CLI+request | guard restore+verify | "
                     "CLI exit)")
        for r in scale["rows"]:
            for key, label in (("apply_phases", "apply"), ("apply_nocheck_phases", "--no-check")):
                ph = r.get(key) or {}
                if ph:
                    a = " | ".join(f"{ph[k]:.3f}" for k in APPLY_PHASES if k in ph)
                    lines.append(f"   {r['backend']:<9}{r['rules']:>7}  {label:<10} {a}")
            rv = r["revert_phases"]
            b = " | ".join(f"{rv[k]:.3f}" for k in REVERT_PHASES if k in rv) or "-"
            lines.append(f"   {r['backend']:<9}{r['rules']:>7}  {'revert':<10} {b}")
        lines.append("   pieces on their own, s (python start, CLI start, validate, fwsafe check; "
                     "per layer capture+parse):")
        for r in scale["rows"]:
            p = r.get("pieces") or {}
            if not p:
                continue
            layers = ", ".join(f"{k} {v['capture_s']:.3f}+{v['units_s']:.3f}"
                               for k, v in p.get("layers", {}).items()
                               if v["capture_s"] + v["units_s"] >= 0.005)
            chk = p.get("check_s")
            lines.append(f"   {r['backend']:<9}{r['rules']:>7}  {p['python_start_s']:.3f}, "
                         f"{p['cli_start_s']:.3f}, {p['validate_s']:.3f}, "
                         f"{'-' if chk is None else f'{chk:.3f}'}; {layers}")
    ufw = results.get("ufw")
    if ufw:
        floors = {r["rules"]: r["floor_apply_s"] for r in (scale or {}).get("rows", [])
                  if r["backend"] == "iptables"}
        lines.append("   ufw, one `ufw allow from 10.x.y.z to any port 22` per rule (ufw enabled):")
        for n, secs in ufw["measured_s"].items():
            ratio = f" = {secs / floors[int(n)]:.0f}x the iptables floor" if int(n) in floors else ""
            lines.append(f"     {int(n):>6} rules: {secs:8.1f} s measured{ratio}")
        for n, est in ufw["extrapolated"].items():
            fl = floors.get(int(n))
            ratio = f" = {est['linear_s'] / fl:.0f}x the iptables floor" if fl else ""
            fit = est.get("growth_fit_s")
            lines.append(f"     {int(n):>6} rules: {est['linear_s']:8.0f} s EXTRAPOLATED linearly"
                         f"{ratio}" + (f" (growth-aware fit: {fit:.0f} s)" if fit else ""))
        lines.append(f"     per rule: {ufw['per_rule_first_s']:.3f} s for the first rules, "
                     f"{ufw['per_rule_last_s']:.3f} s for the last")
    fp = results.get("footprint")
    if fp:
        lines.append("")
        lines.append(f"3. Guard footprint while waiting ({fp['wait_s']:g} s window)")
        for key, label in (("plain", "guard"), ("with_probe", "guard + tcp probe every 0.5 s")):
            g = fp[key]
            lines.append(f"   {label:<30} RSS {_mb(g['rss_kb'])} (peak {_mb(g['rss_peak_kb'])}), "
                         f"CPU {g['cpu_ticks']} ticks = {g['cpu_s']:.3f} s "
                         f"({g['cpu_percent']:.2f} %), tx dir {_bytes(g['tx_bytes'])}")
    chk = results.get("check")
    if chk:
        lines.append("")
        lines.append("4. fwsafe check RULES --client IP --port 22 --json")
        for r in chk["rows"]:
            if not r["available"]:
                lines.append(f"   {r['rules']:>7} rules: not available"
                             + (f" ({chk['why']})" if chk.get("why") else ""))
            else:
                lines.append(f"   {r['rules']:>7} rules: median {_fmt_s(r['median_s'], 3)}, "
                             f"max {_fmt_s(r['max_s'], 3)} (exit codes {r['exit_codes']})")
    targets = results.get("targets", [])
    if targets:
        lines.append("")
        lines.append("Targets")
        for t in targets:
            met = {True: "met", False: "MISSED", None: "-"}[t["met"]]
            note = f"  ({t['note']})" if t["note"] else ""
            lines.append(f"   {t['name']:<30} {t['target']:<42} {t['value']:<22} {met}{note}")
    errors = results.get("errors", {})
    if errors:
        lines.append("")
        for section, err in errors.items():
            lines.append(f"ERROR in {section}: {err}")
    return "\n".join(lines)
