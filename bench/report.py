"""Targets and the printed table. The bench reports whether each target is met; it never
fails on time."""

from __future__ import annotations

from typing import Any

# Issue 15: ratios to the floor (iptables-restore / nft -f of the same file) over the same SSH
# login, at 10k and 50k rules, for iptables and nft; `fwsafe check` in seconds.
RATIO_TARGETS = {"apply": 2.5, "apply_nocheck": 1.5, "revert": 1.5}
RATIO_SIZES = (10000, 50000)
CHECK_TARGETS_S = {10000: 0.5, 50000: 2.0}
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


def _ratio_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """apply (with the check), apply --no-check and revert over SSH, as ratios to the floor run
    over the same SSH login."""
    out: list[dict[str, Any]] = []
    scale = results.get("scale") or {}
    rows = {(r["backend"], r["rules"]): r for r in scale.get("rows", [])}
    for what, limit in RATIO_TARGETS.items():
        label = {"apply_nocheck": "apply --no-check"}.get(what, what)
        for backend in ("iptables", "nft"):
            for n in RATIO_SIZES:
                name = f"{label} {backend} {n // 1000}k"
                target = f"<= {limit:g}x floor, over SSH"
                row = rows.get((backend, n))
                ratio = (row or {}).get(f"ssh_{what}_ratio")
                if row is None:
                    note = "scale not run" if "scale" not in results else "size not in this run"
                elif ratio is None:
                    note = ("no over-SSH measurement in this JSON (older bench)"
                            if "ssh_apply_ratio" not in row else "this fwsafe has no --no-check")
                if ratio is None:
                    out.append(_target(name, target, "not measured", None, note))
                    continue
                bare = row.get(f"{what}_ratio") if row else None
                out.append(_target(name, target, _fmt_x(ratio), ratio <= limit,
                                   f"bare {_fmt_x(bare)}" if bare is not None else ""))
    return out


def _check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    chk = results.get("check") or {}
    rows = {r.get("rules"): r for r in chk.get("rows", [])}
    for n, limit in CHECK_TARGETS_S.items():
        name = f"fwsafe check {n // 1000}k"
        target = f"<= {limit:g} s"
        row = rows.get(n) or {}
        median = row.get("median_s")
        if median is None:
            if "check" not in results:
                note = "check not run"
            elif not row:
                note = "size not in this run"
            else:
                note = chk.get("why") or "no answer (see the check section)"
            out.append(_target(name, target, "not measured", None, note))
            continue
        ne = (row.get("no_exposure") or {}).get("median_s")
        if "setup" not in chk:  # an older bench: not the setup of the target
            out.append(_target(name, target, _fmt_s(median), None,
                               "older bench: no sshd, nothing live; not evaluated"))
            continue
        out.append(_target(name, target, _fmt_s(median), median <= limit,
                           "" if ne is None else f"--no-exposure {ne:.2f} s"))
    return out


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = _ratio_targets(results) + _check_targets(results)
    scale = results.get("scale") or {}
    rows = {(r["backend"], r["rules"]): r for r in scale.get("rows", [])}
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
        lines += _render_scale(scale)
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
        lines += _render_check(chk)
    if results.get("shapes"):
        from bench.shapecost import render as render_shapes
        lines += render_shapes(results["shapes"])
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


def _times_ratio(r: dict[str, Any], pre: str, what: str) -> str:
    """`time ratio` of fwsafe's `what` (apply, apply_nocheck, revert) for one transport."""
    return (f"{_fmt_s(r.get(f'{pre}fwsafe_{what}_s'), 3):>8} "
            f"{_fmt_x(r.get(f'{pre}{what}_ratio')):>7}")


def _phase_text(ph: dict[str, float] | None, keys: tuple[str, ...]) -> str:
    return " | ".join(f"{ph[k]:.3f}" for k in keys if k in ph) if ph else "-"


def _render_scale(scale: dict[str, Any]) -> list[str]:
    rows = scale.get("rows", [])
    lines = ["", f"2. Apply / revert cost vs the floor (iptables-restore / nft -f of the same "
                 f"file), median of {scale.get('rounds')} round(s), interleaved",
             "   apply = `fwsafe apply --detach --json --timeout 3600 B` (the lockout check "
             "runs); --no-check = the same without it; revert = `fwsafe revert`"]
    head = (f"{'floor':>8} {'apply':>8} {'ratio':>7} {'--no-check':>10} {'ratio':>7}  "
            f"{'floor rv':>8} {'revert':>8} {'ratio':>7}")
    if any("ssh_apply_ratio" in r for r in rows):
        lines.append("   OVER SSH (the targets): each command is its own `ssh root@SRV 'COMMAND'` "
                     "login from the client namespace, timed around ssh; floor = the restore "
                     "tool over the same login")
        lines.append(f"   {'backend':<9}{'rules':>7} {'login':>8} {head}")
        for r in rows:
            lines.append(
                f"   {r['backend']:<9}{r['rules']:>7} {_fmt_s(r.get('ssh_login_s'), 3):>8} "
                f"{_fmt_s(r.get('ssh_floor_apply_s'), 3):>8} {_times_ratio(r, 'ssh_', 'apply')} "
                f"{_fmt_s(r.get('ssh_fwsafe_apply_nocheck_s'), 3):>10} "
                f"{_fmt_x(r.get('ssh_apply_nocheck_ratio')):>7}  "
                f"{_fmt_s(r.get('ssh_floor_revert_s'), 3):>8} {_times_ratio(r, 'ssh_', 'revert')}")
    else:
        lines.append("   OVER SSH: not measured (a JSON of an older bench: bare only)")
    lines.append("   BARE: the same commands alone in the server namespace (fwsafe with "
                 "SSH_CONNECTION set to the lab's client)")
    lines.append(f"   {'backend':<9}{'rules':>7} {head}  {'guard RSS':>9} {'tx dir':>8}")
    for r in rows:
        lines.append(
            f"   {r['backend']:<9}{r['rules']:>7} {_fmt_s(r.get('floor_apply_s'), 3):>8} "
            f"{_times_ratio(r, '', 'apply')} "
            f"{_fmt_s(r.get('fwsafe_apply_nocheck_s'), 3):>10} "
            f"{_fmt_x(r.get('apply_nocheck_ratio')):>7}  "
            f"{_fmt_s(r.get('floor_revert_s'), 3):>8} {_times_ratio(r, '', 'revert')}  "
            f"{_mb(r.get('guard_rss_kb')):>9} {_bytes(r.get('tx_bytes')):>8}")
    lines.append("   where the time goes, s (apply: CLI+check+validate+snapshot | guard start | "
                 "apply+capture+compare | CLI notices;")
    lines.append("                           revert: CLI+request | guard restore+verify | "
                 "CLI exit; over SSH the first phase includes the login, the last the logout)")
    for r in rows:
        for key, label, keys in (("apply_phases", "apply", APPLY_PHASES),
                                 ("apply_nocheck_phases", "--no-check", APPLY_PHASES),
                                 ("revert_phases", "revert", REVERT_PHASES)):
            ssh_ph, bare_ph = r.get("ssh_" + key), r.get(key)
            if not ssh_ph and not bare_ph:
                continue
            text = f"bare {_phase_text(bare_ph, keys)}"
            if "ssh_apply_ratio" in r:
                text = f"ssh {_phase_text(ssh_ph, keys):<31}  {text}"
            lines.append(f"   {r['backend']:<9}{r['rules']:>7}  {label:<10} {text}")
    lines.append("   pieces on their own, bare, s (python start, CLI start, validate, fwsafe check; "
                 "per layer capture+parse):")
    for r in rows:
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
    return lines


def _render_check(chk: dict[str, Any]) -> list[str]:
    setup = chk.get("setup") or "no sshd, nothing live (older bench)"
    lines = ["", "4. fwsafe check RULES --client IP --port 22 --json (iptables, bare in the server "
                 "namespace)", f"   {setup}"]
    for r in chk.get("rows", []):
        if not r.get("available"):
            lines.append(f"   {r['rules']:>7} rules: not available"
                         + (f" ({chk['why']})" if chk.get("why") else ""))
            continue
        line = (f"   {r['rules']:>7} rules: median {_fmt_s(r.get('median_s'), 3)}, "
                f"max {_fmt_s(r.get('max_s'), 3)} (exit codes {r.get('exit_codes')})")
        ne = r.get("no_exposure")
        if ne:
            line += (f"; --no-exposure: median {_fmt_s(ne.get('median_s'), 3)}, "
                     f"max {_fmt_s(ne.get('max_s'), 3)}")
        exp = r.get("exposure")
        if exp is not None:
            line += f"; exposure {exp}"
        lines.append(line)
    return lines
