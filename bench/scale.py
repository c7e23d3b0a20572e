"""Apply and revert cost against ruleset size, against the floor: the bare restore tool.

For each backend (iptables, nft) and size N the lab holds ruleset A (N rules); the change is
ruleset B (N other rules). Issue 15's definition: measured from an SSH session, the floor is
`iptables-restore B` (`nft -f B`) run over the same SSH login. Per round, in an order that
rotates every round, each of these runs once:

* ssh login: `ssh root@SRV true` (what one login costs on its own);
* floor over SSH: `ssh root@SRV 'iptables-restore B'` then `ssh root@SRV 'iptables-restore A'`;
* fwsafe over SSH: `ssh root@SRV 'fwsafe apply --detach --json --timeout 3600 B'` (validate,
  the lockout check for the session's real client, snapshot, apply, guard armed) then
  `ssh root@SRV 'fwsafe revert'` (the guard restores A and verifies it); the same with
  --no-check where this fwsafe has it;
* the same floor and fwsafe commands bare, in the server namespace (fwsafe with
  SSH_CONNECTION set to the lab's client, so that its lockout check does the same work).

Each ssh is a new login from the client namespace (key auth, sshd's session environment gives
FWSAFE_STATE_DIR and the real SSH_CONNECTION), timed around the whole ssh process inside the
client namespace; bare commands are timed inside the server namespace (neither `ip netns exec`
nor the timing interpreter is inside the timed region). Alongside: the guard's RSS after the
apply, the bytes of the transaction's directory, the phases of every transaction from its
record's events, and the pieces (CLI start, validation, each layer's capture and parse) timed
on their own, bare.

Keys of a row: `ssh_*` are over SSH (the targets are on `ssh_*_ratio`); the others are bare,
with the names an earlier bench used for its bare measurements.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
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
    rss_when_idle,
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


@dataclass(frozen=True)
class Step:
    """One measurement of a round: "login", "floor" or "fwsafe" (suffix "" or "_nocheck")."""

    kind: str
    ssh: bool
    suffix: str = ""
    args: tuple[str, ...] = ()


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
    """Where the time went, from the transaction record's events (wall-clock stamps). Over
    SSH the first phase includes the login, the last the session's end."""
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

    def run(self, argvs: list[list[str]], ssh: bool, env: dict[str, str] | None = None
            ) -> list[Timed]:
        """The commands one after the other, each timed: over SSH (a new login each) or bare in
        the server namespace (with `env`)."""
        if ssh:
            return self.bl.ssh_timed(argvs)
        return self.bl.timed([{"argv": argv} for argv in argvs], env=env)

    def login(self) -> float:
        return _check(self.bl.ssh_timed([["true"]])[0], "ssh login").elapsed

    def floor(self, backend: str, a: Path, b: Path, ssh: bool) -> tuple[float, float]:
        t = self.run([_restore_argv(backend, b), _restore_argv(backend, a)], ssh)
        where = " over ssh" if ssh else ""
        _check(t[0], "floor apply" + where)
        _check(t[1], "floor revert" + where)
        return t[0].elapsed, t[1].elapsed

    def steps(self) -> list[Step]:
        """The measurements of one round. fwsafe apply runs as from an SSH session: over SSH the
        session is real; bare, SSH_CONNECTION names the lab's client (so the lockout check, where
        this fwsafe has one, protects that client); --no-check where it exists."""
        variants: list[tuple[str, tuple[str, ...]]] = [("", ())]
        if "--no-check" in apply_flags():
            variants.append(("_nocheck", ("--no-check",)))
        out: list[Step] = [Step("login", True)]
        for ssh in (True, False):
            out.append(Step("floor", ssh))
            out += [Step("fwsafe", ssh, suffix, args) for suffix, args in variants]
        return out

    def fwsafe(self, b: Path, args: tuple[str, ...], ssh: bool) -> dict[str, Any]:
        lab = self.bl.lab
        env = None if ssh else {"SSH_CONNECTION": f"{lab.cli_ip4} 50022 {lab.srv_ip4} 22"}
        where = " over ssh" if ssh else ""
        applied = _check(self.run([[self.fw, "apply", "--detach", "--json", "--timeout",
                                    LONG_TIMEOUT, *args, str(b)]], ssh, env)[0],
                         "fwsafe apply" + where)
        armed = applied.json()
        guard = armed.get("guard_pid")
        rss = proc_status_kb(guard, "VmRSS") if isinstance(guard, int) else None
        tx_dir = self.bl.state_dir / "tx" / str(armed["id"])
        pending_bytes = dir_bytes(tx_dir)[0]
        info_pending = self.bl.status()
        if info_pending.get("id") != armed["id"] or info_pending["state"] != "pending":
            raise RuntimeError(f"fwsafe apply{where}: transaction {armed['id']} is not the "
                               f"pending one in {self.bl.state_dir}: {info_pending.get('id')} "
                               f"{info_pending.get('state')}")
        # what it holds while it waits (its capture after the change done: idle), and the most
        # it ever held (VmHWM: the apply, the capture)
        waiting = rss_when_idle(guard) if isinstance(guard, int) else None
        peak = proc_status_kb(guard, "VmHWM") if isinstance(guard, int) else None
        reverted = _check(self.run([[self.fw, "revert"]], ssh)[0], "fwsafe revert" + where,
                          ok=(4,))
        info = self.bl.status()
        if info["state"] != "reverted":
            raise RuntimeError(f"fwsafe revert{where} left the transaction {info['state']}")
        return {
            "apply_s": applied.elapsed, "apply_cpu_s": applied.cpu,
            "revert_s": reverted.elapsed, "revert_cpu_s": reverted.cpu,
            "guard_rss_kb": rss, "guard_rss_waiting_kb": waiting, "guard_peak_kb": peak,
            "tx_bytes_pending": pending_bytes,
            "tx_bytes": dir_bytes(tx_dir)[0],
            "apply_phases": _phases(info_pending, applied.start, applied.start + applied.elapsed,
                                    "apply"),
            "revert_phases": _phases(info, reverted.start, reverted.start + reverted.elapsed,
                                     "revert"),
        }

    def pieces(self, backend: str, b: Path) -> dict[str, Any]:
        """The parts of fwsafe's work, each on its own, with B live (bare)."""
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
    bl = open_lab("s", INDEX_SCALE, sshd=True)
    try:
        bl.check_ssh_env()
        return _run(ScaleRun(bl, log), sizes, rounds,
                    sizes if pieces_sizes is None else pieces_sizes)
    finally:
        bl.close()


def _record(s: dict[str, list[Any]], step: Step, values: dict[str, Any]) -> None:
    """File one fwsafe apply+revert under the sample keys: `ssh_` first over SSH; the apply's
    keys get the variant's suffix; revert, RSS and bytes are the same work either way."""
    pre = "ssh_" if step.ssh else ""
    for key, value in values.items():
        if step.ssh and key.endswith("_cpu_s"):
            continue  # the ssh client's CPU: meaningless
        if key in ("guard_rss_kb", "tx_bytes", "tx_bytes_pending"):
            s.setdefault(key, []).append(value)
        elif key.startswith("revert"):
            s.setdefault(pre + key, []).append(value)
        else:
            s.setdefault(pre + key.replace("apply", "apply" + step.suffix, 1), []).append(value)


def _run(sr: ScaleRun, sizes: list[int], rounds: int, pieces_sizes: list[int]) -> dict[str, Any]:
    samples: dict[tuple[str, int], dict[str, list[Any]]] = {}
    pieces: dict[tuple[str, int], dict[str, Any]] = {}
    files = {(be, n): _files(sr.bl, be, n) for be in BACKENDS for n in sizes}
    steps = sr.steps()
    for r in range(rounds):
        for backend in BACKENDS:
            for n in sizes:
                a, b = files[(backend, n)]
                sr.log(f"  scale round {r + 1}/{rounds}: {backend} {n} rules")
                _check(sr.bl.time1(_restore_argv(backend, a)), "loading A")
                s = samples.setdefault((backend, n), {})
                # Every measurement once, in an order that rotates every round.
                shift = r % len(steps)
                for step in steps[shift:] + steps[:shift]:
                    pre = "ssh_" if step.ssh else ""
                    if step.kind == "login":
                        s.setdefault("ssh_login_s", []).append(sr.login())
                    elif step.kind == "floor":
                        fl = sr.floor(backend, a, b, step.ssh)
                        s.setdefault(pre + "floor_apply_s", []).append(fl[0])
                        s.setdefault(pre + "floor_revert_s", []).append(fl[1])
                    else:
                        _record(s, step, sr.fwsafe(b, step.args, step.ssh))
                if r == rounds - 1 and n in pieces_sizes:
                    _check(sr.bl.time1(_restore_argv(backend, b)), "loading B")
                    pieces[(backend, n)] = sr.pieces(backend, b)
            sr.reset(backend)
    rows = []
    for backend in BACKENDS:
        for n in sizes:
            s = samples[(backend, n)]
            rows.append({
                "backend": backend, "rules": n, "rounds": len(s["apply_s"]),
                "ssh_login_s": statistics.median(s["ssh_login_s"]),
                **_ratios(s, "ssh_"),
                **_ratios(s, ""),
                "apply_cpu_s": statistics.median(s["apply_cpu_s"]),
                "guard_rss_kb": max((x for x in s["guard_rss_kb"] if x), default=None),
                "tx_bytes": statistics.median(s["tx_bytes"]),
                "pieces": pieces.get((backend, n), {}),
                "samples": {k: v for k, v in s.items() if not k.endswith("_phases")},
            })
    return {"sizes": sizes, "rounds": rounds, "rows": rows, "transport": {
        "ssh_": "a new `ssh root@SRV 'COMMAND'` login from the client namespace per command, "
                "timed around the ssh process (the issue-15 targets)",
        "bare": "the command alone in the server namespace (fwsafe with SSH_CONNECTION set)",
    }}


def _ratios(s: dict[str, list[Any]], pre: str) -> dict[str, Any]:
    """Medians and ratios to the floor of one transport (`pre` "ssh_" or "" for bare)."""
    fa = statistics.median(s[pre + "floor_apply_s"])
    fr = statistics.median(s[pre + "floor_revert_s"])
    ap = statistics.median(s[pre + "apply_s"])
    rv = statistics.median(s[pre + "revert_s"])
    out: dict[str, Any] = {
        pre + "floor_apply_s": fa, pre + "fwsafe_apply_s": ap, pre + "apply_ratio": ap / fa,
        pre + "floor_revert_s": fr, pre + "fwsafe_revert_s": rv, pre + "revert_ratio": rv / fr,
        pre + "fwsafe_apply_max_s": max(s[pre + "apply_s"]),
        pre + "fwsafe_revert_max_s": max(s[pre + "revert_s"]),
        pre + "apply_phases": _median_dicts(s[pre + "apply_phases"]),
        pre + "revert_phases": _median_dicts(s[pre + "revert_phases"]),
    }
    if s.get(pre + "apply_nocheck_s"):
        apn = statistics.median(s[pre + "apply_nocheck_s"])
        out.update({pre + "fwsafe_apply_nocheck_s": apn, pre + "apply_nocheck_ratio": apn / fa,
                    pre + "apply_nocheck_phases": _median_dicts(s[pre + "apply_nocheck_phases"])})
    return out


def _median_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in items for k in d}
    return {k: statistics.median([d[k] for d in items if k in d]) for k in sorted(keys)}
