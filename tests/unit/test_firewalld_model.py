"""The firewalld layer's pieces that need no firewalld: its listing parser, the runtime
commands that turn one model into another, /etc/firewalld captured and restored
byte-identically (modes, owners, files and directories that appeared), and the nft layer
leaving firewalld's tables to it. The real firewalld: tests/lab/test_firewalld.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fwsafe.backends import FIREWALLD_TABLES, owned_elsewhere
from fwsafe.backends.base import MERGE
from fwsafe.backends.firewalld_layer import FirewalldLayer
from fwsafe.backends.firewalld_model import (
    merge_models,
    parse_ipsets,
    parse_listing,
    runtime_commands,
    same_shape,
)
from fwsafe.core.revert import compute_touched
from fwsafe.ondisk.firewalld_files import (
    FirewalldFilesError,
    is_firewalld_path,
    read_tree,
    restore_tree,
    tree_from_json,
    tree_json,
    without_tables,
)

ZONES = """\
block
  target: %%REJECT%%
  icmp-block-inversion: no
  interfaces: 
  sources: 
  services: 
  ports: 
  forward: yes
  masquerade: no
  forward-ports: 
  rich rules: 

public (default, active)
  target: default
  icmp-block-inversion: no
  interfaces: eth0 eth1
  sources: 10.0.0.0/8
  services: ssh dhcpv6-client
  ports: 8080/tcp
  forward: yes
  masquerade: yes
  forward-ports: 
\tport=80:proto=tcp:toport=8080:toaddr=
  rich rules: 
\trule family="ipv4" source address="10.9.0.0/16" accept
\trule family="ipv4" port port="9" protocol="tcp" drop
"""  # noqa: W291 - firewall-cmd's own trailing spaces


def test_listing_parsed_per_zone() -> None:
    zones = parse_listing(ZONES)
    assert set(zones) == {"block", "public"}
    public = zones["public"]
    assert public["services"] == ["dhcpv6-client", "ssh"]
    assert public["interfaces"] == ["eth0", "eth1"]
    assert public["masquerade"] == ["yes"]
    assert public["forward-ports"] == ["port=80:proto=tcp:toport=8080:toaddr="]
    assert public["rich rules"] == ['rule family="ipv4" port port="9" protocol="tcp" drop',
                                    'rule family="ipv4" source address="10.9.0.0/16" accept']
    assert zones["block"]["services"] == [] and zones["block"]["target"] == ["%%REJECT%%"]


def test_runtime_commands_turn_one_model_into_the_other() -> None:
    want = {"zones": parse_listing(ZONES),
            "direct": {"rules": ["ipv4 filter INPUT 0 -p tcp --dport 9 -j ACCEPT"],
                       "chains": [], "passthroughs": []}}
    now = json.loads(json.dumps(want))
    public = now["zones"]["public"]
    public["services"] = ["dhcpv6-client"]                    # ssh removed at runtime
    public["ports"] = ["8080/tcp", "9090/tcp"]                # a port added
    public["masquerade"] = ["no"]
    public["interfaces"] = ["eth0"]
    public["rich rules"] = []
    now["direct"]["rules"] = ["ipv4 filter INPUT 0 -p tcp --dport 10 -j DROP"]
    phases = runtime_commands(now, want)
    assert phases == [
        [["--zone=public", "--remove-port=9090/tcp"],
         ["--direct", "--remove-rule", "ipv4", "filter", "INPUT", "0", "-p", "tcp", "--dport",
          "10", "-j", "DROP"]],
        [["--zone=public", "--add-service=ssh"],
         ["--zone=public", '--add-rich-rule=rule family="ipv4" port port="9" protocol="tcp" '
                           'drop',
          '--add-rich-rule=rule family="ipv4" source address="10.9.0.0/16" accept'],
         ["--zone=public", "--change-interface=eth1"],
         ["--zone=public", "--add-masquerade"],
         ["--direct", "--add-rule", "ipv4", "filter", "INPUT", "0", "-p", "tcp", "--dport", "9",
          "-j", "ACCEPT"]],
    ]
    # a direct chain: its rules go before it, and come after it
    chain = "ipv4 filter mine"
    rule = "ipv4 filter mine 0 -j ACCEPT"
    with_chain = {"direct": {"chains": [chain], "rules": [rule], "passthroughs": []}}
    without = {"direct": {"chains": [], "rules": [], "passthroughs": []}}
    assert runtime_commands(with_chain, without) == [
        [["--direct", "--remove-rule", "ipv4", "filter", "mine", "0", "-j", "ACCEPT"]],
        [["--direct", "--remove-chain", "ipv4", "filter", "mine"]]]
    assert runtime_commands(without, with_chain) == [
        [["--direct", "--add-chain", "ipv4", "filter", "mine"]],
        [["--direct", "--add-rule", "ipv4", "filter", "mine", "0", "-j", "ACCEPT"]]]
    assert runtime_commands(want, want) == []


def _make_tree(root: Path) -> None:
    base = root / "etc/firewalld"
    (base / "zones").mkdir(parents=True)
    (base / "services").mkdir()
    os.chmod(base, 0o750)
    (base / "firewalld.conf").write_text("DefaultZone=public\n")
    (base / "zones/public.xml").write_text("<zone/>\n")
    os.chmod(base / "zones/public.xml", 0o600)
    os.chown(base / "zones/public.xml", 1, 2)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be set by root")
def test_tree_restored_byte_identically(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    dirs, files = read_tree(tmp_path)
    data = json.loads(json.dumps(tree_json(dirs, files)))
    base = tmp_path / "etc/firewalld"
    # what firewall-cmd --permanent and others do: rewrite, add files and directories,
    # change modes and owners, remove files
    (base / "zones/public.xml").write_text("<zone>changed</zone>\n")
    os.chown(base / "zones/public.xml", 0, 0)
    (base / "zones/public.xml.old").write_text("<zone/>\n")
    (base / "policies/x").mkdir(parents=True)
    (base / "policies/x/p.xml").write_text("<policy/>\n")
    os.chmod(base / "services", 0o700)
    (base / "firewalld.conf").unlink()
    restore_tree(*tree_from_json(data), root=tmp_path)
    assert read_tree(tmp_path) == (dirs, files)
    assert not (base / "policies").exists()
    st = os.stat(base / "zones/public.xml")
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1, 2)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners can only be set by root")
def test_a_file_turned_into_a_directory_is_a_file_again(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    dirs, files = read_tree(tmp_path)
    base = tmp_path / "etc/firewalld"
    (base / "zones/public.xml").unlink()
    (base / "zones/public.xml/x").mkdir(parents=True)
    (base / "zones/public.xml/x/y.xml").write_text("<zone/>\n")
    (base / "services").rmdir()   # and a directory turned into a file
    (base / "services").write_text("not a directory\n")
    restore_tree(dirs, files, root=tmp_path)
    assert read_tree(tmp_path) == (dirs, files)


def test_a_snapshot_cannot_write_outside_etc_firewalld() -> None:
    for path in ("/etc/passwd", "/etc/firewalld/../passwd", "/etc/firewalldx/a",
                 "/etc/firewalld//a", "/etc/firewalld/./a"):
        assert not is_firewalld_path(path), path
        with pytest.raises(FirewalldFilesError):
            tree_from_json({"files": {path: [0o644, 0, 0, ""]}})
    assert is_firewalld_path("/etc/firewalld/zones/public.xml")


def test_nft_layer_leaves_firewalld_tables_to_the_firewalld_layer() -> None:
    assert owned_elsewhere("nft", ["nft", "firewalld"]) == FIREWALLD_TABLES
    assert owned_elsewhere("nft", ["nft"]) == frozenset()
    before_nft = b"table inet firewalld {\n\tchain a {\n\t}\n}\ntable inet mine {\n}\n"
    after_nft = (b"table inet firewalld {\n\tchain a {\n\t\ttcp dport 22 reject\n\t}\n}\n"
                 b"table inet mine {\n\tchain b {\n\t}\n}\n")
    state = {"running": True, "runtime": {"default-zone": "public", "zones": {}, "policies": {},
                                          "direct": {}},
             "kernel": {}, "dirs": {}, "files": {}}
    fw = json.dumps(state).encode()
    touched = compute_touched({"nft": before_nft, "firewalld": fw},
                              {"nft": after_nft, "firewalld": fw})
    assert touched == {"nft": ["inet mine"]}
    touched = compute_touched({"nft": before_nft}, {"nft": after_nft})
    assert touched == {"nft": ["inet firewalld", "inet mine"]}


def test_units_of_a_snapshot() -> None:
    state = {"running": True, "kernel": {"inet firewalld": "table inet firewalld {\n}\n"},
             "runtime": {"default-zone": "public", "zones": parse_listing(ZONES),
                         "policies": {}, "direct": {"rules": [], "chains": [],
                                                    "passthroughs": []}},
             "dirs": {"/etc/firewalld/zones": [0o755, 0, 0]},
             "files": {"/etc/firewalld/firewalld.conf": [0o644, 0, 0, "eA=="]}}
    units = FirewalldLayer().units(json.dumps(state).encode())
    assert set(units) == {"file /etc/firewalld/firewalld.conf", "dir /etc/firewalld/zones",
                          "running", "default-zone", "zone block", "zone public", "direct",
                          "kernel"}
    stopped = FirewalldLayer().units(json.dumps({**state, "running": False,
                                                 "runtime": None}).encode())
    assert stopped["running"] == "no" and "zone public" not in stopped


def test_boot_file_leaves_firewalld_tables_out() -> None:
    text = (b"table inet firewalld {\n\tchain filter_INPUT {\n\t\taccept\n\t}\n}\n"
            b"table inet mine {\n\tchain input {\n\t}\n}\n"
            b"table ip firewalld {\n}\n")
    assert without_tables(text, FIREWALLD_TABLES) == b"table inet mine {\n\tchain input {\n\t}\n}\n"
    assert without_tables(text, frozenset()) == text


def _model(public: dict[str, list[str]], docker: dict[str, list[str]],
           rules: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"default-zone": "public", "zones": {"public": public, "docker": docker},
            "policies": {}, "direct": {"chains": [], "rules": list(rules), "passthroughs": []},
            "ipsets": {"banned": ["192.0.2.1"]}}


def test_merge_keeps_what_others_changed_during_the_window() -> None:
    before = _model({"services": ["ssh", "dhcpv6-client"], "masquerade": ["no"]},
                    {"interfaces": ["docker0"]})
    # the change: ssh removed
    after = _model({"services": ["dhcpv6-client"], "masquerade": ["no"]},
                   {"interfaces": ["docker0"]})
    # meanwhile others: Docker's new bridge, fail2ban's rich rule, a direct rule; someone
    # removed dhcpv6-client and turned masquerade on
    live = _model({"services": [], "masquerade": ["yes"],
                   "rich rules": ['rule family="ipv4" source address="192.0.2.9" reject']},
                  {"interfaces": ["br-1", "docker0"]},
                  ["ipv4 filter INPUT 0 -s 192.0.2.8 -j DROP"])
    live["ipsets"] = {"banned": ["192.0.2.1", "192.0.2.3"]}   # a ban added meanwhile
    merged, kept = merge_models(before, after, live)
    assert merged["ipsets"] == {"banned": ["192.0.2.1", "192.0.2.3"]}
    zones = merged["zones"]
    assert zones["public"]["services"] == ["ssh"]           # the change undone, theirs kept
    assert zones["public"]["masquerade"] == ["yes"]
    assert zones["public"]["rich rules"] == ['rule family="ipv4" source address="192.0.2.9" '
                                             'reject']
    assert zones["docker"]["interfaces"] == ["br-1", "docker0"]
    assert merged["direct"]["rules"] == ["ipv4 filter INPUT 0 -s 192.0.2.8 -j DROP"]
    assert "zone docker interfaces +br-1" in kept and "zone public services -dhcpv6-client" in kept
    # nobody else changed anything: the snapshot's model itself, nothing kept
    assert merge_models(before, after, after) == (before, [])
    # the runtime commands from the live model to the merged one: ssh back, nothing else
    assert runtime_commands(live, merged) == [[["--zone=public", "--add-service=ssh"]]]


def test_runtime_commands_alone_only_within_the_same_zones_and_default_zone() -> None:
    one = _model({"services": ["ssh"]}, {"interfaces": []})
    assert same_shape(one, _model({"services": []}, {"interfaces": ["docker0"]}))
    assert not same_shape(one, {**one, "default-zone": "docker"})
    assert not same_shape(one, {**one, "zones": {"public": {}}})


def test_ipsets_listing_and_commands() -> None:
    assert parse_ipsets("banned 192.0.2.9 192.0.2.1\nempty\n") == {
        "banned": ["192.0.2.1", "192.0.2.9"], "empty": []}
    now = {"ipsets": {"banned": ["192.0.2.1", "192.0.2.2"]}}
    want = {"ipsets": {"banned": ["192.0.2.2", "192.0.2.3"]}}
    assert runtime_commands(now, want) == [[["--ipset=banned", "--remove-entry=192.0.2.1"]],
                                           [["--ipset=banned", "--add-entry=192.0.2.3"]]]
    units = FirewalldLayer().units(json.dumps({"running": True, "runtime": want}).encode())
    assert units["ipset banned"] == "192.0.2.2 192.0.2.3"


def test_panic_mode_off_first_and_on_last() -> None:
    on = {"panic": "yes", "zones": {"public": {"services": []}}}
    off = {"panic": "no", "zones": {"public": {"services": ["ssh"]}}}
    assert runtime_commands(on, off) == [[["--panic-off"]],
                                         [["--zone=public", "--add-service=ssh"]]]
    assert runtime_commands(off, on) == [[["--zone=public", "--remove-service=ssh"]],
                                         [["--panic-on"]]]
    assert runtime_commands({"zones": {}}, off) == []   # a model read without panic mode


def test_a_rule_put_into_firewalld_tables_behind_its_back_is_not_taken_as_reverted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The change is only in firewalld's kernel tables (`nft add rule inet firewalld ...`),
    and another program changed the runtime model meanwhile (fail2ban's ipset entry): the
    merged model differs from the snapshot, so the tables are not compared whole with it,
    but the change's own line must still be gone (the review's finding: it stayed live and
    the revert said the delta was gone). Then the next level (a reload) takes it out."""
    import fwsafe.backends.firewalld_layer as layer_module
    from fwsafe.backends import firewalld_client

    def model(ipset: list[str]) -> dict[str, Any]:
        return {"default-zone": "public", "zones": {"public": {"services": ["ssh"]}},
                "policies": {}, "ipsets": {"f2b": ipset}, "direct": {}, "panic": "no"}

    layer = FirewalldLayer()
    monkeypatch.setattr(layer_module, "read_tree", lambda _root: ({}, {}))
    kernel = {"inet firewalld": "table inet firewalld {\n chain filter_INPUT {\n"
                                "  tcp dport 22 accept\n }\n}"}
    monkeypatch.setattr(layer_module, "kernel_tables", lambda: dict(kernel))
    before = layer._capture(model([]))   # noqa: SLF001
    kernel["inet firewalld"] = kernel["inet firewalld"].replace(
        "tcp dport 22 accept", "tcp dport 22 accept\n  tcp dport 443 drop")
    after = layer._capture(model([]))   # noqa: SLF001
    assert layer.touched(before, after) == ["kernel"]
    monkeypatch.setattr(layer_module, "read_model", lambda: model(["192.0.2.9"]))
    monkeypatch.setattr(layer_module, "is_running", lambda: True)

    def no_command(*argv: str, **_kw: Any) -> None:
        raise AssertionError(f"no firewall-cmd expected in place: {argv}")

    monkeypatch.setattr(layer_module, "firewall_cmd", no_command)
    monkeypatch.setattr(firewalld_client, "firewall_cmd", no_command)   # run_all's
    assert layer.revert(before, after, ["kernel"], level=MERGE) == ["firewalld kernel"]
    # once the rule is gone (firewalld's reload regenerates its tables), the delta is gone
    # although the table is not the snapshot's (the kept ipset entry)
    kernel["inet firewalld"] = kernel["inet firewalld"].replace("\n  tcp dport 443 drop", "")
    assert layer.revert(before, after, ["kernel"], level=MERGE) == []


def test_the_changes_own_kernel_delta_counts_set_elements_one_by_one() -> None:
    """An element the change removed and the revert put back is back even where another
    program added its own to the same set (nft prints them on one line, or several)."""
    from fwsafe.backends.firewalld_model import kernel_delta_left

    def state(elements: str) -> dict[str, Any]:
        return {"kernel": {"inet firewalld": "table inet firewalld {\n set f2b {\n"
                                             "  type ipv4_addr\n" + elements + " }\n}"}}

    before = state("  elements = { 10.0.0.1 }\n")
    after = state("")                                   # the change's reload lost it
    back = state("  elements = { 10.0.0.1,\n               192.0.2.9 }\n")  # + another's
    assert kernel_delta_left(before, after, back) == []
    assert kernel_delta_left(before, after, state("  elements = { 192.0.2.9 }\n")) == [
        "removed inet firewalld / set f2b / element 10.0.0.1"]


@pytest.mark.parametrize("active", [True, False])
def test_a_stopped_firewalld_is_started_not_reloaded(monkeypatch: pytest.MonkeyPatch,
                                                     active: bool) -> None:
    """The revert's way back to firewalld's model: reloaded when it runs; started when it is
    stopped (it reads the files put back), without a `--reload` tried first (that failed, a
    second wasted on a small host) or after the start (one more flush of Docker's chains)."""
    import fwsafe.backends.firewalld_layer as layer_module
    calls: list[str] = []
    monkeypatch.setattr(layer_module, "unit_active", lambda: active)
    monkeypatch.setattr(layer_module, "is_running", lambda: active)
    monkeypatch.setattr(layer_module, "booting", lambda: False)
    monkeypatch.setattr(layer_module, "ensure_running", lambda _say: calls.append("start"))
    monkeypatch.setattr(layer_module, "settle_after_reload", lambda: "quiet")
    monkeypatch.setattr(layer_module, "read_model", lambda: {"zones": {}})
    monkeypatch.setattr(layer_module, "put_back", lambda now, want, say: dict(now))

    def firewall_cmd(*argv: str, **_kw: Any) -> tuple[int, str, str]:
        calls.append(" ".join(argv))
        return 0, "success", ""

    monkeypatch.setattr(layer_module, "firewall_cmd", firewall_cmd)
    layer = FirewalldLayer()
    said: list[str] = []
    booted, now = layer._reload_and_put_back({"zones": {}}, said.append)  # noqa: SLF001
    assert booted and now == {"zones": {}}
    assert calls == (["--reload"] if active else ["start"]), calls
