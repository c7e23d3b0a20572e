"""Issue 27: a revert asked right after the change goes back from the snapshot, without waiting
for the guard's capture after the change and without reading the ruleset, while nf_tables'
generation shows that nothing but the change committed since the snapshot; with the real
kernel and tools. Still "verified" only after the kernel's verdict (the access proof), the
ruleset is the one from before (a table the change created is gone), and when another
program commits after the change the usual three-way merge keeps its rule."""

from __future__ import annotations

import json
import textwrap

import pytest

from fwsafe.lab import normalize_save
from tests.bins import FWSAFE
from tests.conftest import FwLab

pytestmark = pytest.mark.lab

NAT = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
       ":POSTROUTING ACCEPT [0:0]\n:SVC - [0:0]\n-A PREROUTING -d 10.96.0.{n}/32 -j SVC\n"
       "-A SVC -p tcp -j DNAT --to-destination 10.244.0.{n}:80\nCOMMIT\n")
FILTER = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
          ":BLOCK - [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A INPUT -j BLOCK\n"
          "-A BLOCK -s 10.{n}.0.1/32 -j DROP\nCOMMIT\n")
MANGLE = "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -s 10.7.7.7/32 -j MARK --set-mark 7\nCOMMIT\n"


def save(fw: FwLab) -> str:
    return normalize_save(fw.lab.srv_exec(["iptables-save"]).stdout)


def test_an_immediate_revert_goes_back_from_the_snapshot_verified(fwlab: FwLab) -> None:
    lab = fwlab.lab
    lab.srv_exec(["iptables-restore"], input=FILTER.format(n=1) + NAT.format(n=1))
    before = save(fwlab)
    change = fwlab.write("change.rules", FILTER.format(n=2) + NAT.format(n=2) + MANGLE)
    env = ["env", f"FWSAFE_STATE_DIR={fwlab.state_dir}",
           f"SSH_CONNECTION={lab.cli_ip4} 50022 {lab.srv_ip4} 22"]
    applied = lab.srv_exec([*env, FWSAFE, "apply", "--detach", "--json", "--force", "--timeout",
                            "60", str(change)], check=False, timeout=120)
    assert applied.returncode == 0, applied.stderr
    assert "10.2.0.1" in save(fwlab) and "MARK" in save(fwlab)
    reverted = lab.srv_exec([*env, FWSAFE, "revert"], check=False, timeout=120)
    assert reverted.returncode == 4, reverted.stderr
    info = fwlab.status()
    log = (fwlab.state_dir / "tx" / json.loads(applied.stdout)["id"] / "guard.log").read_text()
    print(log)
    assert "its tables go back as in the snapshot, nothing read" in log
    assert info["state"] == "reverted" and info["revert_verified"] is True, info
    assert info["revert_proofs"]["ipv4"] == "the change's delta is gone from the kernel's state"
    assert info["revert_proofs"]["access"].startswith("access: a NEW SSH connection gets in")
    assert not info.get("revert_notes"), info["revert_notes"]
    assert save(fwlab) == before, "the ruleset is not the one from before the change"
    assert "*mangle" not in lab.srv_exec(["iptables-save"]).stdout, "the change's table stayed"
    assert lab.new_login_ok()


SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from fwsafe.backends import layer_for, nflist
    from fwsafe.backends.iptables import parse_ruleset
    from fwsafe.core.revert import compute_touched, revert_change
    from fwsafe.core.transaction import Record
    from fwsafe.guard.applying import change_stamp, snapshot_touched

    layer = layer_for("ipv4")
    before = {"ipv4": layer.capture()}
    record = Record(id="t", state="pending", created=0, timeout_s=60, backend="rules",
                    layers=["ipv4"], before_stamp=nflist.ruleset_stamp())
    change = {"ipv4": sys.argv[1].encode()}
    out = {"other_stamp": change_stamp(Record(**{**record.__dict__, "before_stamp": "x/1/1"}),
                                        change, record.before_stamp)}
    stamp = nflist.ruleset_stamp()
    subprocess.run(["iptables-restore", "-w", "5"], input=change["ipv4"], check=True)
    quiet = change_stamp(record, change, stamp)
    out["quiet"] = quiet is not None
    after = {"ipv4": layer.capture()}
    # Another program commits after the change: the snapshot's way no longer applies, and the
    # merge keeps its rule.
    subprocess.run(["iptables", "-w", "-A", "OUTPUT", "-d", "10.8.8.8", "-j", "DROP"], check=True)
    result = revert_change(compute_touched(before, after), before, after, unchanged_since=quiet)
    now = layer.capture().decode()
    out.update(levels=result.levels, notes=result.notes, kept="10.8.8.8" in now,
               change_gone="10.2.0.1" not in now,
               touched=sorted(snapshot_touched(record, change, before)["ipv4"]))
    print(json.dumps(out))
""")


def test_another_commit_after_the_change_takes_the_merge(fwlab: FwLab) -> None:
    fwlab.lab.srv_exec(["iptables-restore"], input=FILTER.format(n=1) + NAT.format(n=1))
    out = fwlab.srv_python(SCRIPT, FILTER.format(n=2) + NAT.format(n=2))
    assert out["other_stamp"] is None          # the snapshot was not taken at that stamp
    assert out["quiet"] is True                # two tables, two commits, nothing else
    assert out["levels"] == {"ipv4": "merge"} and out["notes"] == []
    assert out["kept"] and out["change_gone"]
    assert "filter/BLOCK" in out["touched"] and "nat/SVC" in out["touched"]
