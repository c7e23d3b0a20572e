"""Which boot files a system uses (under a fake root), and writing them on confirm."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fwsafe.ondisk import boot
from fwsafe.persistence import bootfiles as persist

V4 = b"*filter\n:INPUT DROP [3:4]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
V6 = b"*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
NFT = (
    b"table inet fw {\n\tchain input {\n"
    b"\t\ttype filter hook input priority filter; policy drop;\n"
    b"\t\ttcp dport 22 counter packets 5 bytes 300 accept\n\t}\n}\n"
)
DEBIAN_NFT_CONF = (
    "#!/usr/sbin/nft -f\n"
    "\n"
    "flush ruleset\n"
    "\n"
    "table inet filter {\n"
    "\tchain input {\n"
    "\t\ttype filter hook input priority filter;\n"
    "\t}\n"
    "}\n"
)


def touch(root: Path, path: str, text: str = "") -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.mark.parametrize("files,expected", [
    ({}, []),
    ({"/etc/iptables/rules.v4": "*filter\nCOMMIT\n"}, ["ipv4", "ipv6"]),
    ({"/etc/iptables/rules.v6": ""}, ["ipv4", "ipv6"]),
    ({"/usr/sbin/netfilter-persistent": "#!/bin/sh\n"}, ["ipv4", "ipv6"]),
    ({"/etc/nftables.conf": DEBIAN_NFT_CONF}, ["nft"]),
    ({"/etc/nftables.conf": "#!/usr/sbin/nft -f\nflush ruleset\n"}, []),
    ({"/etc/nftables.conf": "#!/usr/sbin/nft -f\n# fwsafe: known-good state X\n"}, ["nft"]),
    ({"/etc/nftables.conf": "flush ruleset\n",
      "/etc/systemd/system/sysinit.target.wants/nftables.service": None}, ["nft"]),
    ({"/etc/iptables/rules.v4": "", "/etc/nftables.conf": DEBIAN_NFT_CONF}, ["ipv4", "ipv6", "nft"]),
])
def test_detection_under_a_fake_root(tmp_path: Path, files: dict[str, str | None],
                                     expected: list[str]) -> None:
    for path, text in files.items():
        if text is None:
            link = tmp_path / path.lstrip("/")
            link.parent.mkdir(parents=True)
            os.symlink("/lib/systemd/system/nftables.service", link)
        else:
            touch(tmp_path, path, text)
    assert boot.boot_targets(tmp_path) == expected
    assert persist.targets_for_mode("auto", tmp_path) == expected


def test_explicit_modes() -> None:
    assert persist.targets_for_mode("netfilter-persistent") == ["ipv4", "ipv6"]
    assert persist.targets_for_mode("nftables") == ["nft"]
    assert persist.targets_for_mode("none") == []
    with pytest.raises(ValueError):
        persist.targets_for_mode("bogus")


def test_writes_rules_keeping_mode_and_owner(tmp_path: Path) -> None:
    v4 = touch(tmp_path, "/etc/iptables/rules.v4", "old\n")
    v4.chmod(0o600)
    os.chown(v4, 0, 4)
    result = persist.persist_layers({"ipv4": V4, "ipv6": V6}, entry_id="E1", root=tmp_path)
    assert result.written == ["/etc/iptables/rules.v4", "/etc/iptables/rules.v6"]
    assert v4.read_bytes() == boot.boot_file_content("ipv4", V4, "E1")
    assert b"[0:0]" in v4.read_bytes() and b"[3:4]" not in v4.read_bytes()
    st = v4.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 4)
    v6 = tmp_path / "etc/iptables/rules.v6"
    assert stat.S_IMODE(v6.stat().st_mode) == 0o640          # a new file: Debian's mode
    again = persist.persist_layers({"ipv4": V4, "ipv6": V6}, entry_id="E1", root=tmp_path)
    assert again.written == [] and len(again.unchanged) == 2
    assert sorted(p.name for p in v4.parent.iterdir()) == ["rules.v4", "rules.v6"]


def test_nftables_conf_flushes_unless_iptables_are_persisted_too(tmp_path: Path) -> None:
    touch(tmp_path, "/etc/nftables.conf", DEBIAN_NFT_CONF)
    persist.persist_layers({"nft": NFT, "ipv4": V4}, entry_id="E2", root=tmp_path)
    text = (tmp_path / "etc/nftables.conf").read_text()
    assert text.startswith("#!/usr/sbin/nft -f\n") and "flush ruleset\n" in text
    assert "counter packets 0 bytes 0" in text and "table inet fw {" in text
    assert stat.S_IMODE((tmp_path / "etc/nftables.conf").stat().st_mode) == 0o644
    touch(tmp_path, "/etc/iptables/rules.v4", "")
    persist.persist_layers({"nft": NFT, "ipv4": V4, "ipv6": V6}, entry_id="E3", root=tmp_path)
    text = (tmp_path / "etc/nftables.conf").read_text()
    assert "flush ruleset" not in text
    assert "add table inet fw\ndelete table inet fw\n" in text


def test_mode_none_and_missing_layers(tmp_path: Path) -> None:
    touch(tmp_path, "/etc/iptables/rules.v4", "old\n")
    assert persist.persist_layers({"ipv4": V4}, mode="none", entry_id="E", root=tmp_path).written == []
    result = persist.persist_layers({"ipv4": V4}, entry_id="E", root=tmp_path)
    assert result.written == ["/etc/iptables/rules.v4"]
    assert "ipv6 layer was not captured" in result.describe()


def test_netns_state_is_never_own_here_inside_a_named_netns() -> None:
    # In this process: "own" or "unknown" (PID 1's namespace may be unreadable), never a crash.
    assert persist.netns_state() in ("own", "unknown", "foreign")
