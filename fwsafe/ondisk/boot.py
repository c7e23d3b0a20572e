"""The files a system loads its firewall from at boot: which ones it uses, and their content.

Standard library only, Python 3.9+: the rescue zipapp carries this module. The same function
(`boot_file_content`) writes a boot file on confirm (fwsafe.persistence.bootfiles) and in a
rescue (fwsafe.rescue.tool), so that both give the same bytes for the same state:

* netfilter-persistent: ipv4 -> ``/etc/iptables/rules.v4``, ipv6 -> ``/etc/iptables/rules.v6``;
* nftables: nft -> ``/etc/nftables.conf``;
* ufw: ufw's own files (fwsafe.ondisk.ufw_files).

All paths are server paths; `root` maps them onto a mounted disk (``root=/mnt``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fwsafe.ondisk.atomic_files import local_path
from fwsafe.ondisk.history_format import nft_tables, normalize_layer
from fwsafe.ondisk.ufw_files import UFW_DIR

# The files the system loads at boot, per layer (server paths).
BOOT_FILES = {
    "ipv4": "/etc/iptables/rules.v4",
    "ipv6": "/etc/iptables/rules.v6",
    "nft": "/etc/nftables.conf",
}
NETFILTER_PERSISTENT = ("/usr/sbin/netfilter-persistent", "/sbin/netfilter-persistent")
NFT_SERVICE = "nftables.service"
BOOT_FILE_MODES = {"ipv4": 0o640, "ipv6": 0o640, "nft": 0o755}
FWSAFE_HEADER = "# fwsafe: known-good state"   # first comment of every boot file fwsafe writes


def boot_file_content(layer: str, content: bytes, entry_id: str, *,
                      flush_ruleset: bool = True) -> bytes:
    """The boot file for `layer` holding `content` (a history entry's layer).

    nftables.conf starts with ``flush ruleset`` unless
    netfilter-persistent loads iptables rules at boot too (`flush_ruleset=False`): then each of
    its tables is deleted and re-created instead, leaving the iptables-nft tables alone.
    """
    body = normalize_layer(layer, content).decode("utf-8", errors="replace")
    if layer in ("ipv4", "ipv6"):
        return (f"{FWSAFE_HEADER} {entry_id} (iptables-restore format)\n"
                + body).encode()
    if layer == "nft":
        head = f"#!/usr/sbin/nft -f\n{FWSAFE_HEADER} {entry_id}\n"
        if flush_ruleset:
            head += "flush ruleset\n"
        else:
            head += "".join(f"add table {fam} {name}\ndelete table {fam} {name}\n"
                            for fam, name in nft_tables(body))
        return (head + body).encode()
    raise ValueError(f"layer {layer!r} has no boot file")


def _exists(root: Path, path: str) -> bool:
    return os.path.lexists(local_path(root, path))


def uses_netfilter_persistent(root: Path) -> bool:
    """rules.v4/rules.v6 exist, or netfilter-persistent is installed."""
    return any(_exists(root, p) for p in (*BOOT_FILES.values(), *NETFILTER_PERSISTENT)
               if not p.endswith("nftables.conf"))


def nft_service_enabled(root: Path) -> bool:
    """nftables.service is enabled (a *.wants symlink in /etc/systemd/system)."""
    base = local_path(root, "/etc/systemd/system")
    try:
        wants = [d for d in os.listdir(base) if d.endswith(".wants")]
    except OSError:
        return False
    return any(os.path.lexists(base / d / NFT_SERVICE) for d in wants)


def uses_nftables(root: Path) -> bool:
    """/etc/nftables.conf exists and defines tables (or fwsafe wrote it: an empty ruleset is
    still the server's), or the nftables service is enabled."""
    conf = local_path(root, BOOT_FILES["nft"])
    try:
        text = conf.read_text(errors="replace")
    except OSError:
        text = ""
    return bool(nft_tables(text)) or FWSAFE_HEADER in text or nft_service_enabled(root)


def uses_ufw(root: Path) -> bool:
    """/etc/ufw exists (ufw loads its files at boot)."""
    return local_path(root, UFW_DIR).is_dir()


def boot_targets(root: Path = Path("/")) -> list[str]:
    """The layers whose boot files this system uses: ipv4+ipv6 (netfilter-persistent), nft."""
    targets = []
    if uses_netfilter_persistent(root):
        targets += ["ipv4", "ipv6"]
    if uses_nftables(root):
        targets.append("nft")
    return targets
