"""Who tries to reach the listeners, from where, and to which of this host's addresses.

The senders ("sources") are outside addresses that arrive the way real traffic does:

* **the world**: an address of no local subnet (``1.2.3.x``, ``2a00:f00d::x``) arriving on the
  interface that this host's route to it uses (the default route's), and on every other
  interface that holds a global address of that family; none where the host has no route to
  the world (its answers could not leave);
* **each local subnet**: one address of every subnet of every interface (not loopback, not
  link-local, not a single-address /32 or /128), arriving on that interface.

The sandbox reproduces every interface with such an address under its own name, with its
addresses (so listeners bound to one of them can be mirrored), and one client-side peer per
interface that holds the sources arriving over it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from fwsafe.audit.listeners import Listener
from fwsafe.check.host import Interface, client_path
from fwsafe.check.sandbox import LinkPlan

__all__ = ["WORLD", "Plan", "Source", "make_plan"]

WORLD = "world"
_WORLD_BASE = {4: "1.2.3.", 6: "2a00:f00d::"}
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class Source:
    """An outside address that sends to the listeners: `name` is "world" or the subnet it
    stands for; `link` the host interface its packets arrive on."""

    name: str
    family: int
    address: str
    link: str
    network: str | None = None   # the subnet (None for the world)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "family": f"ipv{self.family}", "address": self.address,
                "interface": self.link}


@dataclass
class Plan:
    links: list[LinkPlan] = field(default_factory=list)
    lo_addresses: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (address, prefix) of every interface reproduced, by name; lo's non-loopback ones apart
    addresses: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def owner_of(self, address: str) -> str | None:
        """The interface that holds `address` ("lo" for a non-loopback one on lo)."""
        if address in self.lo_addresses:
            return "lo"
        for name, items in self.addresses.items():
            if any(a == address for a, _ in items):
                return name
        return None

    def unplaced(self, listener: Listener) -> str | None:
        """Why `listener` cannot be mirrored in the sandbox (None: it can)."""
        if listener.wildcard:
            return None
        address = listener.mapped or listener.address
        if ipaddress.ip_address(address).is_link_local:
            return "bound to a link-local address: only its link's neighbours reach it"
        if self.owner_of(address) is None:
            return f"bound to {address}, an address no interface of this host holds"
        return None

    def destinations(self, listener: Listener, source: Source) -> list[str]:
        """The addresses of this host `source` sends to, to reach `listener`."""
        if source.family not in listener.families:
            return []
        own = [a for a, _ in self.addresses.get(source.link, []) if _family(a) == source.family]
        if listener.wildcard:
            if source.network is None:
                return own
            net = ipaddress.ip_network(source.network)
            return [a for a in own if ipaddress.ip_address(a) in net]
        address = listener.mapped or listener.address
        if address in own:
            return [address]
        if source.name == WORLD and address in self.lo_addresses \
                and source == self.first_world(source.family):
            return [address]
        return []

    def first_world(self, family: int) -> Source | None:
        return next((s for s in self.sources if s.name == WORLD and s.family == family), None)


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def _usable(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_link_local or ip.is_loopback or ip.is_multicast)


def _networks(interfaces: Iterable[Interface]) -> list[IPNetwork]:
    return [ipaddress.ip_network(f"{a}/{p}", strict=False)
            for iface in interfaces for a, p, _ in iface.addresses]


def _world_address(family: int, index: int, taken: list[IPNetwork], avoid: str) -> str:
    """The `index`th address standing for the world: in no local subnet, and named by no rule
    of the current firewall (a ban of it would speak for that address only)."""
    found = -1
    for n in range(4, 250):
        candidate = ipaddress.ip_address(f"{_WORLD_BASE[family]}{n}")
        if any(candidate in net for net in taken if net.prefixlen > 0) \
                or re.search(rf"(?<![\w:.]){re.escape(str(candidate))}(?![\w:.])", avoid):
            continue
        found += 1
        if found == index:
            return str(candidate)
    raise ValueError("no world address left")   # not with fewer than 246 interfaces


def _observer(network: IPNetwork, taken: set[str]) -> str | None:
    """An address of `network` that is not this host's (nor a v4 network or broadcast one)."""
    size = network.num_addresses
    offsets = [size - 2, size - 3, 1, 2] if size >= 4 else list(range(size))
    for offset in offsets:
        candidate = str(network[offset])
        if candidate not in taken:
            return candidate
    return None


def make_plan(interfaces: dict[str, Interface], avoid: str = "") -> Plan:
    """The sandbox's links and the sources, from this host's interfaces and routes; `avoid`:
    the current rules' text (no world address it names is used)."""
    plan = Plan()
    lo = interfaces.get("lo")
    plan.lo_addresses = [a for a, _, _ in (lo.addresses if lo else []) if _usable(a)]
    reproduced = [iface for name, iface in sorted(interfaces.items())
                  if name != "lo" and any(_usable(a) for a, _, _ in iface.addresses)]
    taken_nets = _networks(interfaces.values())
    taken = {a for iface in interfaces.values() for a, _, _ in iface.addresses}
    links: dict[str, LinkPlan] = {}
    for iface in reproduced:
        usable = [(a, p) for a, p, _ in iface.addresses if _usable(a)]
        plan.addresses[iface.name] = usable
        mtu = min(max(iface.mtu, 1280), 65535)   # what a veth takes (and IPv6 needs)
        links[iface.name] = LinkPlan(iface.name, mtu, [(a, p) for a, p, _ in iface.addresses
                                                       if not _is_loopback(a)])
        links[iface.name].servers = [a for a, _ in usable]
    for family in (4, 6):
        _add_world(plan, family, interfaces, links, taken_nets, avoid)
    for iface in reproduced:
        seen: set[str] = set()
        for address, prefix in plan.addresses[iface.name]:
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            if network.num_addresses < 2 or str(network) in seen:
                continue
            seen.add(str(network))
            observer = _observer(network, taken)
            if observer is None:
                continue
            taken.add(observer)
            plan.sources.append(Source(str(network), _family(address), observer, iface.name,
                                       str(network)))
    for source in plan.sources:
        links[source.link].clients.append(source.address)
    plan.links = [links[i.name] for i in reproduced]
    return plan


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _add_world(plan: Plan, family: int, interfaces: dict[str, Interface],
               links: dict[str, LinkPlan], taken: list[IPNetwork], avoid: str) -> None:
    if not any(_family(a) == family for items in plan.addresses.values() for a, _ in items):
        return   # no address of this family to be reached at: nothing to say
    probe = _world_address(family, 0, taken, avoid)
    path = client_path(probe, None, interfaces)
    if path.problem or path.dev is None or path.local:
        plan.notes.append(f"no route to the world over IPv{family} ({probe}): nothing "
                          f"reaches this host from the world over IPv{family} (its answers "
                          "could not leave)")
        return
    names = [path.dev] if path.dev in links else []
    for name in links:
        if name not in names and any(_family(a) == family and ipaddress.ip_address(a).is_global
                                     for a, _ in plan.addresses.get(name, [])):
            names.append(name)
    if not names:
        plan.notes.append(f"the route to the world over IPv{family} leaves by {path.dev}, "
                          "which has no address to be reached at")
    for index, name in enumerate(names):
        address = _world_address(family, index, taken, avoid)
        plan.sources.append(Source(WORLD, family, address, name))
        if index == 0:
            links[name].servers += [a for a in plan.lo_addresses if _family(a) == family]
