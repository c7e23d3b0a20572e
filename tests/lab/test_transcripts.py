"""The ufw user's flow as a person sees it (issue 28): a real terminal (tmux) running an SSH
session to the lab's server, on a fresh ufw host; each command's screen is pinned by its line
count and its key lines, so the noise cannot come back. docs/transcripts.md holds one such
capture; FWSAFE_TRANSCRIPTS=PATH writes this run's there (to refresh the docs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import FwLab
from tests.terminal import TRANSCRIPT_LIMITS, Terminal, lab_shell

pytestmark = pytest.mark.lab
COUNTDOWN = r"left — type 'yes'"
DONE = r"confirmed: transaction \S+ stays[^\n]*\n\$\Z"   # and the prompt is back



def _write(sections: list[tuple[str, str, str]], append: bool = False) -> None:
    target = os.environ.get("FWSAFE_TRANSCRIPTS")
    if not target:
        return
    if append:
        with Path(target).open("a") as out:
            for key, title, screen in sections:
                out.write("\n".join([f"## {title}", "", f"<!-- {key} -->", "```", screen,
                                     "```", ""]) + "\n")
        return
    parts = ["# Transcripts: a ufw host, as a person sees it", "",
             "Captured from a terminal (tmux) by tests/lab/test_transcripts.py: an SSH session to",
             "a fresh ufw host in the namespace lab (ufw installed, not enabled, no rules yet);",
             "`fwsafe confirm` runs in a second, NEW SSH session. Refresh with",
             "`FWSAFE_TRANSCRIPTS=docs/transcripts.md pytest tests/lab/test_transcripts.py`;",
             "the test pins each screen's line count and key lines. \"NOT shielded from the OOM",
             "killer\" is the lab machine's (no CAP_SYS_RESOURCE there); a host's guard is.", ""]
    for key, title, screen in sections:
        parts += [f"## {title}", "", f"<!-- {key} -->", "```", screen, "```", ""]
    Path(target).write_text("\n".join(parts))


def _pin(key: str, screen: str, *patterns: str) -> None:
    lines = screen.split("\n")
    assert len(lines) <= TRANSCRIPT_LIMITS[key], f"{key}: {len(lines)} lines:\n{screen}"
    for pattern in patterns:
        assert re.search(pattern, screen, re.M), f"{key}: no {pattern!r} in:\n{screen}"
    assert "\x1b" not in screen


def test_the_ufw_users_flow_in_a_terminal(fwlab_ufw: FwLab) -> None:
    fw = fwlab_ufw
    env = {"FWSAFE_STATE_DIR": str(fw.state_dir), "TERM": "xterm"}
    shell = fw.lab.ssh_argv(lab_shell(env), tty=True)
    sections: list[tuple[str, str, str]] = []
    port = fw.lab.ssh_port
    with Terminal(shell) as term, Terminal(shell) as other:
        # A fresh host: enabling ufw (default deny incoming) would cut SSH.
        screen = term.run("fwsafe ufw --force enable")
        _pin("refused enable", screen, r"lockout predicted on port 22",
             r"`:INPUT DROP \[0:0\]` \(chain policy\)",
             re.escape(f"allow SSH first: `fwsafe ufw allow {port}/tcp`"))
        sections.append(("refused enable", "`fwsafe ufw --force enable` on a fresh host: refused",
                         screen))
        assert term.run("echo $?").endswith("\n3")
        assert b"ENABLED=no" in fw.ufw_files()["ufw.conf"]

        # The fix it names, confirmed at the countdown.
        sections.append(_kept_at_countdown(term, "allow 22", "fwsafe ufw allow 22/tcp"))

        # Enabled now; confirmed from a NEW session, as the guard asks.
        term.start("fwsafe ufw --force enable", COUNTDOWN)
        screen = other.run("fwsafe status")
        _pin("status", screen, r"^transaction \S+: pending", r"fwsafe confirm")
        sections.append(("status", "`fwsafe status` in a second session, while it counts down",
                         screen))
        screen = other.run("fwsafe confirm")
        _pin("confirm", screen, r"^confirmed")
        sections.append(("confirm", "`fwsafe confirm` in that NEW session", screen))
        term.wait_for(DONE, 30)
        sections.append(("enable", "`fwsafe ufw --force enable` once SSH is allowed",
                         term_block(term, "fwsafe ufw --force enable")))
        _pin("enable", sections[-1][2], r"Lockout check: the SSH path stays open",
             r"confirmed: transaction \S+ stays")
        assert b"ENABLED=yes" in fw.ufw_files()["ufw.conf"]

        # A harmless change, and the one that would lock the admin out.
        sections.append(_kept_at_countdown(term, "allow 80", "fwsafe ufw allow 80/tcp"))
        screen = term.run("fwsafe ufw deny 22/tcp")
        _pin("refused deny", screen, r"lockout predicted on port 22",
             r"dropped by `ufw deny 22/tcp` \(ipv4\):\d+: `-A ufw-user-input -p tcp -m tcp "
             r"--dport 22 -j DROP`", r"the rule that `ufw deny 22/tcp` adds cuts SSH on port 22",
)
        assert "Rule added" not in screen  # ufw said so on the copy only
        sections.append(("refused deny", "`fwsafe ufw deny 22/tcp`: refused, naming the rule",
                         screen))
        assert fw.lab.new_connection_ok(timeout=1.0)

        # On the terminal the verdicts alone are in colour: the three checks that passed.
        coloured = [line for line in term.capture(escapes=True).split("\n")
                    if re.search("\x1b\\[3[1-7]m", line)]
        assert len(coloured) == 3, coloured
        assert all("Lockout check: the SSH path stays open" in line for line in coloured)

        screen = term.run("fwsafe history")
        _pin("history", screen, r"ufw allow 80/tcp", r"ufw --force enable")
        sections.append(("history", "`fwsafe history`", screen))
    _write(sections)


def test_check_on_a_stock_ufw_host_fits_one_screen(fwlab_ufw: FwLab) -> None:
    """ufw enabled with `allow 22/tcp`, both families, as a ufw host is: a harmless change is
    said to keep the management path open, in a few lines, with nothing unchecked that
    matters (ufw's rate-limited LOG rules and ICMPv6 rules cannot decide an SSH packet's fate);
    a lockout names its culprit within the first 5 lines."""
    fw = fwlab_ufw
    fw.lab.srv_exec(["ufw", "allow", "22/tcp"])
    fw.lab.srv_exec(["ufw", "--force", "enable"])
    env = {"FWSAFE_STATE_DIR": str(fw.state_dir), "TERM": "xterm"}
    clients = f"--client {fw.lab.cli_ip4},{fw.lab.cli_ip6}"
    sections = []
    with Terminal(fw.lab.ssh_argv(lab_shell(env), tty=True)) as term:
        screen = term.run(f"fwsafe check {clients} -- ufw allow 80/tcp")
        _pin("check allow 80", screen, r"^Result: the management path stays open\.$",
             r"^  ok +new tcp .* \(ipv4\)$", r"^  ok +new tcp .* \(ipv6\)$",
             r"^Left out \(-v\): \d+ unreproducible rules, none able to change the verdict")
        assert "NOT checked" not in screen and "(ipv4) (ipv4)" not in screen
        # On a terminal the verdict, and only the verdict, is in colour.
        coloured = [line for line in term.capture(escapes=True).split("\n")
                    if re.search("\x1b\\[3[1-7]m", line)]
        assert len(coloured) == 1 and "Result: the management path stays open" in coloured[0]
        sections.append(("check allow 80", "`fwsafe check -- ufw allow 80/tcp` (ufw enabled "
                         "with `allow 22/tcp`)", screen))
        screen = term.run(f"fwsafe check {clients} -- ufw deny 22/tcp")
        head = "\n".join(screen.split("\n")[:6])    # the command's line, then 5 lines
        assert re.search(r"^Result: LOCKOUT predicted", head, re.M), screen
        assert re.search(r"culprit: `ufw deny 22/tcp` \(ipv4\):\d+: `-A ufw-user-input -p tcp "
                         r"-m tcp --dport 22 -j DROP`", head), screen
        _pin("check deny 22", screen, r"^  closes +22/tcp on",
             r"^fwsafe: error: lockout predicted on port 22$")
        sections.append(("check deny 22", "`fwsafe check -- ufw deny 22/tcp`", screen))
        assert term.run("echo $?").endswith("\n1")
    _write(sections, append=True)


def test_refused_enable_names_the_port_sshd_listens_on(fwlab_ufw: FwLab) -> None:
    """sshd on port 2222: the fix offered is `fwsafe ufw allow 2222/tcp`, and it works."""
    fw = fwlab_ufw
    fw.lab.stop_sshd()
    fw.lab.start_sshd(env={"FWSAFE_STATE_DIR": str(fw.state_dir)}, port=2222)
    refused = fw.lab.ssh("fwsafe ufw --force enable", timeout=60)
    assert refused.returncode == 3, refused.stderr
    assert "allow SSH first: `fwsafe ufw allow 2222/tcp`" in refused.stderr, refused.stderr
    assert b"ENABLED=no" in fw.ufw_files()["ufw.conf"]
    assert fw.lab.ssh("fwsafe ufw --detach allow 2222/tcp", timeout=60).returncode == 0
    assert fw.lab.ssh("fwsafe confirm").returncode == 0
    enabled = fw.lab.ssh("fwsafe ufw --detach --force enable", timeout=60)
    assert enabled.returncode == 0, enabled.stderr
    assert fw.lab.new_login_ok() and fw.lab.ssh("fwsafe confirm").returncode == 0


def _kept_at_countdown(term: Terminal, key: str, command: str) -> tuple[str, str, str]:
    """Run a harmless change, type `yes` at its countdown: its screen, pinned."""
    term.start(command, COUNTDOWN)
    term.type("yes")
    term.wait_for(DONE, 60)
    screen = term_block(term, command)
    assert screen.count("left — type 'yes'") == 1, screen   # the countdown: one line, redrawn
    _pin(key, screen, r"Lockout check: the SSH path stays open", COUNTDOWN,
         r"confirmed: transaction \S+ stays")
    return key, f"`{command}`, kept at the countdown", screen


def term_block(term: Terminal, command: str) -> str:
    """The last run of `command` on the terminal's screen, up to the next prompt."""
    lines = term.capture().split("\n")
    start = max(i for i, line in enumerate(lines) if line == f"$ {command}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i] == "$"
                or lines[i].startswith("$ ")), len(lines))
    return "\n".join(lines[start:end])
