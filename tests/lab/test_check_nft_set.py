"""Issue 27: `fwsafe check` of an nft file that replaces its table with a set of 64k elements
(past the size where `nft --echo` overflows netlink's buffer: the sandbox then could not load
the candidate and every path was "not checked"). The candidate is loaded as apply loads it,
its rules named through the sandbox's listing: a client in the set is a lockout named by its
file line, one outside it gets in."""

from __future__ import annotations

import re

import pytest

from tests.conftest import FwLab
from tests.lab.test_check import check, verdict

pytestmark = pytest.mark.lab

SIZE = 64000


def blocklist(client: str | None) -> str:
    elements = [f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}" for i in range(SIZE)]
    if client is not None:
        elements[SIZE // 2] = client
    lines = ["table inet fw", "delete table inet fw", "table inet fw {", "\tset blocked {",
             "\t\ttype ipv4_addr", "\t\telements = {"]
    lines += [f"\t\t\t{', '.join(elements[i:i + 8])}," for i in range(0, SIZE, 8)]
    lines += ["\t\t}", "\t}", "\tchain input {",
              "\t\ttype filter hook input priority 0; policy accept;",
              "\t\tct state established,related accept",
              "\t\tip saddr @blocked tcp dport 22 drop", "\t}", "}"]
    return "\n".join(lines) + "\n"


def test_a_set_of_64k_elements_is_checked_and_its_rule_named(fwlab: FwLab) -> None:
    client = fwlab.lab.cli_ip4
    banned = fwlab.write("banned.nft", blocklist(client))
    code, data, stderr = check(fwlab, str(banned), "--client", client, "--no-exposure",
                               timeout=300)
    assert code == 1, stderr
    new = verdict(data, "new", client)
    assert new["ok"] is False, new
    line = blocklist(client).splitlines().index("\t\tip saddr @blocked tcp dport 22 drop") + 1
    assert re.search(rf"banned\.nft:{line}: `ip saddr @blocked tcp dport 22 drop`",
                     new["culprit"]), new
    clean = fwlab.write("clean.nft", blocklist(None))
    code, data, stderr = check(fwlab, str(clean), "--client", client, "--no-exposure",
                               timeout=300)
    assert code == 0, stderr
    assert verdict(data, "new", client)["ok"] is True
