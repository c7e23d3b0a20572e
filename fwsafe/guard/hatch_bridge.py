"""The escape hatch's lo bridge: how SSH gets past a table the hatch cannot be put in (owned by
another program), planned as one nft transaction; the devices it hooks, whether IPv4 can take
it, and what status says of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from fwsafe.guard.hatch_chains import OWNED
from fwsafe.guard.hatch_spec import Spec, bridge_rules
from fwsafe.ondisk.hatch_rules import BRIDGE_FAMILY, BRIDGE_TABLE

# A table owned by another program (`flags owner`, firewalld 2.x) takes no rule of ours, and
# an accept in another table does not override its reject. It accepts what arrives on `lo`
# (firewalld: `iifname "lo" accept`, before its zones; its IPv6 reverse-path filter passes
# `lo`). So from the moment the hatch opens, the SSH packets of its sources are looped through
# `lo` in an ingress chain of each Ethernet device: their destination MAC set to lo's (zero)
# and forwarded to lo, they are received again on lo, for the same local address, and answered
# as usual. IPv4 needs reverse-path filtering off or loose (rp_filter 0 or 2, the default of
# systemd, Ubuntu and the RHEL family) for lo: strict (1) drops them, and status says so.
BRIDGE_PRIORITY = -500
BRIDGE_PASSED = "through lo past"
_SYS_NET = "/sys/class/net"


def bridge_devices(root: str = _SYS_NET) -> list[str]:
    """The Ethernet devices that are up (ARPHRD_ETHER, IFF_UP), but lo: where SSH comes in."""
    found = []
    for name in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, name, "type"), encoding="ascii") as f:
                kind = int(f.read().strip())
            with open(os.path.join(root, name, "flags"), encoding="ascii") as f:
                flags = int(f.read().strip(), 16)
        except (OSError, ValueError):
            continue
        if kind == 1 and flags & 1 and name != "lo":
            found.append(name)
    return found


def strict_rp_filter(root: str = "/proc/sys/net/ipv4/conf") -> bool:
    """IPv4 reverse-path filtering is strict for lo (the larger of `all` and `lo`: 1)."""
    values = []
    for name in ("all", "lo"):
        try:
            with open(os.path.join(root, name, "rp_filter"), encoding="ascii") as f:
                values.append(int(f.read().strip()))
        except (OSError, ValueError):
            values.append(0)
    return max(values) == 1


def bridge_plan(spec: Spec | None, live: dict[str, list[str]] | None,
                devices: Sequence[str], ipv4: bool = True) -> str:
    """The nft statements that make the lo bridge that of `spec` on `devices` (None: none),
    the whole table made again in the same transaction; "" when it is as wanted."""
    wanted = bridge_rules(spec, ipv4) if spec is not None and devices else []
    tag = spec.tag if spec is not None else ""
    if not wanted:
        return f"delete table {BRIDGE_FAMILY} {BRIDGE_TABLE}\n" if live is not None else ""
    if live is not None and sorted(live) == sorted(devices) and all(
            len(rules) == len(wanted) and all(tag in r for r in rules)
            for rules in live.values()):
        return ""
    lines = [f"table {BRIDGE_FAMILY} {BRIDGE_TABLE}",
             f"delete table {BRIDGE_FAMILY} {BRIDGE_TABLE}",
             f"table {BRIDGE_FAMILY} {BRIDGE_TABLE} {{"]
    for i, device in enumerate(devices):
        lines += [f"\tchain ingress{i} {{",
                  f"\t\ttype filter hook ingress device \"{device}\" priority "
                  f"{BRIDGE_PRIORITY}; policy accept;",
                  *(f"\t\t{rule}" for rule in wanted), "\t}"]
    lines.append("}")
    return "".join(line + "\n" for line in lines)


def bridge_state(owned: Sequence[str], bridged: bool, ipv4_left_out: bool = False) -> str:
    """What the hatch can do past `owned` tables: through the lo bridge, or nothing."""
    if not owned:
        return ""
    if not bridged:
        return f"; not in {', '.join(owned)} ({OWNED})"
    caveat = " (IPv4: NOT, rp_filter is strict (1) for lo)" if ipv4_left_out else ""
    return f"; {BRIDGE_PASSED} {', '.join(owned)}{caveat}"


