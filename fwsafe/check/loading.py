"""The firewall of the sandbox's server namespace: a copy of the host's current layers, then
the candidate on top, loaded as ``fwsafe apply`` would load it; read back with packet counters
(iptables) and rule handles (nftables) so that the kernel's answers can be named."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fwsafe.backends import NFT_TABLES, first_with
from fwsafe.backends.iptables import describe_restore_error
from fwsafe.backends.iptsave import Tables, has_tables, parse_ruleset
from fwsafe.backends.nftables import describe_nft_error, replaced_tables, split_tables
from fwsafe.check.host import IptTool, iptables_nft_tables
from fwsafe.check.ipt_lines import map_iptables_file
from fwsafe.check.naming import NftCandidate, RuleNamer
from fwsafe.check.nft_listing import parse_nft_listing
from fwsafe.check.prune import (
    AddressSet,
    prune_iptables,
    prune_nft,
    sandbox_addresses,
    unpruned_why,
)
from fwsafe.check.sandbox import TRACE_TABLE, Sandbox, SandboxError
from fwsafe.errors import EnvironmentProblem, InvalidRulesError
from fwsafe.runner import require_binary

__all__ = ["SandboxFirewall"]

_SYSCTLS = ("netfilter/nf_conntrack_tcp_loose", "netfilter/nf_conntrack_tcp_be_liberal")


def _optional_binary(name: str) -> str | None:
    try:
        return require_binary(name)
    except EnvironmentProblem:
        return None


def _first_line(stderr: bytes) -> str:
    return "; ".join(stderr.decode(errors="replace").strip().splitlines()[:1]) or "refused"


class SandboxFirewall:
    """Loads and reads the sandbox's firewall. ``degraded``: current layers the sandbox lacks;
    ``notes``: what the check could not do; ``namer`` names the rules once loaded."""

    def __init__(self, sandbox: Sandbox, layers: Mapping[str, tuple[bytes, str]],
                 tools: list[IptTool], native: bytes) -> None:
        self.sandbox = sandbox
        self.layers = layers
        self.tools = tools
        self.native = native
        self.nft = _optional_binary("nft")
        self.ipt_owned = iptables_nft_tables()
        self.namer = RuleNamer()
        self.degraded: list[str] = []
        self.notes: list[str] = []
        self.addresses: AddressSet | None = None
        self.left_out = 0          # rules not loaded: no sandbox packet can match them
        self.pruning: list[str] = []   # what was loaded whole, and why (`check -v`)

    def prune_to(self, addresses: list[str], interfaces: list[str] | None = None,
                 ports: list[int] | None = None) -> None:
        """Load only the rules a packet with one of ``addresses`` (the sandbox's own) can match
        (fwsafe.check.prune), with the addresses reachable translations rewrite them to, on
        one of ``interfaces`` (the sandbox's; None: any), opening TCP connections to
        ``ports`` only (None: any); nothing is left out when an nft layer translates
        addresses."""
        ipt = [(t.current.decode(errors="replace"), t.family) for t in self.tools]
        ipt += [(t.candidate[0].decode(errors="replace"), t.family) for t in self.tools
                if t.candidate]
        nft = [self.native.decode(errors="replace")]
        candidate = first_with(NFT_TABLES, self.layers)
        if candidate is not None:
            nft.append(self.layers[candidate][0].decode(errors="replace"))
        self.addresses = sandbox_addresses(addresses, ipt, nft, interfaces, ports)
        if self.addresses is None:
            self.pruning.append(unpruned_why(nft))
        elif self.addresses.translated:
            self.pruning.append(
                f"{self.addresses.translated} address(es) that reachable translations (DNAT, "
                "SNAT, ...) lead packets to count as the sandbox's own: rules naming them are "
                "loaded")

    def _ipt(self, tool: IptTool, content: bytes) -> bytes:
        if self.addresses is None:
            return content
        pruned = prune_iptables(content.decode(errors="replace"), self.addresses, tool.family)
        self.left_out += pruned.left_out
        self.pruning += [f"{tool.label} {why}" for why in pruned.whole
                         if f"{tool.label} {why}" not in self.pruning]
        return pruned.text.encode() if pruned.left_out else content

    def _nft(self, content: bytes) -> bytes:
        if self.addresses is None:
            return content
        pruned = prune_nft(content.decode(errors="replace"), self.addresses)
        self.left_out += pruned.left_out
        return pruned.text.encode() if pruned.left_out else content

    # -- loading --------------------------------------------------------------------------------
    def copy_sysctls(self) -> None:
        """The host's conntrack leniency, which decides what an established connection survives."""
        agent = self.sandbox.srv_agent
        assert agent is not None
        for name in _SYSCTLS:
            try:
                value = Path("/proc/sys/net", name).read_text().strip()
            except OSError:
                continue
            agent.request({"op": "sysctl", "name": name, "value": value})

    def load_current(self) -> None:
        """The host's current rules; what the sandbox refuses is noted in ``degraded``."""
        srv_run = self.sandbox.srv_run
        for tool in self.tools:
            if not has_tables(tool.current):
                continue
            result = srv_run([tool.restore, "-w", "10"], input=self._ipt(tool, tool.current))
            if result.returncode != 0:
                self.degraded.append(f"the current {tool.label} rules could not be copied into "
                                     f"the sandbox ({_first_line(result.stderr)})")
        if not (self.native.strip() and self.nft):
            return
        native = self._nft(self.native)
        if srv_run([self.nft, "-f", "-"], input=native).returncode == 0:
            return
        for key, text in split_tables(native.decode(errors="replace")).items():
            result = srv_run([self.nft, "-f", "-"], input=(text + "\n").encode())
            if result.returncode != 0:
                self.degraded.append(f"the current nft table {key} could not be copied into the "
                                     f"sandbox ({_first_line(result.stderr)})")

    def load_candidate(self) -> str | None:
        """Switch the sandbox to the candidate, as `fwsafe apply` would; None or the error."""
        for tool in self.tools:
            if tool.candidate is None:
                continue
            content, source = tool.candidate
            loaded = self._ipt(tool, content)   # the same lines, some perhaps blanked
            tool.fmap = map_iptables_file(loaded.decode(errors="replace"), source)
            result = self.sandbox.srv_run([tool.restore, "-w", "10"], input=loaded)
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
        candidate = first_with(NFT_TABLES, self.layers)
        if candidate is not None:
            content, source = self.layers[candidate]
            assert self.nft is not None
            content = self._nft(content)
            # Tables the file replaces whole are read back (terse: without set elements) for
            # the handles: `nft --echo` prints every element, and overflows at 100k of them.
            whole = replaced_tables(content)
            echo = [] if whole is not None else ["--echo", "--handle"]
            result = self.sandbox.srv_run([self.nft, *echo, "-f", "-"], input=content)
            if result.returncode != 0:
                message, _ = describe_nft_error(result.stderr.decode(errors="replace"), content,
                                                source)
                return f"nft refused {source} in the sandbox: {message}"
            if whole is None:
                self.namer.nft = NftCandidate.loaded(content, source,
                                                     result.stdout.decode(errors="replace"))
            else:
                listed = self._native_listed({tuple(t.split(" ", 1)) for t in whole})
                self.namer.nft = NftCandidate.listed(content, source,
                                                     parse_nft_listing("".join(listed)))
        return None

    def _native_listed(self, only: set[tuple[str, ...]] | None) -> list[str]:
        """The sandbox's native nft tables (`only` those), each as `nft -a` lists it, sets
        without their elements. One `nft -a -t list ruleset`: nft 1.0.6 fetches every set's
        elements for `list tables` and `-t list table` (0.3 s each at 100k), not for this."""
        assert self.nft is not None
        srv_run = self.sandbox.srv_run
        listed = srv_run([self.nft, "-a", "-t", "list", "ruleset"], timeout=120)
        if listed.returncode == 0:
            return [text for key, text in table_blocks(listed.stdout.decode(errors="replace"))
                    if key not in self.ipt_owned and (only is None or key in only)]
        tables = srv_run([self.nft, "-j", "list", "tables"], timeout=60)
        texts = []
        for item in json.loads(tables.stdout or b"{}").get("nftables", []) \
                if tables.returncode == 0 else []:
            table = item.get("table")
            key = (table["family"], table["name"]) if table else None
            if key is None or key in self.ipt_owned or (only is not None and key not in only):
                continue
            result = srv_run([self.nft, "-a", "-t", "list", "table", *key], timeout=120)
            if result.returncode == 0:
                texts.append(result.stdout.decode(errors="replace"))
        return texts


    def start_trace(self) -> None:
        """Trace packets through the native nft tables (if any): that names nft culprits."""
        if not (self.nft and self.native_in_sandbox()):
            return
        try:
            self.sandbox.start_trace(self.nft)
        except SandboxError as exc:
            self.notes.append(f"nft trace is not available ({exc}): rules of nftables tables "
                              "that drop packets are not named, and nft rules the sandbox "
                              "cannot reproduce are not weighed against each path")

    # -- reading --------------------------------------------------------------------------------
    def snapshot(self, tool: IptTool) -> Tables:
        """``tool``'s tables in the sandbox, with packet counters."""
        result = self.sandbox.srv_run([tool.save, "-c"], timeout=120)
        if result.returncode != 0:
            raise SandboxError(f"{tool.save} -c failed in the sandbox: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return parse_ruleset(result.stdout.decode(errors="replace"), counters=True)

    def read_state(self) -> None:
        """Every tool's snapshot, and the listing (with handles) of the native nft tables."""
        for tool in self.tools:
            tool.snapshot = self.snapshot(tool)
        if not self.nft or not (self.native.strip() or first_with(NFT_TABLES, self.layers)):
            # No native table was loaded (nor the trace's yet): the listing would render
            # iptables-nft's rules only to drop them (2 s for 100,000 unpruned Docker rules).
            return
        # only the native tables: iptables-nft's own are read through iptables-save
        self.namer.listing = parse_nft_listing("".join(self._native_listed(None)))

    def native_in_sandbox(self) -> list[tuple[str, str]]:
        return [t for t in self.namer.listing.tables
                if t not in self.ipt_owned and t[1] != TRACE_TABLE]


def table_blocks(text: str) -> list[tuple[tuple[str, str], str]]:
    """`nft list ruleset` output -> ((family, name), that table's text), in order."""
    blocks: list[tuple[tuple[str, str], str]] = []
    current: list[str] = []
    key: tuple[str, str] | None = None
    for line in text.splitlines(keepends=True):
        if key is None:
            words = line.split()
            if len(words) > 2 and words[0] == "table":
                key, current = (words[1], words[2]), [line]
            continue
        current.append(line)
        if line.rstrip("\n") == "}":
            blocks.append((key, "".join(current)))
            key = None
    return blocks
