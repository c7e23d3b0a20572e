"""The iptables layers' facts, light to import (no backend code, standard library only): for
each layer name ("ipv4", "ipv6", "ipv4-legacy", "ipv6-legacy"), its save and restore tools,
its nf_tables family, its IP version and its label. The registry (fwsafe.backends) tells an
iptables layer by its name being here; the iptables backend (fwsafe.backends.iptables), the
fidelity test and the sandbox's loader read the rest from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    layer: str
    save: str
    restore: str
    nft_family: str
    label: str
    legacy: bool

    @property
    def ip_version(self) -> int:
        """4 or 6: the IP version whose packets this layer filters."""
        return 6 if self.nft_family == "ip6" else 4


FAMILIES = {
    "ipv4": Family("ipv4", "iptables-save", "iptables-restore", "ip", "IPv4", False),
    "ipv6": Family("ipv6", "ip6tables-save", "ip6tables-restore", "ip6", "IPv6", False),
    "ipv4-legacy": Family("ipv4-legacy", "iptables-legacy-save", "iptables-legacy-restore",
                          "ip", "IPv4 (legacy)", True),
    "ipv6-legacy": Family("ipv6-legacy", "ip6tables-legacy-save", "ip6tables-legacy-restore",
                          "ip6", "IPv6 (legacy)", True),
}
