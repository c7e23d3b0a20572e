"""Persist only on confirm: write a confirmed state to the files the system loads at boot.

A change under the guard lives in the kernel only; the boot files keep the old rules until it
is confirmed, so that a reboot during a pending change comes back with the old rules. On
confirm (fwsafe.persistence.known_good.on_confirmed) the confirmed layers are written, atomically
(fwsafe.ondisk.atomic_files; mode and owner kept), to whichever boot files the host uses (their
detection and content: fwsafe.ondisk.boot, shared with the rescue):

* netfilter-persistent (``/etc/iptables/rules.v4`` / ``rules.v6`` exist, or
  netfilter-persistent is installed): ipv4 -> rules.v4, ipv6 -> rules.v6;
* nftables (``/etc/nftables.conf`` exists and defines tables, or nftables.service is enabled):
  the native nft tables -> /etc/nftables.conf.

The config key ``persist`` overrides the detection: "auto" (default), "netfilter-persistent",
"nftables" or "none". ufw writes its own files at once; they are part of every transaction's
snapshot instead, so a revert or a recovery puts them back.

Nothing is written when fwsafe runs in a network namespace other than the machine's own (one
made by `ip netns`, or another than PID 1's): the boot files configure the machine's firewall,
not that of the namespace (a lab, a VRF). Where that cannot be told (PID 1's namespace is
unreadable), "auto" writes nothing either; an explicit mode does. A file
``/etc/fwsafe/persist-in-netns`` allows it anyway (the lab creates it in its private /etc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fwsafe.backends import IPTABLES_SAVE, RULES_FILE, layer_has, layers_with, owned_elsewhere
from fwsafe.ondisk.atomic_files import local_path, write_file_atomically
from fwsafe.ondisk.boot import BOOT_FILE_MODES, BOOT_FILES, boot_file_content, boot_targets
from fwsafe.ondisk.firewalld_files import without_tables

MODES = ("auto", "netfilter-persistent", "nftables", "none")
NETNS_MARKER = "/etc/fwsafe/persist-in-netns"


@dataclass
class PersistResult:
    mode: str
    targets: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.written:
            parts.append("boot files written: " + ", ".join(self.written))
        if self.unchanged:
            parts.append("boot files already up to date: " + ", ".join(self.unchanged))
        if self.skipped:
            parts.append("not persisted: " + "; ".join(self.skipped))
        if not parts:
            parts.append(f"no boot files to write (persist = {self.mode})")
        return "; ".join(parts)


def targets_for_mode(mode: str, root: Path = Path("/")) -> list[str]:
    """The layers whose boot files are written in `mode`."""
    if mode == "auto":
        return boot_targets(root)
    if mode == "netfilter-persistent":
        return list(layers_with(RULES_FILE))
    if mode == "nftables":
        return ["nft"]
    if mode == "none":
        return []
    raise ValueError(f"unknown persist mode {mode!r} (one of {', '.join(MODES)})")


NETNS_DIRS = ("/run/netns", "/var/run/netns")


def netns_state() -> str:
    """Whether this process is in the machine's own network namespace: "own", "foreign" (a
    namespace of `ip netns`, or another than PID 1's) or "unknown" (cannot tell)."""
    try:
        mine = os.stat("/proc/self/ns/net")
    except OSError:
        return "unknown"
    for directory in NETNS_DIRS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            try:
                other = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (mine.st_dev, mine.st_ino):
                return "foreign"
    try:
        init = os.stat("/proc/1/ns/net")
    except OSError:
        return "unknown"
    return "own" if (init.st_dev, init.st_ino) == (mine.st_dev, mine.st_ino) else "foreign"


def persist_layers(
    layers: dict[str, bytes],
    *,
    mode: str = "auto",
    entry_id: str,
    root: Path = Path("/"),
) -> PersistResult:
    """Write the boot files for `layers` (a history entry's content) according to `mode`.

    `root` is for tests (a fake root; the namespace check is skipped then). Raises OSError when
    a file cannot be written.
    """
    result = PersistResult(mode, targets_for_mode(mode, root))
    if not result.targets:
        return result
    if root == Path("/") and not local_path(root, NETNS_MARKER).exists():
        where = netns_state()
        if where == "foreign" or (where == "unknown" and mode == "auto"):
            why = ("fwsafe runs in a network namespace that is not the machine's own: its rules "
                   "are not the machine's boot rules" if where == "foreign" else
                   "cannot tell whether this is the machine's own network namespace (PID 1's "
                   "is unreadable); set persist in the config to write them anyway")
            result.skipped.append(f"{why} ({NETNS_MARKER} allows it)")
            result.targets = []
            return result
    # nftables.conf flushes the ruleset only where no iptables-save boot file is loaded too
    flush = not any(layer_has(target, IPTABLES_SAVE) for target in result.targets)
    for layer in result.targets:
        server_path = BOOT_FILES[layer]
        if layer not in layers:
            result.skipped.append(f"{server_path}: the {layer} layer was not captured")
            continue
        data = layers[layer]
        owned = owned_elsewhere(layer, layers)   # firewalld makes its own at its start
        if owned:
            data = without_tables(data, owned)
        content = boot_file_content(layer, data, entry_id, flush_ruleset=flush)
        target = local_path(root, server_path)
        if root == Path("/"):
            target = Path(os.path.realpath(target))  # a symlinked boot file: write its target
        try:
            if target.read_bytes() == content:
                result.unchanged.append(server_path)
                continue
        except FileNotFoundError:
            pass
        if not target.parent.is_dir():
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_file_atomically(target, content, default_mode=BOOT_FILE_MODES[layer],
                              keep_owner=True)
        result.written.append(server_path)
    return result
