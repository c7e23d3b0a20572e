"""Issue 27: the hatch reads only the tables it can be in (one netlink dump says which exist),
not kube-proxy's nat table of thousands of rules, nor iptables-nft's tables through nft. With
the real kernel and tools: what it reads is what the whole reading gave; a table that does not
exist is not read, so the hatch never makes one (`iptables-save -t raw` shows a raw table that
does not exist); the hatch goes in and out of a native nft table beside them; nothing else is
touched."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import FwLab

pytestmark = pytest.mark.lab

SCRIPT = textwrap.dedent("""
    import json, subprocess, sys, time
    from fwsafe.backends import nflist
    from fwsafe.guard import hatch_chains, hatch_spec, hatch_sync
    from fwsafe.ondisk.hatch_rules import MARK

    def sh(argv, data=None):
        return subprocess.run(argv, input=data, capture_output=True, text=True, check=True,
                              timeout=60).stdout

    nat = "".join(f"-A PREROUTING -d 10.96.{i // 250}.{i % 250 + 1}/32 -p tcp --dport 80 "
                  f"-j DNAT --to-destination 10.244.0.{i % 250 + 1}:8080\\n" for i in range(2000))
    sh(["iptables-restore", "--noflush"], "*nat\\n" + nat + "COMMIT\\n")
    sh(["nft", "-f", "-"], "table inet lockout { chain input { type filter hook input "
       "priority -10; policy accept; tcp dport 22 ct state new drop; }; }\\n")
    before_nat = sh(["iptables-save", "-t", "nat"])
    out = {}
    for layer in ("ipv4", "nft"):
        whole = (hatch_chains.parse_iptables(sh(["iptables-save"]), layer) if layer == "ipv4" else
                 [c for c in hatch_chains.parse_nft(sh(["nft", "-a", "list", "ruleset"]))
                  if not hatch_sync._nft_skipped(c.family, c.table)])
        out[layer + "_same"] = sorted(map(repr, hatch_sync.read_chains(layer))) == sorted(
            map(repr, whole))
    spec = hatch_spec.Spec("t27", int(time.time()) + 3600, (sys.argv[1],), (), (22,))
    out["loaded"] = hatch_sync.sync(spec, ["ipv4", "ipv6", "nft"])
    out["tables"] = sorted(f"{f} {t}" for f, t in nflist.kernel_tables())
    out["filter_has"] = MARK in sh(["iptables-save", "-t", "filter"])
    out["nft_has"] = MARK in sh(["nft", "list", "table", "inet", "lockout"])
    out["nat_same"] = sh(["iptables-save", "-t", "nat"]).split("\\n")[2:-2] == \\
        before_nat.split("\\n")[2:-2]
    out["removed"] = hatch_sync.sync(None, ["ipv4", "ipv6", "nft"])
    out["left"] = MARK in sh(["iptables-save"]) + sh(["nft", "list", "ruleset"])
    print(json.dumps(out))
""")


def test_the_hatch_reads_and_changes_only_the_tables_it_can_be_in(fwlab: FwLab) -> None:
    out = fwlab.srv_python(SCRIPT, fwlab.lab.cli_ip4)
    assert out["ipv4_same"] and out["nft_same"]
    assert out["loaded"]["ipv4"] == "loaded" and out["loaded"]["nft"] == "loaded"
    assert "ip raw" not in out["tables"] and "ip mangle" not in out["tables"], out["tables"]
    assert out["filter_has"] and out["nft_has"] and out["nat_same"]
    assert set(out["removed"].values()) == {"removed"}, out["removed"]
    assert out["left"] is False
