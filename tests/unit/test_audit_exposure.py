"""`check`'s Exposure section compares the forwards too (issue 29): a DNAT to another host that
the change adds, opens to everyone, takes away or limits is listed, read from the nat rules
of both rounds (fwsafe.audit.nat, as `fwsafe audit` lists forwards)."""

from __future__ import annotations

from fwsafe.audit.audit_report import ExposureChange
from fwsafe.audit.nat import nat_rules
from fwsafe.audit.reach import CANDIDATE, CURRENT, ReachReport

NAT = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
       ":POSTROUTING ACCEPT [0:0]\n{rules}COMMIT\n")
VM = "-A PREROUTING -p tcp --dport 8090 -j DNAT --to-destination 10.233.0.10:80\n"
VM_OFFICE = ("-A PREROUTING -s 203.0.113.0/24 -p tcp --dport 8090 -j DNAT "
             "--to-destination 10.233.0.10:80\n")
DB = "-A PREROUTING -p tcp --dport 5432 -j DNAT --to-destination 10.233.0.11:5432\n"


def change(before: str, after: str) -> ExposureChange:
    local = {"10.0.0.1"}
    rounds = {name: nat_rules([(4, NAT.format(rules=text))], local)[1]
              for name, text in ((CURRENT, before), (CANDIDATE, after))}
    return ExposureChange.between([], ReachReport(forwards=rounds))


def test_a_new_forward_is_opened_and_a_removed_one_closed() -> None:
    added = change(VM, VM + DB)
    assert [(f.label, f.target) for f in added.forwards_opened] == [("5432/tcp",
                                                                     "10.233.0.11:5432")]
    assert added.forwards_closed == []
    data = added.to_json()["forwards"]
    assert data["opens"][0]["exposed"] is True and data["opens"][0]["address"] == "10.233.0.11"
    assert any("opens   forward 5432/tcp -> 10.233.0.11:5432 (PREROUTING): whoever is "
               "routed here" in line for line in added.lines())

    removed = change(VM + DB, VM)
    assert [f.label for f in removed.forwards_closed] == ["5432/tcp"]
    assert removed.to_json()["forwards"]["closes"][0]["exposed"] is False
    assert any("closes  forward 5432/tcp" in line and "no longer forwarded" in line
               for line in removed.lines())


def test_limiting_a_forward_to_a_source_closes_it_and_lifting_the_limit_opens_it() -> None:
    limited = change(VM, VM_OFFICE)
    assert [f.open for f in limited.forwards_closed] == [False]
    assert limited.forwards_opened == []
    assert limited.to_json()["forwards"]["closes"][0]["exposed"] is None
    lifted = change(VM_OFFICE, VM)
    assert [f.open for f in lifted.forwards_opened] == [True]
    assert lifted.forwards_closed == []


def test_the_same_forwards_are_no_change() -> None:
    same = change(VM + DB, DB + VM)
    assert same.forwards_opened == same.forwards_closed == []
    assert same.lines()[-1].endswith("reachable from the same places")
