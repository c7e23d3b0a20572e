"""`fwsafe check`: predict a lockout before applying, with the kernel's own verdict.

The candidate ruleset is loaded into a throwaway pair of network namespaces that mimics the
host's management path (the interface name and addresses the SSH traffic arrives on, the
client's address, the management port), on top of a copy of the host's current firewall
layers, exactly as ``fwsafe apply`` would load it. Then real packets go through real
netfilter:

(a) a NEW TCP connection from each client to the management port (a listener accepts it);
(b) a connection opened under the CURRENT rules keeps carrying data after the switch;
(c) both over IPv6 for IPv6 clients.

Where a packet is lost, the rule that dropped it is named from the kernel's own answer:
``iptables-save -c`` packet counters for iptables layers, ``nft monitor trace`` for nftables,
mapped back to the file and line that made the rule. What the sandbox cannot reproduce (rate
limits, owners, marks, ...) is reported as "not checked", never as safe.

The firewall of the namespace that runs the check is only read, never changed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from fwsafe.backends import available_layers, layer_for
from fwsafe.backends.base import ApplyError
from fwsafe.backends.iptables import (
    BUILTIN_CHAINS,
    IptablesLayer,
    describe_restore_error,
    uses_nf_tables,
)
from fwsafe.backends.nftables import describe_nft_error, split_tables
from fwsafe.check.clients import (
    default_clients_and_port,
    default_sessions,
    normalize_address,
    parse_clients,
    parse_ssh_connection,
)
from fwsafe.check.rules import (
    LIMITS,
    NFT_DROP_VERDICTS,
    NFT_TERMINAL_VERDICTS,
    ChainKey,
    IptFileMap,
    NftFileInfo,
    NftListing,
    SavedTables,
    TraceEvent,
    counted_drops,
    counter_delta,
    evaluated_rules,
    ipt_excludes_tcp,
    ipt_interface_only,
    ipt_unreproducible,
    map_iptables_file,
    map_nft_handles,
    nft_excludes_tcp,
    nft_reachable,
    nft_unreproducible,
    parse_nft_echo,
    parse_nft_listing,
    parse_save,
    parse_trace_line,
    reachable_chains,
    scan_nft_file,
)
from fwsafe.check.sandbox import TRACE_TABLE, LinkPlan, Sandbox, SandboxError
from fwsafe.core.manager import Change, validate_change
from fwsafe.errors import EnvironmentProblem, FwsafeError, InvalidRulesError, UsageError
from fwsafe.runner import require_binary, run

__all__ = [
    "DEFAULT_TIMEOUT",
    "LAYERS",
    "LIMITS",
    "CheckReport",
    "Verdict",
    "default_clients_and_port",
    "default_sessions",
    "parse_clients",
    "parse_ssh_connection",
    "predict",
]

LAYERS = ("ipv4", "ipv6", "nft")
DEFAULT_TIMEOUT = 1.0
_SYSCTLS = ("netfilter/nf_conntrack_tcp_loose", "netfilter/nf_conntrack_tcp_be_liberal")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One management path and what the kernel did with it.

    `ok` is True (the path stays open), False (a lockout: the packets are lost) or None (not
    checked: the sandbox could not test it, or the outcome depends on what it cannot
    reproduce). `culprit` names the rule that dropped the packets ("FILE:LINE: `rule`").
    """

    path: str
    ok: bool | None
    culprit: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "culprit": self.culprit, "detail": self.detail}


@dataclass
class CheckReport:
    verdicts: list[Verdict] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    lockout: bool = False
    clients: list[str] = field(default_factory=list)
    port: int = 22
    layers: dict[str, str] = field(default_factory=dict)   # layer -> source file
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def unknown(self) -> int:
        return sum(1 for v in self.verdicts if v.ok is None)

    def lockout_message(self) -> str:
        failed = [v for v in self.verdicts if v.ok is False]
        if not failed:
            return ""
        first = failed[0]
        text = f"lockout predicted on port {self.port}: {first.path}: {first.detail}"
        if first.culprit:
            text += f"; dropped by {first.culprit}"
        if len(failed) > 1:
            text += f" (and {len(failed) - 1} more lost path(s))"
        return text

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-serializable object (what `fwsafe check --json` prints)."""
        data: dict[str, Any] = {
            "ok": not self.lockout,
            "lockout": self.lockout,
            "exit_code": 1 if self.lockout else 0,
            "port": self.port,
            "clients": self.clients,
            "layers": self.layers,
            "verdicts": [v.to_json() for v in self.verdicts],
            "not_checked": self.not_checked,
            "unknown": self.unknown,
            "notes": self.notes,
            "limits": LIMITS,
            "duration_s": round(self.duration_s, 3),
        }
        if self.lockout:
            data["kind"] = "LockoutPredicted"
            data["error"] = self.lockout_message()
        return data

    def describe(self) -> str:
        sources = ", ".join(f"{src} ({layer})" for layer, src in self.layers.items())
        lines = [f"fwsafe check: {sources}; management port {self.port}; "
                 f"clients {', '.join(self.clients) or '-'}"]
        for verdict in self.verdicts:
            label = {True: "ok", False: "LOCKOUT", None: "not checked"}[verdict.ok]
            lines.append(f"  {label:<12} {verdict.path}")
            if verdict.detail:
                lines.append(f"  {'':<12}   {verdict.detail}")
            if verdict.culprit:
                lines.append(f"  {'':<12}   culprit: {verdict.culprit}")
        if self.not_checked:
            lines.append("Not checked (the sandbox cannot reproduce these rules; they were NOT "
                         "verified):")
            lines.extend(f"  {item}" for item in self.not_checked)
        for note in self.notes:
            lines.append(f"Note: {note}")
        if self.lockout:
            lines.append("Result: LOCKOUT predicted: do not apply this ruleset as it is.")
        elif self.unknown:
            lines.append(f"Result: no lockout found, but {self.unknown} path(s) could NOT be "
                         "checked (see above).")
        else:
            lines.append("Result: the management path stays open.")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Input checks: the backends' own validation (iptables-restore --test, nft -c -f)
# --------------------------------------------------------------------------------------------
def _validate(layers: Mapping[str, tuple[bytes, str]]) -> None:
    change = Change()
    for name in LAYERS:
        if name in layers:
            change.add(name, *layers[name])
    validate_change(change)


# --------------------------------------------------------------------------------------------
# The host as it is now (read only)
# --------------------------------------------------------------------------------------------
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
    snapshot: SavedTables = field(default_factory=dict)


def _ip_json(args: list[str]) -> Any:
    result = run([require_binary("ip"), "-j", *args], timeout=30)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.decode(errors="replace").strip() or "ip failed")
    return json.loads(result.stdout or b"[]")


def _interfaces() -> dict[str, Interface]:
    found: dict[str, Interface] = {}
    for item in _ip_json(["addr", "show"]):
        addresses = [(a["local"], int(a["prefixlen"]), a.get("scope", "global"))
                     for a in item.get("addr_info", []) if "local" in a]
        found[item["ifname"]] = Interface(item["ifname"], int(item.get("mtu", 1500)), addresses)
    return found


def _client_path(client: str, server_hint: str | None, interfaces: dict[str, Interface]
                 ) -> ClientPath:
    family = 6 if ":" in client else 4
    path = ClientPath(client, family)
    addr = ipaddress.ip_address(client)
    if addr.is_link_local:
        path.problem = "link-local client addresses are not supported by the sandbox"
        return path
    try:
        routes = _ip_json(["route", "get", client])
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


def _host_families(interfaces: dict[str, Interface]) -> set[int]:
    families = set()
    for iface in interfaces.values():
        if iface.name == "lo":
            continue
        for address, _, scope in iface.addresses:
            if scope != "link":
                families.add(6 if ":" in address else 4)
    return families


IPT_LAYERS = ("ipv4", "ipv6", "ipv4-legacy", "ipv6-legacy")


def _current_state(layers: Mapping[str, tuple[bytes, str]]) -> tuple[list[IptTool], bytes]:
    """The host's current firewall, captured by the backends (read only): one IptTool per
    iptables layer (nft-backed and leftover legacy ones), and the native nftables tables."""
    present = set(available_layers())
    tools: list[IptTool] = []
    for name in IPT_LAYERS:
        if name not in present and name not in layers:
            continue
        layer = IptablesLayer(name)
        family = layer.family
        tool = IptTool(name, 4 if family.nft_family == "ip" else 6,
                       require_binary(family.save), require_binary(family.restore),
                       family.save.removesuffix("-save"),
                       not family.legacy and uses_nf_tables(family.save))
        try:
            tool.current = layer.capture()
        except ApplyError as exc:
            raise EnvironmentProblem(f"cannot read the current {family.label} rules: "
                                     f"{exc.message}") from exc
        if name in layers:
            content, source = layers[name]
            tool.candidate = (content, source)
            tool.fmap = map_iptables_file(content.decode(errors="replace"), source)
        elif not parse_save(tool.current.decode(errors="replace")):
            continue  # nothing of this flavour here, nor in the candidate: nothing to copy
        tools.append(tool)
    native = b""
    if "nft" in present:
        try:
            native = layer_for("nft").capture()
        except ApplyError as exc:
            raise EnvironmentProblem(f"cannot read the current nftables tables: "
                                     f"{exc.message}") from exc
    return tools, native


def _iptables_nft_tables() -> set[tuple[str, str]]:
    """(family, table) of the nftables tables iptables-nft owns (as the nft backend sees it)."""
    if not uses_nf_tables():
        return set()
    return {(family, table) for family in ("ip", "ip6") for table in BUILTIN_CHAINS}


# --------------------------------------------------------------------------------------------
# Signals: a check interrupted by SIGTERM/SIGHUP still removes its sandbox
# --------------------------------------------------------------------------------------------
class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP while the sandbox is torn down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda s, f: pending.append(s))
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if pending:
            if pending[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise _Terminated(pending[0])


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------
@dataclass
class _NotChecked:
    where: str
    reasons: list[str]
    interface_only: bool
    excludes_tcp: bool
    family: int | None          # None: both (nft inet)
    ipt_key: tuple[int, str, str, int] | None = None   # (tool index, table, chain, rule index)
    nft_key: tuple[ChainKey, int] | None = None         # (chain, rule position)

    def text(self) -> str:
        return f"{self.where}: {'; '.join(self.reasons)}"


@dataclass
class _Attempt:
    ok: bool
    error: str | None
    culprits: list[str]
    relevant: list[str]


class _Checker:
    def __init__(self, layers: Mapping[str, tuple[bytes, str]], paths: list[ClientPath],
                 port: int, timeout: float, tools: list[IptTool],
                 native: bytes, interfaces: dict[str, Interface]) -> None:
        self.layers = layers
        self.paths = paths
        self.port = port
        self.timeout = timeout
        self.tools = tools
        self.native = native
        self.interfaces = interfaces
        self.notes: list[str] = []
        self.degraded: list[str] = []          # current layers the sandbox lacks
        self.nft = _optional_binary("nft")
        self.nft_info: NftFileInfo | None = None
        self.nft_source: str | None = None
        self.nft_lines: list[str] = []
        self.nft_handles: dict[tuple[ChainKey, int], int] = {}
        self.nft_candidate_tables: set[tuple[str, str]] = set()
        self.listing = NftListing()
        self.ipt_owned = _iptables_nft_tables()
        self.not_checked: list[_NotChecked] = []
        self.known_interfaces: list[str] = ["lo"]

    # -- plan ---------------------------------------------------------------------------------
    def links(self) -> tuple[list[LinkPlan], list[str]]:
        links: dict[str, LinkPlan] = {}
        lo_addresses: list[str] = []
        for path in self.paths:
            if path.problem or path.dev is None or path.server is None:
                continue
            if path.local:
                lo = self.interfaces.get("lo")
                own = {a for a, _, _ in lo.addresses} if lo else set()
                for address in (path.client, path.server):
                    if address not in own and address not in lo_addresses:
                        lo_addresses.append(address)
                continue
            iface = self.interfaces[path.dev]
            link = links.get(path.dev)
            if link is None:
                link = LinkPlan(path.dev, iface.mtu, [(a, p) for a, p, _ in iface.addresses])
                links[path.dev] = link
            if path.client not in link.clients:
                link.clients.append(path.client)
            if path.server not in link.servers:
                link.servers.append(path.server)
        self.known_interfaces = ["lo", *links]
        return list(links.values()), lo_addresses

    # -- loading --------------------------------------------------------------------------------
    def load_current(self, sandbox: Sandbox) -> None:
        for tool in self.tools:
            if not parse_save(tool.current.decode(errors="replace")):
                continue
            result = sandbox.srv_run([tool.restore, "-w", "10"], input=tool.current)
            if result.returncode != 0:
                why = result.stderr.decode(errors="replace").strip().splitlines()[:1]
                self.degraded.append(f"the current {tool.label} rules could not be copied into "
                                     f"the sandbox ({'; '.join(why) or 'refused'})")
        if self.native.strip() and self.nft and \
                sandbox.srv_run([self.nft, "-f", "-"], input=self.native).returncode != 0:
                for key, text in split_tables(self.native.decode(errors="replace")).items():
                    result = sandbox.srv_run([self.nft, "-f", "-"], input=(text + "\n").encode())
                    if result.returncode != 0:
                        why = result.stderr.decode(errors="replace").strip().splitlines()[:1]
                        self.degraded.append(
                            f"the current nft table {key} could not be copied into the sandbox "
                            f"({'; '.join(why) or 'refused'})")

    def copy_sysctls(self, sandbox: Sandbox) -> None:
        assert sandbox.srv_agent is not None
        for name in _SYSCTLS:
            try:
                value = Path("/proc/sys/net", name).read_text().strip()
            except OSError:
                continue
            sandbox.srv_agent.request({"op": "sysctl", "name": name, "value": value})

    def load_candidate(self, sandbox: Sandbox) -> str | None:
        """Switch the sandbox to the candidate, as `fwsafe apply` would; None or the error."""
        for tool in self.tools:
            if tool.candidate is None:
                continue
            content, source = tool.candidate
            result = sandbox.srv_run([tool.restore, "-w", "10"], input=content)
            if result.returncode != 0:
                # `iptables-restore --test` (nf_tables) lets some errors through, such as a
                # jump to a chain that does not exist; the real load on a copy of this host's
                # firewall is the kernel's answer: apply would be refused the same way.
                message, line = describe_restore_error(
                    result.stderr.decode(errors="replace"), content, source)
                raise InvalidRulesError(
                    message, path=source, line=line,
                    hint="refused when loaded for real in the check sandbox, on a copy of this "
                         "host's current firewall; nothing was changed")
        if "nft" in self.layers:
            content, source = self.layers["nft"]
            assert self.nft is not None
            result = sandbox.srv_run([self.nft, "--echo", "--handle", "-f", "-"], input=content)
            if result.returncode != 0:
                message, _ = describe_nft_error(result.stderr.decode(errors="replace"), content,
                                                source)
                return f"nft refused {source} in the sandbox: {message}"
            text = content.decode(errors="replace")
            self.nft_source = source
            self.nft_lines = text.splitlines()
            self.nft_info = scan_nft_file(text)
            self.nft_handles = map_nft_handles(
                self.nft_info, parse_nft_echo(result.stdout.decode(errors="replace")))
            self.nft_candidate_tables = {(r.chain[0], r.chain[1]) for r in self.nft_info.rules}
            self.nft_candidate_tables |= {(c[0], c[1]) for c in self.nft_info.policies}
        return None

    # -- reading the sandbox ----------------------------------------------------------------------
    def snapshot(self, sandbox: Sandbox, tool: IptTool) -> SavedTables:
        result = sandbox.srv_run([tool.save, "-c"], timeout=120)
        if result.returncode != 0:
            raise SandboxError(f"{tool.save} -c failed in the sandbox: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return parse_save(result.stdout.decode(errors="replace"))

    def read_state(self, sandbox: Sandbox) -> None:
        for tool in self.tools:
            tool.snapshot = self.snapshot(sandbox, tool)
        if self.nft:
            # only the native tables: iptables-nft's own are read through iptables-save
            tables = sandbox.srv_run([self.nft, "-j", "list", "tables"], timeout=60)
            texts = []
            for item in json.loads(tables.stdout or b"{}").get("nftables", []) \
                    if tables.returncode == 0 else []:
                table = item.get("table")
                if not table or (table["family"], table["name"]) in self.ipt_owned:
                    continue
                listed = sandbox.srv_run([self.nft, "-a", "list", "table", table["family"],
                                          table["name"]], timeout=120)
                if listed.returncode == 0:
                    texts.append(listed.stdout.decode(errors="replace"))
            self.listing = parse_nft_listing("".join(texts))
        self.find_not_checked()

    def native_in_sandbox(self) -> list[tuple[str, str]]:
        return [t for t in self.listing.tables
                if t not in self.ipt_owned and t[1] != TRACE_TABLE]

    # -- naming rules ---------------------------------------------------------------------------
    def ipt_where(self, tool: IptTool, table: str, chain: str, index: int | None) -> str:
        saved = tool.snapshot.get(table, {}).get(chain)
        if tool.fmap is not None and table in tool.fmap.tables:
            fmap = tool.fmap
            if index is None:
                line = fmap.policy_line(table, chain)
                if line:
                    return f"{fmap.source}:{line}: `{fmap.text(line)}` (chain policy)"
                return f"{fmap.source}: chain {chain} of table {table}: policy DROP"
            count = len(saved.rules) if saved else None
            line = fmap.rule_line(table, chain, index, count)
            if line:
                return f"{fmap.source}:{line}: `{fmap.text(line)}`"
            text = saved.rules[index - 1].text if saved and index <= len(saved.rules) else "?"
            return f"{fmap.source} (table {table}, rule {index} of chain {chain}): `{text}`"
        origin = f"current {tool.label} rules (table {table}, not replaced by the candidate)"
        if index is None:
            return f"{origin}: `:{chain} DROP` (chain policy)"
        text = saved.rules[index - 1].text if saved and index <= len(saved.rules) else "?"
        return f"{origin}: `{text}`"

    def nft_where(self, chain: ChainKey, handle: int | None) -> str:
        fam, table, name = chain
        listed = self.listing.chains.get(chain)
        if handle is None:
            line = None
            if self.nft_info is not None and (fam, table) in self.nft_candidate_tables:
                line = self.nft_info.policies.get(chain)
            if line and self.nft_source:
                return (f"{self.nft_source}:{line}: `{self._nft_line(line)}` (policy of chain "
                        f"{name})")
            origin = self.nft_source if (fam, table) in self.nft_candidate_tables \
                else "current nft rules"
            return f"{origin} (table {fam} {table}): policy {listed.policy if listed else 'drop'} " \
                   f"of chain {name}"
        line = self.nft_handles.get((chain, handle))
        if line and self.nft_source:
            return f"{self.nft_source}:{line}: `{self._nft_line(line)}`"
        text = next((r.text for r in listed.rules if r.handle == handle), "?") if listed else "?"
        if (fam, table) in self.nft_candidate_tables and self.nft_source:
            return f"{self.nft_source} (table {fam} {table}, chain {name}): `{text}`"
        return f"current nft rules (table {fam} {table}, chain {name}): `{text}`"

    def _nft_line(self, line: int) -> str:
        return self.nft_lines[line - 1].strip() if 0 < line <= len(self.nft_lines) else ""

    # -- what the sandbox cannot reproduce ------------------------------------------------------
    def find_not_checked(self) -> None:
        found: list[_NotChecked] = []
        for t_index, tool in enumerate(self.tools):
            tables = tool.snapshot
            for table, chain in sorted(reachable_chains(tables)):
                for rule in tables[table][chain].rules:
                    reasons = ipt_unreproducible(rule, self.known_interfaces)
                    if not reasons:
                        continue
                    found.append(_NotChecked(
                        self.ipt_where(tool, table, chain, rule.index), reasons,
                        ipt_interface_only(reasons), ipt_excludes_tcp(rule, tool.family),
                        tool.family, ipt_key=(t_index, table, chain, rule.index)))
        skip = self.ipt_owned | {(f, n) for f, n in self.listing.tables if n == TRACE_TABLE}
        for key in sorted(nft_reachable(self.listing, skip)):
            listed = self.listing.chains[key]
            for position, nft_rule in enumerate(listed.rules, start=1):
                reasons = nft_unreproducible(nft_rule, key, self.listing, self.known_interfaces)
                if not reasons:
                    continue
                family = {"ip": 4, "ip6": 6}.get(key[0])
                found.append(_NotChecked(
                    self.nft_where(key, nft_rule.handle), reasons,
                    all(r.startswith("interface ") for r in reasons), nft_excludes_tcp(nft_rule),
                    family, nft_key=(key, position)))
        self.not_checked = found

    # -- attempts -------------------------------------------------------------------------------
    def attempt(self, sandbox: Sandbox, path: ClientPath, request: dict[str, Any]) -> _Attempt:
        agent = sandbox.srv_agent if path.local else sandbox.cli_agent
        assert agent is not None
        family_tools = [(i, t) for i, t in enumerate(self.tools) if t.family == path.family]
        answer = agent.request(request, wait=self.timeout + 10)
        culprits: list[str] = []
        relevant: list[str] = []
        met: set[tuple[int, str, str, int]] = set()
        for t_index, tool in family_tools:
            after = self.snapshot(sandbox, tool)
            deltas = counter_delta(tool.snapshot, after)
            tool.snapshot = after
            if not answer.get("ok"):
                for drop in counted_drops(after, deltas):
                    where = self.ipt_where(tool, drop.table, drop.chain, drop.index)
                    culprits.append(f"{where} (kernel counter: {drop.packets} packet(s))")
            met |= {(t_index, *k) for k in evaluated_rules(after, deltas)}
        events: list[TraceEvent] = []
        if sandbox.trace is not None and sandbox.srv_agent is not None:
            events = self._trace_events(sandbox.trace.sync(sandbox.srv_agent), sandbox)
            if not answer.get("ok"):
                culprits += self._trace_culprits(events)
        nft_met = self._nft_met(events)
        for item in self.not_checked:
            if item.interface_only or item.excludes_tcp:
                continue
            if item.family is not None and item.family != path.family:
                continue
            if (item.ipt_key and item.ipt_key in met) or (item.nft_key and item.nft_key in nft_met):
                relevant.append(item.text())
        return _Attempt(bool(answer.get("ok")), answer.get("error"), culprits, relevant)

    def _trace_events(self, lines: list[str], sandbox: Sandbox) -> list[TraceEvent]:
        assert sandbox.trace is not None
        events = [e for e in (parse_trace_line(line) for line in lines) if e is not None]
        canaries = set()
        for event in events:
            if event.kind == "packet":
                m = re.search(r"udp dport (\d+)", event.text)
                if m and int(m.group(1)) in sandbox.trace.canary_ports:
                    canaries.add(event.trace_id)
        skip = self.ipt_owned
        return [e for e in events if e.trace_id not in canaries
                and (e.chain[0], e.chain[1]) not in skip and e.chain[1] != TRACE_TABLE]

    def _trace_culprits(self, events: list[TraceEvent]) -> list[str]:
        seen: list[str] = []
        for event in events:
            if event.verdict not in NFT_DROP_VERDICTS:
                continue
            where = self.nft_where(event.chain, event.handle if event.kind == "rule" else None)
            where += " (nft trace: verdict " + event.verdict + ")"
            if where not in seen:
                seen.append(where)
        return seen

    def _nft_met(self, events: list[TraceEvent]) -> set[tuple[ChainKey, int]]:
        by_chain: dict[ChainKey, list[TraceEvent]] = {}
        for event in events:
            by_chain.setdefault(event.chain, []).append(event)
        met: set[tuple[ChainKey, int]] = set()
        for key, chain_events in by_chain.items():
            chain = self.listing.chains.get(key)
            if chain is None:
                continue
            bound = len(chain.rules)
            terminal = [chain.position(e.handle) for e in chain_events
                        if e.kind == "rule" and e.handle is not None
                        and e.verdict in NFT_TERMINAL_VERDICTS]
            positions = [p for p in terminal if p is not None]
            if positions and not any(e.kind == "policy" for e in chain_events):
                bound = max(positions)
            met |= {(key, i) for i in range(1, bound + 1)}
        return met

    def diagnose_current(self, sandbox: Sandbox, family: int) -> list[str]:
        """Why a connection could not be opened under the current rules (counters since load)."""
        culprits = []
        for tool in self.tools:
            if tool.family != family:
                continue
            after = self.snapshot(sandbox, tool)
            for drop in counted_drops(after, counter_delta({}, after)):
                where = self.ipt_where(tool, drop.table, drop.chain, drop.index)
                culprits.append(f"{where} ({drop.packets} packet(s))")
        return culprits


def _endpoint(address: str | None, port: int) -> str:
    return f"[{address}]:{port}" if address and ":" in address else f"{address}:{port}"


def _optional_binary(name: str) -> str | None:
    try:
        return require_binary(name)
    except EnvironmentProblem:
        return None


def _downgrade(verdict: Verdict, relevant: list[str], degraded: list[str]) -> Verdict:
    """A path the sandbox let through is only safe if nothing it cannot reproduce was met."""
    if verdict.ok is not True or not (relevant or degraded):
        return verdict
    reasons = []
    if relevant:
        reasons.append("it met rules whose outcome the sandbox cannot reproduce: "
                       + " | ".join(relevant))
    if degraded:
        reasons.append("; ".join(degraded))
    verdict.ok = None
    verdict.detail += "; but NOT checked: " + "; ".join(reasons)
    return verdict


def _culprit_fields(culprits: list[str]) -> tuple[str | None, str]:
    if not culprits:
        return None, ("; no DROP/REJECT rule or DROP policy counted the lost packets "
                      "(see the nat table, routing or a layer the sandbox lacks)")
    extra = f"; also: {' | '.join(culprits[1:])}" if len(culprits) > 1 else ""
    return culprits[0], extra


def predict(layers: dict[str, tuple[bytes, str]], *, clients: list[str], port: int,
            servers: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
            validate: bool = True) -> CheckReport:
    """Predict whether applying `layers` would lock the management clients out.

    `layers` maps "ipv4" / "ipv6" (iptables-save files) and "nft" (an nftables file) to
    (content, source file name). `clients` are the management clients' addresses, `port` the
    management (SSH) port. Optional: `servers` maps a client to the local address it connects
    to (default: the source address the host uses towards it); `timeout` is how long one
    connection attempt may take in the sandbox; `validate=False` skips the validation (when
    the caller has validated already).

    Raises InvalidRulesError (exit 3) for rules the backend refuses, UsageError (exit 2) for
    bad arguments, EnvironmentProblem when the sandbox cannot be built. Never raises for a
    lockout: the report says so (`lockout`); the caller raises LockoutPredicted.
    """
    started = time.monotonic()
    unknown = sorted(set(layers) - set(LAYERS))
    if unknown or not layers:
        raise UsageError(f"layers must be some of {', '.join(LAYERS)}; got "
                         f"{', '.join(sorted(layers)) or 'none'}")
    if not clients:
        raise UsageError("no management client known: give --client IP")
    if not 0 < port < 65536:
        raise UsageError(f"invalid port {port}")
    try:
        client_list = [normalize_address(c) for c in clients]
    except ValueError as exc:
        raise UsageError(f"not an IP address: {exc}") from exc
    hints = {normalize_address(k): normalize_address(v) for k, v in (servers or {}).items()}
    if os.geteuid() != 0:
        raise EnvironmentProblem("fwsafe check must run as root (it builds network namespaces)",
                                 hint="try: sudo fwsafe check ...")

    report = CheckReport(clients=client_list, port=port,
                         layers={name: layers[name][1] for name in LAYERS if name in layers})
    with _signals_raise():
        try:
            sandbox = Sandbox(f"{os.getpid()}")
            try:
                if validate:
                    _validate(layers)
                _run(layers, client_list, hints, port, timeout, report, sandbox)
            finally:
                with _signals_held():
                    sandbox.close()
        except _Terminated as exc:
            raise FwsafeError(f"interrupted by signal {exc.signum}; the sandbox was removed and "
                              "nothing was changed") from exc
    report.duration_s = time.monotonic() - started
    return report


def _run(layers: Mapping[str, tuple[bytes, str]], clients: list[str], hints: dict[str, str],
         port: int, timeout: float, report: CheckReport, sandbox: Sandbox) -> None:
    if "nft" in layers:
        require_binary("nft")
    interfaces = _interfaces()
    paths = [_client_path(c, hints.get(c), interfaces) for c in clients]
    tools, native = _current_state(layers)
    checker = _Checker(layers, paths, port, timeout, tools, native, interfaces)
    links, lo_addresses = checker.links()
    testable = [p for p in paths if p.problem is None]

    verdicts: dict[tuple[str, str], Verdict] = {}

    def path_name(kind: str, path: ClientPath) -> str:
        return f"{kind} tcp {path.client} -> :{port} ({path.family_label})"

    for path in paths:
        if path.problem:
            for kind in ("new", "established"):
                verdicts[(kind, path.client)] = Verdict(path_name(kind, path), None, None,
                                                        f"not checked: {path.problem}")

    if testable:
        try:
            sandbox.build(links, lo_addresses)
            sandbox.start_agents(client_side=any(not p.local for p in testable))
            assert sandbox.srv_agent is not None
            listening = sandbox.srv_agent.request({"op": "listen", "port": port})
            if not listening.get("ok"):
                raise SandboxError(str(listening.get("error")))
            checker.copy_sysctls(sandbox)
            checker.load_current(sandbox)
            _check_paths(checker, sandbox, testable, verdicts, path_name)
        except SandboxError as exc:
            raise EnvironmentProblem(f"the check sandbox failed: {exc}") from exc
        report.not_checked = [item.text() for item in checker.not_checked]
        report.notes += checker.degraded + checker.notes

    for path in paths:
        for kind in ("new", "established"):
            verdict = verdicts.get((kind, path.client))
            if verdict is not None:
                report.verdicts.append(verdict)
    have = {p.family for p in paths}
    wanted = _host_families(interfaces)
    if "nft" in layers:
        wanted |= {4, 6}
    wanted |= {4 if name == "ipv4" else 6 for name in layers if name in ("ipv4", "ipv6")}
    for family in sorted(wanted - have):
        report.verdicts.append(Verdict(
            f"tcp ? -> :{port} (ipv{family})", None, None,
            f"not checked: no IPv{family} client known; give --client with the IPv{family} "
            "address you connect from"))
    report.lockout = any(v.ok is False for v in report.verdicts)


def _check_paths(checker: _Checker, sandbox: Sandbox, paths: list[ClientPath],
                 verdicts: dict[tuple[str, str], Verdict],
                 path_name: Callable[[str, ClientPath], str]) -> None:
    timeout = checker.timeout
    opened: dict[str, dict[str, Any]] = {}
    for number, path in enumerate(paths):
        agent = sandbox.srv_agent if path.local else sandbox.cli_agent
        assert agent is not None
        opened[path.client] = agent.request(
            {"op": "open", "id": f"e{number}", "src": path.client, "dst": path.server,
             "port": checker.port, "timeout": timeout}, wait=timeout + 10)
    blocked_now: dict[int, list[str]] = {}
    for family in {p.family for p in paths if not opened[p.client].get("ok")}:
        blocked_now[family] = checker.diagnose_current(sandbox, family)

    problem = checker.load_candidate(sandbox)
    if problem is not None:
        for path in paths:
            for kind in ("new", "established"):
                verdicts[(kind, path.client)] = Verdict(
                    path_name(kind, path), None, None,
                    f"not checked: the sandbox could not load the candidate: {problem}")
        return
    checker.read_state(sandbox)
    if checker.nft and checker.native_in_sandbox():
        try:
            sandbox.start_trace(checker.nft)
        except SandboxError as exc:
            checker.notes.append(f"nft trace is not available ({exc}): rules of nftables tables "
                                 "that drop packets are not named, and nft rules the sandbox "
                                 "cannot reproduce are not weighed against each path")

    for number, path in enumerate(paths):
        name = path_name("established", path)
        first = opened[path.client]
        if not first.get("ok"):
            why = blocked_now.get(path.family) or []
            verdicts[("established", path.client)] = Verdict(
                name, None, why[0] if why else None,
                f"not checked: no connection to {_endpoint(path.server, checker.port)} could be opened "
                f"under the CURRENT rules in the sandbox ({first.get('error')}), so the sandbox "
                "does not reproduce how this client reaches the host now")
            continue
        result = checker.attempt(sandbox, path, {"op": "ping", "id": f"e{number}",
                                                 "timeout": timeout})
        if result.ok:
            verdict = Verdict(name, True, None,
                              f"a connection to {_endpoint(path.server, checker.port)} opened under the "
                              "current rules still carries data after the switch")
        else:
            culprit, extra = _culprit_fields(result.culprits)
            verdict = Verdict(name, False, culprit,
                              f"a connection to {_endpoint(path.server, checker.port)} opened under the "
                              f"current rules stops carrying data after the switch "
                              f"({result.error}){extra}")
        verdicts[("established", path.client)] = _downgrade(verdict, result.relevant,
                                                            checker.degraded)

    for path in paths:
        name = path_name("new", path)
        result = checker.attempt(sandbox, path, {"op": "new", "src": path.client,
                                                 "dst": path.server, "port": checker.port,
                                                 "timeout": timeout})
        if result.ok:
            verdict = Verdict(name, True, None,
                              f"a new connection to {_endpoint(path.server, checker.port)} is accepted")
        else:
            culprit, extra = _culprit_fields(result.culprits)
            verdict = Verdict(name, False, culprit,
                              f"a new connection to {_endpoint(path.server, checker.port)} fails "
                              f"({result.error}){extra}")
        verdicts[("new", path.client)] = _downgrade(verdict, result.relevant, checker.degraded)
