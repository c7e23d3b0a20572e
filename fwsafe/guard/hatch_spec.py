"""What the escape hatch is: one transaction's `Spec` (sources, ports, the moment it opens) and
its rules as text, for iptables, for nft and for the lo bridge (fwsafe.guard.hatch tells the
whole story).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fwsafe.ondisk.hatch_rules import BRIDGE_FAMILY, MARK  # how its rules are recognised

NFT_LAYER = "nft"
IN_HOOKS = ("prerouting", "input")
OUT_HOOKS = ("output", "postrouting")
# iptables tables whose rules can drop, and their chains on the hooks SSH traverses (nat
# cannot DROP; its ACCEPT would only skip address translation).
IPTABLES_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "OUTPUT"),
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "security": ("INPUT", "OUTPUT"),
}
NFT_FAMILIES = ("ip", "ip6", "inet")
NFT_TYPES = ("filter", "route")   # a nat chain's accept would only skip translation
Log = Callable[[str], None]


@dataclass(frozen=True)
class Spec:
    """One transaction's hatch: who may come in, on which ports, from when (Unix time)."""

    tx: str
    opens: int
    sources4: tuple[str, ...] = ()
    sources6: tuple[str, ...] = ()
    ports: tuple[int, ...] = (22,)

    @property
    def tag(self) -> str:
        """The comment that marks its rules: the transaction, the moment, and a digest of the
        sources and ports (so that a rule of any other hatch is told apart)."""
        digest = hashlib.sha256(repr((self.sources4, self.sources6, self.ports)).encode())
        return f"{MARK}:{self.tx}:{self.opens}:{digest.hexdigest()[:8]}"

    def sources(self, v6: bool) -> tuple[str, ...]:
        return self.sources6 if v6 else self.sources4

    def moved(self, opens: int) -> Spec:
        return Spec(self.tx, opens, self.sources4, self.sources6, self.ports)


def plan_from_options(options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The hatch the CLI asked for (record.options["hatch"]), or None when there is none."""
    wanted = options.get("hatch")
    if not isinstance(wanted, dict) or not wanted.get("on"):
        return None
    return wanted


def spec_for(tx: str, plan: Mapping[str, Any], deadline: float) -> Spec:
    """The hatch of transaction `tx` for the wall-clock `deadline`."""
    grace = float(plan.get("grace", 30))
    return Spec(tx, int(math.ceil(deadline + grace)),
                tuple(str(s) for s in plan.get("sources4", ())),
                tuple(str(s) for s in plan.get("sources6", ())),
                tuple(int(p) for p in plan.get("ports", (22,))))


def split_sources(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 addresses or networks, canonical, each once; others are left out."""
    four: list[str] = []
    six: list[str] = []
    for text in addresses:
        try:
            net = ipaddress.ip_network(text.strip().split("%", 1)[0], strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen == 128 \
                and net.network_address.ipv4_mapped is not None:
            net = ipaddress.ip_network(str(net.network_address.ipv4_mapped))
        value = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        target = six if net.version == 6 else four
        if value not in target:
            target.append(value)
    return four, six


def is_ipv6_layer(layer: str) -> bool:
    return layer.startswith("ipv6")


def iptables_rules(spec: Spec, v6: bool, chain: str) -> list[str]:
    """The hatch's rule specifications for one chain (without `-A CHAIN`)."""
    ports = ",".join(str(p) for p in spec.ports)
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(spec.opens))
    inbound = chain in ("PREROUTING", "INPUT")
    peer, own = ("-s", "--dports") if inbound else ("-d", "--sports")
    return [f"{peer} {source} -p tcp -m multiport {own} {ports} -m time --datestart {start} "
            f"-m comment --comment \"{spec.tag}\" -j ACCEPT" for source in spec.sources(v6)]


def _nft_matches(spec: Spec, family: str, inbound: bool) -> list[str]:
    """What the hatch's nft rules match, per IP version its sources have in `family`: SSH
    from (`inbound`) or to them, from its moment on."""
    matches = []
    for proto, v6 in (("ip", False), ("ip6", True)):
        if family not in (proto, "inet", BRIDGE_FAMILY) or not spec.sources(v6):
            continue
        peer = f"{proto} {'saddr' if inbound else 'daddr'}"
        port = f"tcp {'dport' if inbound else 'sport'}"
        matches.append(f"{peer} {{ {', '.join(spec.sources(v6))} }} "
                       f"{port} {{ {', '.join(str(p) for p in spec.ports)} }} "
                       f"meta time >= {spec.opens}")
    return matches


def nft_rules(spec: Spec, family: str, hook: str) -> list[str]:
    """The hatch's rules for one nft base chain of `family` on `hook`."""
    return [f"{match} accept comment \"{spec.tag}\""
            for match in _nft_matches(spec, family, hook in IN_HOOKS)]


def bridge_rules(spec: Spec, ipv4: bool = True) -> list[str]:
    """The lo bridge's rules for one ingress chain: only packets for this host (`fib daddr
    type local`: not SSH to the VMs, containers or networks it forwards to); IPv4 only where
    `ipv4` (not with strict rp_filter: there lo would drop what it loops, every packet of the
    admin's IPv4 SSH sessions too)."""
    loop = "fib daddr type local ether daddr set 00:00:00:00:00:00 fwd to \"lo\""
    return [f"{match} {loop} comment \"{spec.tag}\""
            for match in _nft_matches(spec, BRIDGE_FAMILY, inbound=True)
            if ipv4 or not match.startswith("ip ")]


