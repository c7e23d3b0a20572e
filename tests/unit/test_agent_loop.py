"""The sandbox agents' one serve loop (fwsafe/check/agent_loop.py), run the way the sandbox runs
them: by path, `python -I -S AGENT` (no site, neither their folder nor fwsafe on sys.path),
from another directory. Each says ready, answers every line (one it cannot read too), skips
blank ones and exits 0 at end of input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fwsafe.audit import reach
from fwsafe.check import sandbox


@pytest.mark.parametrize("agent", [sandbox.AGENT, reach.AGENT], ids=["check", "audit"])
def test_an_agent_run_by_path_serves_one_json_line_per_request(agent: Path) -> None:
    requests = "not json\n\n" + json.dumps({"op": "no-such-op"}) + "\n" + \
        json.dumps({"op": "sysctl"}) + "\n"
    result = subprocess.run([sys.executable, "-I", "-S", str(agent)], input=requests,
                            capture_output=True, text=True, cwd="/", timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers[0]["ready"] is True and answers[0]["ok"] is True
    assert [a["ok"] for a in answers[1:]] == [False, False, False]
    assert answers[1]["error"].startswith("bad request: ")
    assert answers[2]["error"] == "unknown op 'no-such-op'"
    assert answers[3]["error"] == "bad request: 'name'"   # a request missing its field


@pytest.mark.parametrize("agent", [sandbox.AGENT, reach.AGENT], ids=["check", "audit"])
def test_both_agents_refuse_a_sysctl_outside_net_alike(agent: Path) -> None:
    """One `sysctl` request (fwsafe.check.agent_loop.sysctl), the stricter name check for both
    agents: nothing outside /proc/sys/net is written (only refusals are asked here: this
    process runs in the machine's own namespace)."""
    names = ["", "/proc/sys/kernel/panic", "../kernel/panic", "ipv4/conf/../../../kernel/x",
             "ipv4/./ip_forward", "ipv4//ip_forward", "ipv4/ip_forward/"]
    requests = "".join(json.dumps({"op": "sysctl", "name": n, "value": "1"}) + "\n"
                       for n in names)
    result = subprocess.run([sys.executable, "-I", "-S", str(agent)], input=requests,
                            capture_output=True, text=True, cwd="/", timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()][1:]
    assert [a["error"] for a in answers] == [f"bad sysctl name {n!r}" for n in names]
