"""The text reports a person reads (issue 28): one screen by default, the verdict first, one
line of what was left out, everything with -v; pure rendering, no lab."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fwsafe.audit.audit_report import AuditReport, ExposureChange
from fwsafe.audit.findings import expected_ports
from fwsafe.audit.listeners import Listener
from fwsafe.audit.plan import Source
from fwsafe.audit.reach import CANDIDATE, CURRENT, Reach, ReachReport
from fwsafe.check.change_diff import UnitDiff
from fwsafe.check.check_report import precheck_summary, refusal_hint, sources_label
from fwsafe.check.predict import CheckReport, Verdict
from fwsafe.cli.diff import DIFF_SHOWN, _render
from fwsafe.cli.pending import STATUS_LEFT_OUT, format_status
from tests.terminal import TRANSCRIPT_LIMITS


def test_sources_label_names_each_source_and_family_once() -> None:
    assert sources_label({"ipv4": "`ufw allow 80/tcp` (ipv4)",
                          "ipv6": "`ufw allow 80/tcp` (ipv6)"}) == "`ufw allow 80/tcp` (ipv4, ipv6)"
    assert sources_label({"ipv4": "a.rules", "ipv6": "b.rules6"}) == "a.rules (ipv4), b.rules6 (ipv6)"


def test_refusal_hint_gives_the_fix_for_ufw() -> None:
    enable = refusal_hint(["ufw", "--force", "enable"], 2222)
    assert "allow SSH first: `fwsafe ufw allow 2222/tcp`" in enable
    assert "then `fwsafe ufw --force enable` again" in enable
    deny = refusal_hint(["/usr/sbin/ufw", "deny", "22/tcp"], 22)
    assert "the rule that `ufw deny 22/tcp` adds cuts SSH on port 22" in deny
    assert "--force" in refusal_hint(None, 22)


def test_precheck_summary_is_one_line_without_repeats() -> None:
    report = CheckReport(verdicts=[
        Verdict("new tcp 10.0.0.2 -> :22 (ipv4)", True),
        Verdict("established tcp 10.0.0.2 -> :22 (ipv4)", True),
        Verdict("tcp ? -> :22 (ipv6)", None, None, "not checked: no IPv6 client known; ...")],
        clients=["10.0.0.2"], port=22)
    text = precheck_summary(report)
    assert text == ("the SSH path stays open for 10.0.0.2 (port 22; 2 paths tested); "
                    "IPv6: no client known")
    report.verdicts[0] = Verdict("new tcp 10.0.0.2 -> :22 (ipv4)", None, None, "x",
                                 unverified=["r.rules:9: `-A INPUT -m limit ...`: limit"])
    assert "NOT checked: 1 path, e.g. new tcp 10.0.0.2 -> :22 (ipv4): it met r.rules:9" in \
        precheck_summary(report)


def _diff(n: int) -> UnitDiff:
    body = "\n".join(f"+-A INPUT -p tcp --dport {1000 + i} -j ACCEPT" for i in range(n))
    return UnitDiff("ipv4", "filter/INPUT", "changed",
                    f"--- filter/INPUT (now)\n+++ filter/INPUT (after the change)\n"
                    f"@@ -1,2 +1,{n + 2} @@\n -A INPUT -i lo -j ACCEPT\n{body}\n -A INPUT -j DROP")


def test_diff_shows_the_changed_lines_and_counts_the_rest() -> None:
    small = _render([_diff(2)], color=False).split("\n")
    assert small[0] == "Result: 1 unit(s) would change (ipv4); nothing was changed"
    assert small[1] == "ipv4  filter/INPUT  (changed)"
    assert small[2:4] == ["  +-A INPUT -p tcp --dport 1000 -j ACCEPT",
                          "  +-A INPUT -p tcp --dport 1001 -j ACCEPT"]
    assert small[-1] == "Left out (-v): the unchanged lines around them" and len(small) == 5
    big = _render([_diff(DIFF_SHOWN + 12)], color=False).split("\n")
    assert len(big) == 2 + DIFF_SHOWN + 1
    assert big[-1] == "Left out (-v): 12 more changed line(s), and the context of each"
    whole = _render([_diff(DIFF_SHOWN + 12)], color=False, verbose=True)
    assert "@@ -1,2" in whole and " -A INPUT -j DROP" in whole and "Left out" not in whole
    assert whole.count("\n+-A INPUT") + whole.count("  +-A INPUT") == DIFF_SHOWN + 12


def _pending(**extra: Any) -> dict[str, Any]:
    return {"state": "pending", "id": "T1", "layers": [], "remaining_s": 60, "deadline": 0,
            "guard_pid": 42, "guard_mode": "setsid", "guard_alive": True,
            "backstop": {"how": "watcher PID 43"}, "shielded": True, "run": ["ufw", "enable"],
            "touched": {"ipv4": [f"filter/c{i}" for i in range(35)],
                        "ufw": ["/etc/ufw/ufw.conf"]},
            "hatch": None, "log": "/var/lib/fwsafe/tx/T1/guard.log", **extra}


def test_status_fits_a_screen_and_shows_what_is_wrong() -> None:
    text = format_status(_pending())
    assert text.split("\n")[0] == "transaction T1: pending (command)"
    assert "guard: PID 42" not in text and "watcher" not in text and "guard.log" not in text
    assert "ipv4: 35 units (filter/c0, filter/c1, ...); ufw: /etc/ufw/ufw.conf" in text
    assert "Left out" not in text   # `fwsafe status` adds the line (STATUS_LEFT_OUT) after all
    assert STATUS_LEFT_OUT.startswith("Left out (-v): the guard's PID")
    verbose = format_status(_pending(), verbose=True)
    assert "guard: PID 42 (setsid), running" in verbose and "backstop: watcher" in verbose
    assert "filter/c34" in verbose and "log: /var/lib/fwsafe/tx/T1/guard.log" in verbose
    wrong = format_status(_pending(guard_alive=False, shielded=False, shield_error="EPERM"))
    assert "guard: PID 42 (setsid), GONE: run `fwsafe recover`" in wrong
    assert "guard NOT shielded from the OOM killer: EPERM" in wrong


def test_the_transcripts_in_the_docs_fit_their_limits() -> None:
    """docs/transcripts.md: every screen tests/lab/test_transcripts.py captures is there, within
    its line limit, with no escape sequence; the check on a stock ufw host says what matters."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "transcripts.md").read_text()
    screens = dict(re.findall(r"<!-- (.+?) -->\n```\n(.*?)\n```", text, re.S))
    assert set(screens) == set(TRANSCRIPT_LIMITS)
    for key, screen in screens.items():
        assert len(screen.split("\n")) <= TRANSCRIPT_LIMITS[key], key
        assert "\x1b" not in screen and screen.startswith("$ fwsafe "), key
    allow = screens["check allow 80"].split("\n")
    assert allow[1] == "Result: the management path stays open." and "NOT checked" not in allow
    deny = screens["check deny 22"].split("\n")
    assert deny[1].startswith("Result: LOCKOUT") and "culprit: `ufw deny 22/tcp`" in "\n".join(deny[:6])
    assert "`fwsafe ufw allow 22/tcp`" in screens["refused enable"]


def test_audit_and_exposure_count_the_rules_not_checked_and_list_them_with_v() -> None:
    sshd = Listener("tcp", 4, "0.0.0.0", 22, [12], "sshd", 812)
    node = Listener("tcp", 4, "0.0.0.0", 5678, [11], "node", 1234)
    rounds = {CURRENT: {sshd.key(): Reach([("world", 4)]), node.key(): Reach()},
              CANDIDATE: {sshd.key(): Reach([("world", 4)]), node.key(): Reach([("world", 4)])}}
    ufw_log = ("current iptables rules: `-A ufw-logging-deny -m limit --limit 3/min -j LOG`: "
               "limit: a rate limit")
    reach = ReachReport(sources=[Source("world", 4, "1.2.3.4", "eth0")], rounds=rounds,
                        notes=["no route to the world over IPv6"], not_checked=[ufw_log] * 3)
    report = AuditReport([sshd, node], reach, CURRENT, expected_ports(["22/tcp"]))
    text = report.describe()
    lines = text.split("\n")
    assert lines[0] == "Result: nothing unexpected is reachable from the world."
    assert ufw_log not in text and "Note:" not in text
    assert lines[-1].startswith("Left out (-v): 3 unreproducible rules (a listener one may hide "
                                "is marked UNCERTAIN above); 1 note")
    verbose = report.describe(verbose=True)
    assert verbose.count(ufw_log) == 3 and "Note: no route" in verbose and "Left out" not in verbose
    change = ExposureChange.between([sshd, node], reach)
    section, left_out = change.summary(False)
    assert section[1].startswith("  opens   5678/tcp on 0.0.0.0:5678 (node, PID 1234): world")
    assert left_out == ["exposure: 3 unreproducible rules, 1 note"]
    listed, _ = change.summary(True, rules_listed=True)
    assert ufw_log not in "\n".join(listed)   # the check's -v listed them already
    assert "not checked: 3 rules the sandbox cannot reproduce, as listed above" in listed[-1]
    assert change.to_json()["not_checked"] == [ufw_log] * 3


def test_check_v_says_what_the_sandbox_left_out_and_loaded_whole() -> None:
    from fwsafe.check.check_report import check_lines

    report = CheckReport(verdicts=[Verdict("new tcp 10.0.0.2 -> :22 (ipv4)", True)],
                         clients=["10.0.0.2"], port=22, left_out=49990,
                         pruning=["IPv4 table nat: loaded whole (it inserts, ...)"])
    verbose, _ = check_lines(report, True)
    assert "Sandbox: 49,990 rules left out" in "\n".join(verbose)
    assert "  IPv4 table nat: loaded whole (it inserts, ...)" in verbose
    quiet, _ = check_lines(report, False)
    assert not any(line.startswith("Sandbox:") for line in quiet)   # -v only
    report.left_out, report.pruning = 0, []
    assert not any(line.startswith("Sandbox:") for line in check_lines(report, True)[0])
    assert report.to_json()["sandbox"] == {"rules_left_out": 0, "pruning": []}
