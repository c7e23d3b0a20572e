"""firewalld 2.x (Debian 13's 2.3.1, nftables backend) as its tools print it: outputs captured in
the systemd lab's trixie container (tests/unit/data/firewalld-2.3.1/, with the runtime-only
state of tests/lab/test_firewalld.py's runtime case: a port, a rich rule, a source in trusted,
masquerade, a forward port, direct rules and a chain, an ipset entry). What differs from 1.3:
zones list `ingress-priority`/`egress-priority`, policies `priority`; `--list-all-zones`
marks the default and active zones, `--list-all-policies` the active policies; and firewalld's
table is owned (`flags owner,persist`, NftablesTableOwner=yes): only firewalld may write
there, so the kernel escape hatch cannot be put in it (nft refuses the whole transaction)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fwsafe.backends.firewalld_model import parse_listing, runtime_commands
from fwsafe.guard import hatch, hatch_bridge, hatch_chains, hatch_change, hatch_spec, hatch_sync

DATA = Path(__file__).parent / "data" / "firewalld-2.3.1"
SPEC = hatch_spec.Spec("20261207T063000Z-abcd", 1796625083, ("10.232.2.2",), (), (22,))


def captured(name: str) -> str:
    return (DATA / name).read_text()


def test_the_capture_is_firewalld_2() -> None:
    assert captured("version.txt").strip() == "2.3.1"
    assert captured("nft-list-tables.txt").splitlines() == ["table inet firewalld",
                                                            "table ip filter"]


def test_zones_of_firewalld_2_parsed_with_their_priorities() -> None:
    zones = parse_listing(captured("list-all-zones.txt"))
    assert set(zones) == {"block", "dmz", "drop", "external", "home", "internal", "public",
                          "trusted", "work"}   # "public (default, active)": the name alone
    public = zones["public"]
    assert public["ingress-priority"] == ["0"] and public["egress-priority"] == ["0"]
    assert public["services"] == ["dhcpv6-client", "ssh"]
    assert public["ports"] == ["7000/tcp"]
    assert public["masquerade"] == ["yes"]
    assert public["forward-ports"] == ["port=8081:proto=tcp:toport=22:toaddr="]
    assert public["rich rules"] == [
        'rule family="ipv4" source address="198.51.100.0/24" port port="7001" protocol="tcp" '
        'accept']
    assert zones["trusted"]["sources"] == ["192.0.2.0/24"]
    assert zones["block"]["target"] == ["%%REJECT%%"]


def test_policies_of_firewalld_2_parsed() -> None:
    policies = parse_listing(captured("list-all-policies.txt"))
    assert list(policies) == ["allow-host-ipv6"]   # "allow-host-ipv6 (active)"
    policy = policies["allow-host-ipv6"]
    assert policy["priority"] == ["-15000"]
    assert policy["ingress-zones"] == ["ANY"] and policy["egress-zones"] == ["HOST"]
    assert len(policy["rich rules"]) == 4


def model(zones: str) -> dict[str, Any]:
    return {"zones": parse_listing(captured(zones)),
            "policies": parse_listing(captured("list-all-policies.txt")),
            "default": "public"}


def test_runtime_commands_between_two_firewalld_2_models() -> None:
    """`--remove-service=ssh` undone: one command; the priorities (set only in the permanent
    configuration) are no runtime difference and give no command."""
    before, after = model("list-all-zones.txt"), model("list-all-zones-without-ssh.txt")
    assert after["zones"]["public"]["services"] == ["dhcpv6-client"]
    assert runtime_commands(after, before) == [[["--zone=public", "--add-service=ssh"]]]
    assert runtime_commands(before, before) == []
    higher = model("list-all-zones.txt")
    higher["zones"]["public"]["ingress-priority"] = ["-10"]
    assert runtime_commands(higher, before) == []


def test_firewalld_2s_table_is_owned_and_gets_no_hatch() -> None:
    listing = captured("nft-a-list-table-inet-firewalld.txt")
    chains = hatch_chains.parse_nft(listing)
    assert chains and all(c.owned for c in chains)
    base = {c.name: c.hook for c in chains if c.hook}
    assert base["filter_INPUT"] == "input" and base["filter_PREROUTING"] == "prerouting"
    assert hatch_sync.plan_layer("nft", chains, SPEC) == ""       # nothing nft would refuse
    # the same table without `flags owner` (firewalld 1.x, or NftablesTableOwner=no): in it
    unowned = hatch_chains.parse_nft(listing.replace("\tflags owner,persist\n", ""))
    assert not any(c.owned for c in unowned)
    planned = hatch_sync.plan_layer("nft", unowned, SPEC)
    assert "insert rule inet firewalld filter_INPUT ip saddr { 10.232.2.2 }" in planned
    # an nft file applied beside it: the hatch goes into the file's chains, not firewalld's
    script = (b"table inet mine {\n\tchain input {\n\t\ttype filter hook input priority 0; "
              b"policy accept;\n\t\ttcp dport 23 drop\n\t}\n}\n")
    loaded = hatch_change.with_nft_change(script, SPEC, listing.encode()).decode()
    assert "insert rule inet mine input " in loaded
    assert "inet firewalld" not in loaded


def test_the_hatch_says_it_cannot_open_ssh_through_an_owned_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a device for the lo bridge (no Ethernet device up), an owned table stands."""
    chains = hatch_chains.parse_nft(captured("nft-a-list-table-inet-firewalld.txt"))
    monkeypatch.setattr(hatch_sync, "read_chains", lambda _layer, _proved=None: chains)
    monkeypatch.setattr(hatch_sync, "bridge_devices", lambda: [])
    monkeypatch.setattr(hatch_sync, "read_bridge", lambda: None)
    state = hatch_sync.sync_layer("nft", SPEC)
    assert state.startswith("none; not in inet firewalld (owned by the program"), state
    assert hatch_sync.sync_layer("nft", None) == "removed"   # removal: nothing of it to find there
    info = {"state": "armed", "opens": SPEC.opens, "grace": 30, "sources4": ["10.232.2.2"],
            "sources6": [], "ports": [22], "layers": {"ipv4": "loaded", "nft": state}}
    text = hatch.describe(info) or ""
    assert "in ipv4" in text and "NOT loaded" not in text
    assert "CANNOT open SSH through inet firewalld" in text
    assert "CANNOT" not in (hatch.describe({**info, "state": "removed"}) or "")


def test_past_an_owned_table_the_hatch_loops_ssh_through_lo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """firewalld 2.x's owned table: the lo bridge, one ingress chain per Ethernet device,
    loaded in the same nft transaction, read back, then removed with the hatch. (The kernel's
    side, a NEW SSH login with the guard frozen: tests/lab/test_firewalld.py.)"""
    chains = hatch_chains.parse_nft(captured("nft-a-list-table-inet-firewalld.txt"))
    monkeypatch.setattr(hatch_sync, "read_chains", lambda _layer, _proved=None: chains)
    monkeypatch.setattr(hatch_sync, "bridge_devices", lambda: ["host0", "eth1"])
    monkeypatch.setattr(hatch_sync, "strict_rp_filter", lambda: False)
    loaded: dict[str, list[str]] | None = None
    scripts: list[str] = []

    def nft(argv: list[str], payload: bytes | None = None) -> tuple[int, str, str]:
        nonlocal loaded
        assert argv == ["nft", "-f", "-"], argv
        script = (payload or b"").decode()
        scripts.append(script)
        if script.startswith("delete table netdev fwsafe_hatch"):
            loaded = None
        else:   # what nft lists back: one chain per device, the rules with their tag
            rules = sorted({line.strip() for line in script.splitlines() if "fwd to" in line})
            loaded = {"host0": rules, "eth1": rules}
        return 0, "", ""

    monkeypatch.setattr(hatch_sync, "_run", nft)
    monkeypatch.setattr(hatch_sync, "read_bridge", lambda: loaded)
    state = hatch_sync.sync_layer("nft", SPEC)
    assert state == "loaded; through lo past inet firewalld", state
    script = scripts[0]
    assert "inet firewalld" not in script              # nothing nft would refuse
    assert script.startswith("table netdev fwsafe_hatch\ndelete table netdev fwsafe_hatch\n")
    assert 'type filter hook ingress device "host0" priority -500; policy accept;' in script
    assert 'type filter hook ingress device "eth1" priority -500; policy accept;' in script
    assert (f"ip saddr {{ 10.232.2.2 }} tcp dport {{ 22 }} meta time >= {SPEC.opens} "
            f'fib daddr type local ether daddr set 00:00:00:00:00:00 fwd to "lo" '
            f'comment "{SPEC.tag}"') in script
    assert hatch_sync.sync_layer("nft", SPEC) == state and len(scripts) == 1   # in place: no load
    info = {"state": "armed", "opens": SPEC.opens, "grace": 30, "sources4": ["10.232.2.2"],
            "sources6": [], "ports": [22], "layers": {"nft": state}}
    text = hatch.describe(info) or ""
    assert "loops SSH through lo" in text and "CANNOT" not in text, text
    moved = SPEC.moved(SPEC.opens + 60)                 # extend: the bridge made again
    hatch_sync.sync_layer("nft", moved)
    assert f"meta time >= {moved.opens} " in scripts[-1]
    assert hatch_sync.sync_layer("nft", None) == "removed"   # removal: the whole table goes
    assert scripts[-1] == "delete table netdev fwsafe_hatch\n" and loaded is None


def test_the_lo_bridge_is_nobodys_rule() -> None:
    """Captures never see the bridge's table (nor its rules), like the hatch's own rules."""
    from fwsafe.ondisk import hatch_rules
    listing = (b"table inet mine {\n\tchain input {\n\t\ttcp dport 22 accept\n\t}\n}\n"
               b"table netdev fwsafe_hatch { # handle 9\n\tchain ingress0 { # handle 1\n"
               b'\t\ttype filter hook ingress device "host0" priority -500; policy accept;\n'
               b'\t\tip saddr 10.232.2.2 tcp dport 22 fwd to "lo" comment "fwsafe-hatch:t:1:a"'
               b"\n\t}\n}\ntable inet other {\n}\n")
    assert hatch_rules.strip(listing) == (b"table inet mine {\n\tchain input {\n\t\ttcp "
                                          b"dport 22 accept\n\t}\n}\ntable inet other {\n}\n")
    assert hatch_rules.is_bridge("netdev", "fwsafe_hatch")
    assert not hatch_rules.is_bridge("inet", "fwsafe_hatch")


def test_bridge_devices_and_rp_filter_from_sys(tmp_path: Path) -> None:
    for name, kind, flags in (("lo", 772, "0x9"), ("host0", 1, "0x1003"), ("wg0", 65534, "0x91"),
                              ("eth1", 1, "0x1002")):   # eth1: down
        (tmp_path / name).mkdir()
        (tmp_path / name / "type").write_text(f"{kind}\n")
        (tmp_path / name / "flags").write_text(f"{flags}\n")
    assert hatch_bridge.bridge_devices(str(tmp_path)) == ["host0"]
    conf = tmp_path / "conf"
    for name, value in (("all", 0), ("lo", 2)):
        (conf / name).mkdir(parents=True)
        (conf / name / "rp_filter").write_text(f"{value}\n")
    assert not hatch_bridge.strict_rp_filter(str(conf))
    (conf / "all" / "rp_filter").write_text("1\n")   # the larger of the two counts: loose
    assert not hatch_bridge.strict_rp_filter(str(conf))
    (conf / "lo" / "rp_filter").write_text("0\n")
    assert hatch_bridge.strict_rp_filter(str(conf))


def test_the_lo_bridge_leaves_ipv4_out_with_strict_rp_filter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Strict reverse-path filtering for lo drops what the bridge loops: its IPv4 rule would
    cut every IPv4 SSH packet of the admin from the moment on, so it is left out (IPv6 stays),
    and the state says so; with only IPv4 sources there is no bridge, and status says the
    owned table stands."""
    chains = hatch_chains.parse_nft(captured("nft-a-list-table-inet-firewalld.txt"))
    monkeypatch.setattr(hatch_sync, "read_chains", lambda _layer, _proved=None: chains)
    monkeypatch.setattr(hatch_sync, "bridge_devices", lambda: ["host0"])
    monkeypatch.setattr(hatch_sync, "strict_rp_filter", lambda: True)
    monkeypatch.setattr(hatch_sync, "read_bridge", lambda: None)
    scripts: list[str] = []

    def nft(argv: list[str], payload: bytes | None = None) -> tuple[int, str, str]:
        scripts.append((payload or b"").decode())
        return 0, "", ""

    monkeypatch.setattr(hatch_sync, "_run", nft)
    both = hatch_spec.Spec(SPEC.tx, SPEC.opens, ("10.232.2.2",), ("fd00::2",), (22,))
    rules = hatch_spec.bridge_rules(both, ipv4=False)
    assert len(rules) == 1 and rules[0].startswith("ip6 saddr { fd00::2 }"), rules
    with pytest.raises(hatch_sync.HatchError):   # (read back: none, the stub loads nothing)
        hatch_sync.sync_layer("nft", both)
    assert scripts and all("ip saddr" not in s and "ip6 saddr { fd00::2 }" in s
                           for s in scripts), scripts
    assert hatch_sync.sync_layer("nft", SPEC) == (   # IPv4 sources only: no bridge at all
        "none; not in inet firewalld (" + hatch_chains.OWNED + ")")


def test_a_refused_lo_bridge_does_not_take_the_hatch_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """nft refuses the bridge (no nft_fwd_netdev, a device gone): the hatch in the tables that
    take it is loaded without it, and the owned table is said to stand."""
    listing = captured("nft-a-list-table-inet-firewalld.txt") + (
        "table inet mine { # handle 99\n\tchain input { # handle 1\n\t\ttype filter hook "
        "input priority filter; policy accept;\n\t\ttcp dport 23 drop # handle 2\n\t}\n}\n")
    loaded: list[str] = []
    monkeypatch.setattr(hatch_sync, "read_chains", lambda _layer, _proved=None: hatch_chains.parse_nft(
        listing.replace("tcp dport 23 drop", "\n\t\t".join([*loaded, "tcp dport 23 drop"]))))
    monkeypatch.setattr(hatch_sync, "bridge_devices", lambda: ["host0"])
    monkeypatch.setattr(hatch_sync, "strict_rp_filter", lambda: False)
    monkeypatch.setattr(hatch_sync, "read_bridge", lambda: None)
    said: list[str] = []

    def nft(argv: list[str], payload: bytes | None = None) -> tuple[int, str, str]:
        script = (payload or b"").decode()
        if "fwd to" in script:
            return 1, "", "Error: Could not process rule: No such file or directory"
        loaded.extend(line.split(" input ", 1)[1] for line in script.splitlines()
                      if line.startswith("insert rule inet mine input "))
        return 0, "", ""

    monkeypatch.setattr(hatch_sync, "_run", nft)
    state = hatch_sync.sync_layer("nft", SPEC, said.append)
    assert state == "loaded; not in inet firewalld (" + hatch_chains.OWNED + ")", state
    assert loaded and SPEC.tag in loaded[0]
    assert any("refused the lo bridge" in line for line in said), said


def test_a_lo_bridge_left_behind_is_seen_as_a_hatch_to_remove(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The nft layer never lists the bridge's table, and seeing it says a hatch is loaded, so
    that `fwsafe apply` removes one left behind first (as the rules `strip` finds)."""
    from fwsafe.backends import nftables
    from fwsafe.context import RUN
    monkeypatch.setattr(nftables, "kernel_tables",
                        lambda: [("inet", "mine"), ("netdev", "fwsafe_hatch")])
    monkeypatch.setattr(RUN, "hatch_seen", False)
    assert nftables.NftLayer().native_tables() == [("inet", "mine")]
    assert RUN.hatch_seen
