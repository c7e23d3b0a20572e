"""The host as it is now, read only: its interfaces and routes, the path each management
client's packets take, the current firewall (one :class:`IptTool` per iptables flavour, and the
native nftables tables), and the plan of the sandbox that reproduces those paths."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fwsafe.backends import (
    IPTABLES_SAVE,
    NETFILTER,
    NFT_TABLES,
    available_layers,
    first_with,
    layer_for,
    layer_has,
    layers_with,
)
from fwsafe.backends.base import ApplyError
from fwsafe.backends.iptables import IptablesLayer, uses_nf_tables
from fwsafe.backends.iptsave import BUILTIN_CHAINS, Tables, has_tables
from fwsafe.check.ipt_lines import IptFileMap
from fwsafe.check.sandbox import LinkPlan
from fwsafe.errors import EnvironmentProblem
from fwsafe.runner import require_binary, run

__all__ = [
    "ClientPath",
    "Interface",
    "IptTool",
    "capture_host",
    "client_path",
    "current_state",
    "host_families",
    "host_interfaces",
    "iptables_nft_tables",
    "plan_links",
]


@dataclass
class Interface:
    name: str
    mtu: int
    addresses: list[tuple[str, int, str]]  # (address, prefix length, scope)


@dataclass
class ClientPath:
    client: str
    family: int
    dev: str | None = None
    server: str | None = None
    problem: str | None = None

    @property
    def local(self) -> bool:
        return self.dev == "lo"

    @property
    def family_label(self) -> str:
        return f"ipv{self.family}"


@dataclass
class IptTool:
    """One iptables flavour as loaded in the sandbox (e.g. ipv4 via iptables-nft)."""

    layer: str
    family: int
    save: str
    restore: str
    label: str
    nf_tables: bool
    current: bytes = b""
    candidate: tuple[bytes, str] | None = None
    fmap: IptFileMap | None = None
    snapshot: Tables = field(default_factory=dict)


def ip_json(args: list[str]) -> Any:
    result = run([require_binary("ip"), "-j", *args], timeout=30)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace").strip() or "ip failed")
    return json.loads(result.stdout or b"[]")


def host_interfaces() -> dict[str, Interface]:
    found: dict[str, Interface] = {}
    for item in ip_json(["addr", "show"]):
        addresses = [(a["local"], int(a["prefixlen"]), a.get("scope", "global"))
                     for a in item.get("addr_info", []) if "local" in a]
        found[item["ifname"]] = Interface(item["ifname"], int(item.get("mtu", 1500)), addresses)
    return found


_BATCH_FAILED = re.compile(r"^Command failed -:(\d+)$")


def routes_to(addresses: list[str]) -> dict[str, Any]:
    """`ip -j route get` of each address, all in one `ip -batch` (the audit's sources: one
    process, not 64): its routes, or the error `ip` gave for it (a str); an address `ip` said
    nothing of is absent (`client_path` asks again for it alone)."""
    if not addresses:
        return {}
    result = run([require_binary("ip"), "-force", "-j", "-batch", "-"],
                 input="".join(f"route get {a}\n" for a in addresses).encode(), timeout=30)
    found: dict[str, Any] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        try:
            routes = json.loads(line)
            dst = ipaddress.ip_address(routes[0]["dst"]).compressed
        except (ValueError, LookupError, TypeError):
            continue
        found[dst] = routes
    said: list[str] = []   # with -force, each command that fails: its error, then this line
    for line in result.stderr.decode(errors="replace").splitlines():
        failed = _BATCH_FAILED.match(line.strip())
        if failed is None:
            said.append(line.strip())
            continue
        number = int(failed.group(1))
        if 0 < number <= len(addresses) and addresses[number - 1] not in found:
            found[addresses[number - 1]] = "; ".join(m for m in said if m) or "ip failed"
        said = []
    return {a: found[a] for a in addresses if a in found}


def client_path(client: str, server_hint: str | None, interfaces: dict[str, Interface],
                routes_known: Mapping[str, Any] | None = None) -> ClientPath:
    """How this host reaches `client` (`routes_known`: `routes_to`'s answers, when asked
    ahead)."""
    family = 6 if ":" in client else 4
    path = ClientPath(client, family)
    addr = ipaddress.ip_address(client)
    if addr.is_link_local:
        path.problem = "link-local client addresses are not supported by the sandbox"
        return path
    try:
        routes = routes_known[client] if routes_known is not None and client in routes_known \
            else ip_json(["route", "get", client])
        if isinstance(routes, str):   # the error `ip -batch` gave for it (routes_to)
            raise RuntimeError(routes)
    except RuntimeError as exc:
        path.problem = f"this host has no route to {client}: {exc}"
        return path
    if not routes or routes[0].get("type") in ("unreachable", "blackhole", "prohibit"):
        path.problem = f"this host has no route to {client}"
        return path
    route = routes[0]
    path.dev = str(route.get("dev", ""))
    local = route.get("type") == "local" or path.dev == "lo"
    if local:
        path.dev = "lo"
    iface = interfaces.get(path.dev)
    if iface is None:
        path.problem = f"the interface {path.dev!r} of the route to {client} is unknown"
        return path
    own = [a for a, _, _ in iface.addresses if (":" in a) == (family == 6)]
    if server_hint and (server_hint in own or local):
        path.server = server_hint
    elif local:
        path.server = client
    else:
        prefsrc = route.get("prefsrc")
        path.server = str(prefsrc) if prefsrc else (own[0] if own else None)
    if not path.server:
        path.problem = f"{path.dev} has no IPv{family} address for {client} to connect to"
    return path


def host_families(interfaces: dict[str, Interface]) -> set[int]:
    families = set()
    for iface in interfaces.values():
        if iface.name == "lo":
            continue
        for address, _, scope in iface.addresses:
            if scope != "link":
                families.add(6 if ":" in address else 4)
    return families


def capture_host(pool_size: int = 4) -> dict[str, bytes]:
    """Every firewall layer the check reads ({layer: capture}), read in parallel; a layer that
    cannot be read is left out (``current_state`` then reads it itself and says why)."""
    # the early firewall read (core.prefetch) and its pool: only when the host is read here
    from concurrent.futures import ThreadPoolExecutor

    from fwsafe.core import prefetch

    names = [n for n in available_layers() if layer_has(n, NETFILTER)]
    found: dict[str, bytes] = {}
    with ThreadPoolExecutor(max_workers=pool_size) as pool:
        # The reading `fwsafe check` started before the CLI was loaded, if any.
        _, futures = prefetch.read(pool, names)
        for name, future in futures.items():
            try:
                found[name] = future.result()
            except (ApplyError, OSError):
                continue
    return found


def current_state(layers: Mapping[str, tuple[bytes, str]],
                  captured: Mapping[str, bytes] | None = None) -> tuple[list[IptTool], bytes]:
    """The host's current firewall, captured by the backends (read only): one IptTool per
    iptables layer (nft-backed and leftover legacy ones), and the native nftables tables.
    ``captured``: layers already read (by ``capture_host`` or apply's snapshot)."""
    captured = captured or {}
    present = set(available_layers())
    tools: list[IptTool] = []
    for name in layers_with(IPTABLES_SAVE):
        if name not in present and name not in layers:
            continue
        layer = IptablesLayer(name)
        family = layer.family
        tool = IptTool(name, 4 if family.nft_family == "ip" else 6,
                       require_binary(family.save), require_binary(family.restore),
                       family.save.removesuffix("-save"),
                       layer.in_nf_tables())
        try:
            tool.current = captured[name] if name in captured else layer.capture()
        except ApplyError as exc:
            raise EnvironmentProblem(f"cannot read the current {family.label} rules: "
                                     f"{exc.message}", hint=exc.hint) from exc
        if name in layers:
            content, source = layers[name]
            tool.candidate = (content, source)   # its file map: once loaded in the sandbox
        elif not has_tables(tool.current):
            continue  # nothing of this flavour here, nor in the candidate: nothing to copy
        tools.append(tool)
    native = b""
    nft = first_with(NFT_TABLES, present)
    if nft is not None:
        try:
            native = captured[nft] if nft in captured else layer_for(nft).capture()
        except ApplyError as exc:
            raise EnvironmentProblem(f"cannot read the current nftables tables: "
                                     f"{exc.message}") from exc
    return tools, native


def iptables_nft_tables() -> set[tuple[str, str]]:
    """(family, table) of the nftables tables iptables-nft owns (as the nft backend sees it)."""
    if not uses_nf_tables():
        return set()
    return {(family, table) for family in ("ip", "ip6") for table in BUILTIN_CHAINS}


def plan_links(paths: list[ClientPath], interfaces: dict[str, Interface]
               ) -> tuple[list[LinkPlan], list[str]]:
    """What the sandbox's server needs to be reached as this host is: one link per interface
    management traffic arrives on (its name, MTU and addresses; the clients and the addresses
    they connect to), and the addresses local clients use on lo."""
    links: dict[str, LinkPlan] = {}
    lo_addresses: list[str] = []
    for path in paths:
        if path.problem or path.dev is None or path.server is None:
            continue
        if path.local:
            lo = interfaces.get("lo")
            own = {a for a, _, _ in lo.addresses} if lo else set()
            for address in (path.client, path.server):
                if address not in own and address not in lo_addresses:
                    lo_addresses.append(address)
            continue
        iface = interfaces[path.dev]
        link = links.get(path.dev)
        if link is None:
            link = LinkPlan(path.dev, iface.mtu, [(a, p) for a, p, _ in iface.addresses])
            links[path.dev] = link
        if path.client not in link.clients:
            link.clients.append(path.client)
        if path.server not in link.servers:
            link.servers.append(path.server)
    return list(links.values()), lo_addresses
