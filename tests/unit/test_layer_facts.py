"""The registry's layer facts that replaced dicts and `layer == "nft"` branches elsewhere
(fwsafe.backends: `restore_command`, `NFT_TABLES`, `owned_elsewhere`; the iptables layers'
table, fwsafe.backends.families): what the sandbox loads a capture with, which layer is the
native nft one, which IP version an iptables layer filters."""

from __future__ import annotations

from fwsafe.backends import (
    ALL_LAYERS,
    FIREWALLD_TABLES,
    IPTABLES_SAVE,
    NFT_TABLES,
    layer_for,
    layer_has,
    layers_with,
    owned_elsewhere,
    restore_command,
)
from fwsafe.backends.families import FAMILIES


def test_the_sandbox_loads_the_netfilter_layers_with_their_own_restore() -> None:
    assert {name: restore_command(name) for name in ALL_LAYERS if restore_command(name)} == {
        "ipv4": ("iptables-restore",),
        "ipv6": ("ip6tables-restore",),
        "ipv4-legacy": ("iptables-legacy-restore",),
        "ipv6-legacy": ("ip6tables-legacy-restore",),
        "nft": ("nft", "-f", "-"),
    }
    # files layers are not loaded by a command; a path-carrying or unknown name loads nothing
    assert restore_command("ufw") == restore_command("firewalld") == ()
    assert restore_command("sshd:%2Fsrv%2Fsshd_config") == restore_command("bogus") == ()


def test_the_iptables_layers_are_the_families_and_nft_tables_is_the_native_layer() -> None:
    assert set(FAMILIES) == set(layers_with(IPTABLES_SAVE))
    assert all(type(layer_for(name)).__name__ == "IptablesLayer" for name in FAMILIES)
    assert layers_with(NFT_TABLES) == ("nft",)
    assert not any(layer_has(name, NFT_TABLES) for name in FAMILIES)
    assert [FAMILIES[n].ip_version for n in ("ipv4", "ipv6", "ipv4-legacy", "ipv6-legacy")] \
        == [4, 6, 4, 6]


def test_firewalld_owns_its_tables_in_the_nft_layer_only() -> None:
    assert owned_elsewhere("nft", ["nft", "firewalld"]) == FIREWALLD_TABLES
    assert owned_elsewhere("nft", ["nft", "ipv4"]) == frozenset()
    assert owned_elsewhere("ipv4", ["ipv4", "firewalld"]) == frozenset()
