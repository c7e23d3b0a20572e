"""The sandbox agent (fwsafe/netns_agent/agent.py), run the way the sandbox runs it: by path,
`python -I -S AGENT` (no site, neither its folder nor fwsafe on sys.path), from another
directory. It says ready, answers every line (one it cannot read too), skips blank ones and
exits 0 at end of input; one process serves the check's requests and the audit's."""

from __future__ import annotations

import json
import subprocess
import sys

from fwsafe.netns_agent import AGENT


def _run(requests: str) -> list[dict[str, object]]:
    result = subprocess.run([sys.executable, "-I", "-S", AGENT], input=requests,
                            capture_output=True, text=True, cwd="/", timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_agent_run_by_path_serves_one_json_line_per_request() -> None:
    answers = _run("not json\n\n" + json.dumps({"op": "no-such-op"}) + "\n" +
                   json.dumps({"op": "sysctl"}) + "\n")
    assert answers[0]["ready"] is True and answers[0]["ok"] is True
    assert [a["ok"] for a in answers[1:]] == [False, False, False]
    assert str(answers[1]["error"]).startswith("bad request: ")
    assert answers[2]["error"] == "unknown op 'no-such-op'"
    assert answers[3]["error"] == "bad request: 'name'"   # a request missing its field


def test_one_agent_serves_the_checks_requests_and_the_audits() -> None:
    """Requests of both sets that change nothing outside the agent (this process runs in the
    machine's own namespace): a kept connection that is not there, the peers heard, a batch of
    no probes."""
    requests = [{"op": "ping", "id": "c1", "timeout": 1}, {"op": "peers", "settle": 0},
                {"op": "start", "attempts": []}, {"op": "finish", "expect": [], "wait": 0},
                {"op": "open", "id": "c1"}]
    answers = _run("".join(json.dumps(r) + "\n" for r in requests))[1:]
    assert answers[0] == {"ok": False, "error": "no connection c1"}
    assert answers[1] == {"ok": True, "peers": {}}
    assert answers[2]["ok"] is True and answers[2]["results"] == {}
    assert answers[3] == {"ok": True, "results": {}}
    assert answers[4] == {"ok": False, "error": "bad request: 'src'"}


def test_the_agent_refuses_a_sysctl_outside_net() -> None:
    """The `sysctl` request (fwsafe.netns_agent.agent_loop.sysctl): nothing outside
    /proc/sys/net is written (only refusals are asked here: this process runs in the machine's
    own namespace)."""
    names = ["", "/proc/sys/kernel/panic", "../kernel/panic", "ipv4/conf/../../../kernel/x",
             "ipv4/./ip_forward", "ipv4//ip_forward", "ipv4/ip_forward/"]
    answers = _run("".join(json.dumps({"op": "sysctl", "name": n, "value": "1"}) + "\n"
                           for n in names))[1:]
    assert [a["error"] for a in answers] == [f"bad sysctl name {n!r}" for n in names]
