"""Who tries to reach the listeners, from where, and to which of this host's addresses.

The senders ("sources") are outside addresses that arrive the way real traffic does:

* **the world**: an address of no local subnet and of no network any rule names ("anywhere
  else": ``1.2.3.x``, ``2a00:f00d::x``, or another if those are named) arriving on the
  interface that this host's route to it uses (the default route's), and on every other
  interface that holds a global address of that family; none where the host has no route to
  the world (its answers could not leave);
* **every network a rule names** (fwsafe.audit.space: bans, allow-lists, set elements; bounded
  by the rules' shapes): one address of it, arriving where this host's route to it points; it
  is "world NETWORK" when it lies in no local subnet;
* **each local subnet**: one address of every subnet of every interface (not loopback, not
  link-local, not a single-address /32 or /128), arriving on that interface.

Every source sends to every address of this host of its family (the host answers on any of
its addresses, whichever interface a packet arrives on), from an ephemeral source port and
from every source port a rule names.

The sandbox reproduces every interface with such an address under its own name, with its
addresses (so listeners bound to one of them can be mirrored), and one client-side peer per
interface that holds the sources arriving over it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fwsafe.audit.listeners import Listener
from fwsafe.audit.nat import Entry
from fwsafe.audit.space import NamedSpace, Network, representative
from fwsafe.check.host import Interface, client_path, routes_to
from fwsafe.check.sandbox import LinkPlan

__all__ = ["WORLD", "Plan", "Source", "is_world", "make_plan"]

WORLD = "world"
_WORLD_BASE = {4: "1.2.3.", 6: "2a00:f00d::"}


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


def is_world(name: str) -> bool:
    """The world at large ("world") or a network of it a rule names ("world 1.0.0.0/8")."""
    return name == WORLD or name.startswith(WORLD + " ")


@dataclass
class Plan:
    links: list[LinkPlan] = field(default_factory=list)
    lo_addresses: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    sports: list[int] = field(default_factory=list)   # source ports the rules name
    entries: list[Entry] = field(default_factory=list)   # ports translated to this host
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
        if listener.device and listener.device not in self.addresses \
                and listener.device != "lo":
            return (f"bound to the interface {listener.device}, which has no address to be "
                    "reached at")
        if listener.wildcard:
            return None
        address = listener.mapped or listener.address
        if listener.loopback:
            return None   # every namespace's lo holds it
        if ipaddress.ip_address(address).is_link_local:
            return "bound to a link-local address: only its link's neighbours reach it"
        if self.owner_of(address) is None:
            return f"bound to {address}, an address no interface of this host holds"
        return None

    def host_addresses(self, family: int) -> list[str]:
        """Every address of this host of `family` a packet from outside may be sent to."""
        found = [a for items in self.addresses.values() for a, _ in items
                 if _family(a) == family]
        found += [a for a in self.lo_addresses if _family(a) == family]
        return list(dict.fromkeys(found))

    def destinations(self, listener: Listener, source: Source) -> list[str]:
        """The addresses of this host `source` sends to, to reach `listener`: all of them
        (the host answers on any of its addresses, whichever interface a packet comes in
        by), or the one it is bound to."""
        if source.family not in listener.families:
            return []
        own = self.host_addresses(source.family)
        if listener.wildcard:
            return own
        address = listener.mapped or listener.address
        return [address] if address in own else []

    def first_world(self, family: int) -> Source | None:
        return next((s for s in self.sources if s.name == WORLD and s.family == family), None)


def _family(address: str) -> int:
    return 6 if ":" in address else 4


def _usable(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_link_local or ip.is_loopback or ip.is_multicast)


def _networks(interfaces: Iterable[Interface]) -> list[Network]:
    return [ipaddress.ip_network(f"{a}/{p}", strict=False)
            for iface in interfaces for a, p, _ in iface.addresses]


def _world_candidates(family: int) -> Iterable[str]:
    yield from (f"{_WORLD_BASE[family]}{n}" for n in range(4, 250))
    if family == 4:   # then one address in every /8 of the unicast space
        yield from (f"{a}.77.77.77" for a in range(1, 224) if a not in (10, 127))
    else:             # and in every /16 of 2000::/3
        yield from (f"{a:x}::77" for a in range(0x2001, 0x4000))


def _world_address(family: int, index: int, taken: list[Network], avoid: str,
                   space: NamedSpace | None = None) -> str | None:
    """The `index`th address standing for the world at large: in no local subnet, named by
    no rule of the current firewall, in no network a rule names (a ban of it would speak for
    that network only); None when the rules name networks covering all of them."""
    found = -1
    for text in _world_candidates(family):
        candidate = ipaddress.ip_address(text)
        if not candidate.is_global and not text.startswith(_WORLD_BASE[family]):
            continue
        if any(candidate in net for net in taken if net.prefixlen > 0) \
                or (space is not None and space.contains(text)) \
                or re.search(rf"(?<![\w:.]){re.escape(str(candidate))}(?![\w:.])", avoid):
            continue
        found += 1
        if found == index:
            return str(candidate)
    return None


def _observer(network: Network, taken: set[str]) -> str | None:
    """An address of `network` that is not this host's (nor a v4 network or broadcast one)."""
    size = network.num_addresses
    offsets = [size - 2, size - 3, 1, 2] if size >= 4 else list(range(size))
    for offset in offsets:
        candidate = str(network[offset])
        if candidate not in taken:
            return candidate
    return None


def make_plan(interfaces: dict[str, Interface], avoid: str = "",
              space: NamedSpace | None = None) -> Plan:
    """The sandbox's links and the sources, from this host's interfaces and routes; `avoid`:
    the current rules' text (no world address it names is used); `space`: the networks the
    rules name (each gets a source of its own)."""
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
        _add_world(plan, family, interfaces, links, taken_nets, avoid, space)
    if space is not None:
        _add_named(plan, space, interfaces, links, taken_nets, taken)
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
    for link in links.values():   # every source may send to every address of this host
        if link.clients:
            everyone = [a for a in (*plan.host_addresses(4), *plan.host_addresses(6))]
            link.servers = list(dict.fromkeys([*link.servers, *everyone]))
    plan.links = [links[i.name] for i in reproduced]
    return plan


def _add_named(plan: Plan, space: NamedSpace, interfaces: dict[str, Interface],
               links: dict[str, LinkPlan], taken_nets: list[Network], taken: set[str]) -> None:
    """A source in every network the rules name, arriving where this host routes it."""
    # The routes to the sources as they will most likely be chosen (each taken), asked in one
    # `ip` (64 processes otherwise); one chosen otherwise is asked alone.
    ahead = set(taken)
    for family in (4, 6):
        for net in space.networks[family] if plan.host_addresses(family) else []:
            address = representative(net, space, ahead)
            if address is not None:
                ahead.add(address)
    routes = routes_to(sorted(ahead - taken))
    for family in (4, 6):
        if not plan.host_addresses(family):
            continue
        for net in space.networks[family]:
            address = representative(net, space, taken)
            if address is None:
                continue
            path = client_path(address, None, interfaces, routes)
            if path.problem or path.dev is None or path.local or path.dev not in links:
                continue
            taken.add(address)
            local = next((n for n in taken_nets if n.prefixlen > 0
                          and ipaddress.ip_address(address) in n), None)
            name = f"{net} (in {local})" if local is not None else f"{WORLD} {net}"
            plan.sources.append(Source(name, family, address, path.dev, str(local)
                                       if local is not None else None))


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _add_world(plan: Plan, family: int, interfaces: dict[str, Interface],
               links: dict[str, LinkPlan], taken: list[Network], avoid: str,
               space: NamedSpace | None) -> None:
    if not any(_family(a) == family for items in plan.addresses.values() for a, _ in items):
        return   # no address of this family to be reached at: nothing to say
    probe = _world_address(family, 0, taken, avoid, space)
    if probe is None:
        plan.notes.append(f"the rules name networks covering all of IPv{family}: the world "
                          "is tried from one address of each")
        return
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
        address = _world_address(family, index, taken, avoid, space)
        if address is None:
            break
        plan.sources.append(Source(WORLD, family, address, name))
