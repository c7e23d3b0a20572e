"""The other programs that write firewall rules on the same host, and what a change must not
silently delete of theirs.

A full rules file replaces the tables it names: a chain that fail2ban, Docker or kube-proxy
created there since the file was written would be deleted with every ban, published port or
service in it. `apply` refuses such a file (exit 3) unless `--force`, and suggests `--partial`
(replace only the chains the file names). The list of who owns what lives here alone.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fwsafe.backends import NFT_TABLES, RULES_FILE, layer_for, layer_has, layers_with

# (owner, patterns of iptables chain names, patterns of native nft tables "family name")
OWNERS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("fail2ban", ("f2b-*", "fail2ban-*"), ("* f2b-table", "* fail2ban*")),
    ("Docker", ("DOCKER", "DOCKER-*"), ()),
    ("kube-proxy / Kubernetes", ("KUBE-*",), ("* kube-proxy", "* kubernetes")),
    ("ufw", ("ufw-*", "ufw6-*"), ()),
    ("firewalld", ("*_direct", "*_ZONES", "*_ZONES_SOURCE"), ("* firewalld",)),
    ("CrowdSec", ("CROWDSEC*", "crowdsec*"), ("* crowdsec", "* crowdsec6")),
    ("Calico", ("cali-*",), ("* calico*",)),
    ("Cilium", ("CILIUM_*",), ("* cilium*",)),
    ("libvirt", ("LIBVIRT_*",), ("* libvirt*",)),
    ("Tailscale", ("ts-*",), ("* tailscale*",)),
    ("Podman / netavark / CNI", ("NETAVARK-*", "CNI-*"), ("* netavark",)),
    ("sshguard", ("sshguard",), ("* sshguard",)),
)


@dataclass(frozen=True)
class Neighbour:
    owner: str
    layer: str
    unit: str        # "filter/f2b-sshd" or "inet f2b-table"

    def describe(self) -> str:
        return f"{self.unit} ({self.owner})"


def owner_of_chain(chain: str) -> str | None:
    for owner, chains, _tables in OWNERS:
        if any(fnmatch.fnmatchcase(chain, p) for p in chains):
            return owner
    return None


def owner_of_table(family_name: str) -> str | None:
    for owner, _chains, tables in OWNERS:
        if any(fnmatch.fnmatchcase(family_name, p) for p in tables):
            return owner
    return None


def deleted_by_iptables_file(layer: str, live: bytes, change: bytes) -> list[Neighbour]:
    """Neighbours' chains that exist live in a table the file replaces, and that the file does
    not declare: iptables-restore would delete them."""
    tables = layer_for(layer)
    now = tables.declared(live)
    found = []
    for name, chains in tables.declared(change).items():
        for chain in sorted(now.get(name, ())):
            owner = owner_of_chain(chain)
            if owner and chain not in chains:
                found.append(Neighbour(owner, layer, f"{name}/{chain}"))
    return found


_FLUSH_RULESET = re.compile(r"^\s*flush\s+ruleset\b", re.M)
_DELETE_TABLE = re.compile(r"^\s*(?:delete|flush|destroy)\s+table\s+(\S+)\s+(\S+)", re.M)


def deleted_by_nft_file(layer: str, live: Mapping[str, bytes], change: bytes
                        ) -> list[Neighbour]:
    """Neighbours' tables (native nft, and chains in iptables-nft tables) that an nft file of
    layer `layer` (an NFT_TABLES one) deletes: every one with `flush ruleset`, the named ones
    with `delete/flush table`."""
    text = change.decode(errors="replace")
    flush_all = bool(_FLUSH_RULESET.search(text))
    named = {f"{m.group(1)} {m.group(2)}" for m in _DELETE_TABLE.finditer(text)}
    found = []
    for unit in layer_for(layer).units(live.get(layer, b"")):
        owner = owner_of_table(unit)
        if owner and (flush_all or unit in named):
            found.append(Neighbour(owner, layer, unit))
    if flush_all:  # `flush ruleset` also wipes the tables iptables-nft keeps
        for layer in layers_with(RULES_FILE):
            for name, chains in layer_for(layer).declared(live.get(layer, b"")).items():
                for chain in sorted(chains):
                    owner = owner_of_chain(chain)
                    if owner:
                        found.append(Neighbour(owner, layer, f"{name}/{chain}"))
    return found


def deleted_neighbours(change_layers: Mapping[str, bytes], live: Mapping[str, bytes],
                       partial: bool) -> list[Neighbour]:
    """What of other managers' rules applying these files would delete ([] = nothing)."""
    if partial:
        return []
    found: list[Neighbour] = []
    for layer, content in change_layers.items():
        if layer_has(layer, NFT_TABLES):
            found += deleted_by_nft_file(layer, live, content)
        elif layer in live:
            found += deleted_by_iptables_file(layer, live[layer], content)
    return found


def refusal_message(found: list[Neighbour]) -> str:
    owners = sorted({n.owner for n in found})
    units = ", ".join(n.describe() for n in found[:8]) + (
        f" and {len(found) - 8} more" if len(found) > 8 else "")
    return (f"the rules file would delete what {' and '.join(owners)} created since it was "
            f"written: {units}")
