"""Issue 27: the fidelity test (fwsafe.backends.fidelity) compares the kernel's own netlink
description of each table here and after the round trip (nflist.digests) before it lists them
with nft. With the real kernel and tools: a kube-proxy-like table (comments, statistic, DNAT)
and a filter table whose counters run are proved exact by the digests alone (nft lists
nothing); a native nft rule in ip filter (no set: the digest covers it) makes the digests
differ, nft's listings decide, and the table is lossy; a set makes the digest unsure and the
listings decide too."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import FwLab

pytestmark = pytest.mark.lab

SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from fwsafe.backends import fidelity, nflist

    def sh(argv, data=None):
        return subprocess.run(argv, input=data, capture_output=True, text=True, check=True,
                              timeout=60).stdout

    listed = []
    real_list = fidelity._list
    def counting(prefix, family, table):
        listed.append(table)
        return real_list(prefix, family, table)
    fidelity._list = counting

    nat = ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-SVC-A - [0:0]", ":KUBE-SEP-A - [0:0]",
           "-A PREROUTING -m comment --comment \\"kubernetes service portals\\" -j KUBE-SERVICES",
           "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \\"default/k\\" "
           "-m tcp --dport 443 -j KUBE-SVC-A",
           "-A KUBE-SVC-A -m statistic --mode random --probability 0.5 -j KUBE-SEP-A",
           "-A KUBE-SEP-A -p tcp -j DNAT --to-destination 10.244.0.5:6443", "COMMIT", ""]
    sh(["iptables-restore", "--noflush"], "\\n".join(nat))
    sh(["iptables", "-I", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT"])
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:   # counters move
        for _ in range(3):
            udp.sendto(b"x", ("127.0.0.1", 9))
    assert "[3:" in sh(["iptables-save", "-c", "-t", "filter"])
    out = {"plain": fidelity.lossy_tables("ipv4", ["filter", "nat"]), "listed": list(listed)}
    out["digests_equal_again"] = nflist.digests("ip") == nflist.digests("ip")
    listed.clear()
    sh(["nft", "add", "rule", "ip", "filter", "INPUT", "tcp", "dport", "2323", "drop"])
    out["native"] = fidelity.lossy_tables("ipv4", ["filter", "nat"])
    out["native_listed"] = sorted(listed)
    listed.clear()
    sh(["nft", "delete", "table", "ip", "filter"])
    sh(["iptables", "-A", "INPUT", "-j", "ACCEPT"])
    sh(["nft", "add", "set", "ip", "filter", "blk", "{ type ipv4_addr; }"])
    out["unsure"] = nflist.digests("ip").get("filter")
    out["set"] = fidelity.lossy_tables("ipv4", ["filter"])
    out["set_listed"] = sorted(listed)
    print(json.dumps(out))
""")


def test_digests_spare_the_listings_only_where_the_kernel_holds_the_same(fwlab: FwLab) -> None:
    out = fwlab.srv_python(SCRIPT)
    assert out["plain"] == [] and out["listed"] == [] and out["digests_equal_again"]
    assert out["native"] == ["ip filter"]
    assert "filter" in out["native_listed"] and "nat" not in out["native_listed"]
    assert out["unsure"] == ""
    assert "filter" in out["set_listed"]
