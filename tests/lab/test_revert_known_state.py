"""Issue 27: the revert's access proof reads the state the revert proved loaded instead of
capturing the whole ruleset again, with the real kernel and tools. The state is the kernel's
(iptables-save shows the same tables), it stands for the live firewall only while nf_tables'
generation says nothing else was committed, and a rule another program adds after the load is
seen by the proof (the shortcut does not apply). The guard's whole way back with the proof:
tests/lab/test_revert_proven.py."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import FwLab

pytestmark = pytest.mark.lab

SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from fwsafe.backends import layer_for
    from fwsafe.backends.iptsave import parse_ruleset
    from fwsafe.core.revert import compute_touched, live_state, revert_change

    def ipt(tool, *args):
        subprocess.run([tool, "-w", *args], check=True, timeout=30)

    layers = {n: layer_for(n) for n in ("ipv4", "ipv6")}
    before = {n: layer.capture() for n, layer in layers.items()}
    ipt("iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8080", "-j", "DROP")   # the change
    ipt("ip6tables", "-N", "CHANGE")
    ipt("ip6tables", "-A", "INPUT", "-j", "CHANGE")
    after = {n: layer.capture() for n, layer in layers.items()}
    result = revert_change(compute_touched(before, after), before, after)
    out = {"ok": result.ok, "known": sorted(result.known)}
    # Both layers' states hold at the end (ipv4's load, then only ipv6's own commits).
    for name, layer in layers.items():
        data = result.known[name][1]
        out[name + "_kernel"] = parse_ruleset(data.decode()) == parse_ruleset(
            layer.capture().decode())
        out[name + "_as_before"] = parse_ruleset(data.decode()) == parse_ruleset(
            before[name].decode())
        out[name + "_reused"] = live_state(name, result.known) is data
    # Another program acts after the load: the proved state no longer stands for the live one.
    ipt("iptables", "-I", "INPUT", "1", "-s", sys.argv[1], "-j", "DROP")
    seen = live_state("ipv4", result.known)
    out["after_other_read_again"] = seen is not result.known["ipv4"][1] \\
        and sys.argv[1].encode() in seen
    out["ipv6_read_again"] = live_state("ipv6", result.known) is not result.known["ipv6"][1]
    print(json.dumps(out))
""")


def test_the_proof_reads_the_loaded_state_only_while_nothing_else_changed(fwlab: FwLab) -> None:
    out = fwlab.srv_python(SCRIPT, fwlab.lab.cli_ip4)
    assert out["ok"] and out["known"] == ["ipv4", "ipv6"]
    for name in ("ipv4", "ipv6"):
        assert out[name + "_kernel"] and out[name + "_as_before"] and out[name + "_reused"]
    assert out["after_other_read_again"] and out["ipv6_read_again"]

