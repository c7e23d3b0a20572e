"""The kernel escape hatch: SSH comes back even when no fwsafe process can run.

The guard reverts at the deadline and its backstop takes over when the guard dies or is stuck;
both are processes. On a host where every process can be frozen or killed at once (memory
pressure, a container without CAP_SYS_RESOURCE, a hung disk), neither runs. So every apply
also loads, with the change, a rule that the kernel itself enforces: at the top of every base
chain that can drop on the hooks SSH packets traverse (prerouting, input, output,
postrouting), in every table of the layers the change can alter, it accepts SSH (sshd's ports;
any state; both directions) from and to the addresses the lockout check protects (the applying
SSH client and `admin_sources`), from the deadline + `hatch_grace` on:

    iptables   -s CLIENT -p tcp -m multiport --dports 22 -m time --datestart 2026-...T...
               -m comment --comment "fwsafe-hatch:TX:OPENS:ID" -j ACCEPT      (UTC)
    nftables   ip saddr { CLIENT } tcp dport { 22 } meta time >= OPENS accept
               comment "fwsafe-hatch:TX:OPENS:ID"                             (Unix time)

Before that moment the rule matches nothing. Confirm and revert remove it (each layer in one
transaction) and read the tables back to prove it gone; extend moves it. It only ever opens
SSH, only for the listed sources; a wall-clock step (NTP) moves the moment it opens, nothing
else (the guard moves it back when it sees one).

Nobody else sees it: every capture of iptables or nft text goes through `strip` (the backends'
`capture`), so snapshots, the merge, the boot files, the history, the rescue tool, `check`,
`diff` and the neighbours' refusal never find it.

The hatch is loaded in the same transaction as a rules-file change (`with_change`: the
`iptables-restore` payload or the `nft -f` script carries it); where that transaction is
refused with it and accepted without it (a kernel without the time match), the change is
loaded alone and the hatch is marked unsupported. A command run under the guard (`ufw ...`)
makes its own transactions: the hatch is put in before the command runs and checked again
(and put back where the command's restore removed it) right after it (`sync`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fwsafe import backends
from fwsafe.backends import IPTABLES_SAVE, NETFILTER, iptsave, layer_has
from fwsafe.ondisk.hatch_rules import (  # how its rules are recognised (and stripped from captures)
    BRIDGE_FAMILY,
    BRIDGE_TABLE,
    MARK,
    is_bridge,
)

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
TOOL_TIMEOUT = 30.0
Log = Callable[[str], None]

# --------------------------------------------------------------------------------------------
# What the hatch is
# --------------------------------------------------------------------------------------------
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


def _v6(layer: str) -> bool:
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


# --------------------------------------------------------------------------------------------
# Loading it with a rules-file change
# --------------------------------------------------------------------------------------------
_RULE = re.compile(r"^-[AI]\s+(\S+)")


def _iptables_block_chains(table: str, lines: Iterable[str]) -> list[str]:
    """The chains of one `*table` block (its lines) that can drop: a policy other than
    ACCEPT, or rules."""
    relevant = IPTABLES_CHAINS.get(table, ())
    dropping: list[str] = []
    for line in lines:
        if line.startswith(":"):
            declared = iptsave.declaration(line)
            if declared and declared[0] in relevant and declared[1] not in (None, "ACCEPT"):
                dropping.append(declared[0])
        else:   # a file saved with `iptables-save -c`: iptables-restore skips the counters
            match = _RULE.match(iptsave.uncounted(line))
            if match and match.group(1) in relevant:
                dropping.append(match.group(1))
    return [c for c in relevant if c in dropping]


def with_iptables_change(payload: bytes, spec: Spec, v6: bool) -> bytes:
    """An iptables-restore payload that also loads the hatch at the top of each chain of its
    tables that can drop (`-I CHAIN 1` right before each COMMIT: atomic with the change)."""
    if not spec.sources(v6):
        return payload
    lines = payload.decode(errors="replace").splitlines()
    before: dict[int, list[str]] = {}   # a COMMIT line's index -> the hatch loaded before it
    for block in iptsave.blocks(lines):
        if block.closed:
            chains = _iptables_block_chains(block.table, (line for _, line in block.body(lines)))
            before[block.end] = [f"-I {chain} 1 {rule}" for chain in chains
                                 for rule in reversed(iptables_rules(spec, v6, chain))]
    out: list[str] = []
    for index, line in enumerate(lines):
        out += before.get(index, ())
        out.append(line)
    return ("\n".join(out) + "\n").encode()


_NFT_TABLE = re.compile(r"^\s*(?:add\s+|create\s+)?table\s+(\S+)\s+([^\s{]+)\s*\{?", re.M)
_NFT_BASE_CHAIN = re.compile(r"type\s+(\w+)\s+hook\s+(\w+)")


def nft_declared_base_chains(text: str) -> list[tuple[str, str, str, str, str]]:
    """(family, table, chain, type, hook) of the base chains an nft script declares, in
    `table X Y { chain Z { type ... hook ...` blocks and `add chain X Y Z { type ... }` lines."""
    found: list[tuple[str, str, str, str, str]] = []
    family = table = chain = ""
    depth = 0
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        single = re.match(r"^(?:add|create)\s+chain\s+(\S+)\s+(\S+)\s+([^\s{]+)\s*\{(.*)\}", line)
        if single:
            hooked = _NFT_BASE_CHAIN.search(single.group(4))
            if hooked:
                found.append((single.group(1), single.group(2), single.group(3),
                              hooked.group(1), hooked.group(2)))
            continue
        opened = re.match(r"^(?:add\s+|create\s+)?table\s+(\S+)\s+([^\s{]+)\s*\{", line)
        if opened and depth == 0:
            family, table = opened.group(1), opened.group(2)
        elif depth == 1:
            named = re.match(r"^chain\s+([^\s{]+)\s*\{", line)
            if named:
                chain = named.group(1)
        elif depth == 2 and chain:
            hooked = _NFT_BASE_CHAIN.search(line)
            if hooked:
                found.append((family, table, chain, hooked.group(1), hooked.group(2)))
        depth += line.count("{") - line.count("}")
        if depth <= 1:
            chain = ""
        depth = max(depth, 0)
    return found


def _nft_live_base_chains(listing: str) -> list[tuple[str, str, str, str, str]]:
    return [(c.family, c.table, c.name, c.type, c.hook) for c in parse_nft(listing)
            if c.hook and not c.owned]   # an owned table refuses the whole script


def with_nft_change(script: bytes, spec: Spec, before: bytes | None) -> bytes:
    """An `nft -f` script that also loads the hatch into the base chains that exist once it has
    run: those it declares, and (unless it flushes the ruleset or deletes their table) those
    of the tables before it. A wrong guess makes nft refuse the whole script: the caller then
    loads the change alone and puts the hatch in afterwards (`sync`)."""
    text = script.decode(errors="replace")
    chains = nft_declared_base_chains(text)
    if not re.search(r"^\s*flush\s+ruleset\b", text, re.M) and before:
        gone = {f"{m.group(2)} {m.group(3)}" for m in re.finditer(
            r"^\s*(delete|destroy)\s+table\s+(\S+)\s+(\S+)", text, re.M)}
        chains += [c for c in _nft_live_base_chains(before.decode(errors="replace"))
                   if f"{c[0]} {c[1]}" not in gone]
    extra: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for family, table, chain, kind, hook in chains:
        if (family, table, chain) in seen or family not in NFT_FAMILIES \
                or kind not in NFT_TYPES or hook not in (*IN_HOOKS, *OUT_HOOKS):
            continue
        seen.add((family, table, chain))
        extra += [f"insert rule {family} {table} {chain} {rule}"
                  for rule in reversed(nft_rules(spec, family, hook))]
    if not extra:
        return script
    return (text.rstrip("\n") + "\n" + "\n".join(extra) + "\n").encode()


def with_change(layer: str, content: bytes, spec: Spec,
                before: Mapping[str, bytes]) -> bytes:
    """`content` (a layer's complete change, as loaded) with the hatch in the same
    transaction; unchanged for layers without one."""
    if layer_has(layer, IPTABLES_SAVE):
        return with_iptables_change(content, spec, _v6(layer))
    if layer == NFT_LAYER:
        return with_nft_change(content, spec, before.get(NFT_LAYER))
    return content


# --------------------------------------------------------------------------------------------
# Reading what is loaded, and making it what it must be
# --------------------------------------------------------------------------------------------
@dataclass
class Chain:
    """A chain the hatch may go in, as listed: its rules, the hatch's among them."""

    family: str        # iptables: the table's layer; nft: the family
    table: str
    name: str
    hook: str = ""     # nft only ("" for a regular chain); iptables: from the chain's name
    type: str = ""
    policy: str = "accept"
    rules: list[str] = field(default_factory=list)        # iptables: rule specs; nft: rule text
    handles: list[int | None] = field(default_factory=list)   # nft: each rule's handle
    owned: bool = False   # nft: its table has `flags owner`: only the program that made it may
    #                       write there (firewalld 2.x's table, NftablesTableOwner=yes)

    def hatch_positions(self) -> list[int]:
        return [i for i, rule in enumerate(self.rules) if f"{MARK}:" in rule]

    def can_drop(self) -> bool:
        others = len(self.rules) - len(self.hatch_positions())
        return others > 0 or self.policy.lower() != "accept"


def parse_iptables(text: str, layer: str) -> list[Chain]:
    """The chains the hatch goes in (by table), from iptables-save output."""
    chains: dict[tuple[str, str], Chain] = {}
    lines = text.splitlines()
    for block in iptsave.blocks(lines):
        table, hooked = block.table, IPTABLES_CHAINS.get(block.table, ())
        for _, line in block.body(lines):
            declared = iptsave.declaration(line) if line.startswith(":") else None
            if declared is not None and declared[0] in hooked:
                name, policy, _ = declared
                chains[(table, name)] = Chain(layer, table, name, hook=name.lower(),
                                              policy=policy or "-")
            elif line.startswith("-A "):
                name, _, spec = line[3:].partition(" ")
                found = chains.get((table, name))
                if found is not None:
                    found.rules.append(spec)
                    found.handles.append(None)
    return list(chains.values())


_NFT_TABLE_LINE = re.compile(r"^table (\S+) (\S+) \{")
_NFT_CHAIN_LINE = re.compile(r"^\tchain (\S+) \{")
_NFT_HANDLE = re.compile(r" # handle (\d+)$")
_NFT_POLICY = re.compile(r"policy (\w+);")
_NFT_TABLE_FLAGS = re.compile(r"^\tflags (\S+)")
OWNED = ("owned by the program that made it (`flags owner`: firewalld 2.x's NftablesTableOwner="
         "yes): nothing else may write there, and its drops stand")


def parse_nft(listing: str) -> list[Chain]:
    """Every chain of `nft -a list ruleset` (or `nft list`) output, with rules and handles."""
    chains: list[Chain] = []
    family = table = ""
    owned = False
    current: Chain | None = None
    for raw in listing.splitlines():
        line = raw.rstrip()
        opened = _NFT_TABLE_LINE.match(line)
        if opened:
            family, table, current, owned = opened.group(1), opened.group(2), None, False
            continue
        flags = _NFT_TABLE_FLAGS.match(line)
        if flags and current is None:
            owned = "owner" in flags.group(1).split(",")
            continue
        chain = _NFT_CHAIN_LINE.match(line)
        if chain:
            current = Chain(family, table, chain.group(1), owned=owned)
            chains.append(current)
            continue
        if current is None:
            continue
        if line == "\t}":
            current = None
            continue
        body = line.strip()
        hooked = _NFT_BASE_CHAIN.search(body)
        if hooked and body.startswith("type "):
            current.type, current.hook = hooked.group(1), hooked.group(2)
            policy = _NFT_POLICY.search(body)
            current.policy = policy.group(1) if policy else "accept"
            continue
        if not body or body.startswith("#"):
            continue
        handle = _NFT_HANDLE.search(body)
        current.rules.append(_NFT_HANDLE.sub("", body))
        current.handles.append(int(handle.group(1)) if handle else None)
    return chains


def _wanted(chain: Chain, spec: Spec | None, layer: str) -> list[str]:
    """The hatch rules `chain` must start with (none: it must hold none, or it cannot: its
    table is owned, see `_owned_tables`)."""
    if spec is None or not chain.can_drop() or chain.owned:
        return []
    if layer == NFT_LAYER:
        if chain.family not in NFT_FAMILIES or chain.type not in NFT_TYPES \
                or chain.hook not in (*IN_HOOKS, *OUT_HOOKS):
            return []
        return nft_rules(spec, chain.family, chain.hook)
    return iptables_rules(spec, _v6(layer), chain.name)


def _owned_tables(chains: Sequence[Chain], spec: Spec | None, layer: str) -> list[str]:
    """The owned tables (`flags owner`) with a chain that would need the hatch: it cannot be
    put there, and what they drop the kernel drops (an accept in another table does not
    override it)."""
    return sorted({f"{c.family} {c.table}" for c in chains
                   if c.owned and _wanted(replace(c, owned=False), spec, layer)})


def _in_place(chain: Chain, wanted: list[str], tag: str) -> bool:
    positions = chain.hatch_positions()
    if len(positions) != len(wanted):
        return False
    return positions == list(range(len(wanted))) and all(
        tag in chain.rules[i] for i in positions)


def _iptables_tool(layer: str) -> tuple[str, str]:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.backends.iptables import FAMILIES

    family = FAMILIES[layer]
    return family.save, family.restore


def _nft_skipped(family: str, table: str) -> bool:
    """A table of iptables-nft (the iptables layers hold its hatch), or the hatch's own lo
    bridge (planned on its own: `bridge_plan`)."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.backends.iptables import uses_nf_tables
    from fwsafe.backends.iptsave import BUILTIN_CHAINS

    if is_bridge(family, table):
        return True
    return family in ("ip", "ip6") and table in BUILTIN_CHAINS and uses_nf_tables()


# --------------------------------------------------------------------------------------------
# The lo bridge: past a table the hatch cannot be put in
# --------------------------------------------------------------------------------------------
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
_NFT_DEVICE = re.compile(r'hook\s+ingress\s+device\s+"?([^"\s;]+)"?')
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


def bridge_rules(spec: Spec, ipv4: bool = True) -> list[str]:
    """The lo bridge's rules for one ingress chain: only packets for this host (`fib daddr
    type local`: not SSH to the VMs, containers or networks it forwards to); IPv4 only where
    `ipv4` (not with strict rp_filter: there lo would drop what it loops, every packet of the
    admin's IPv4 SSH sessions too)."""
    loop = "fib daddr type local ether daddr set 00:00:00:00:00:00 fwd to \"lo\""
    return [f"{match} {loop} comment \"{spec.tag}\""
            for match in _nft_matches(spec, BRIDGE_FAMILY, inbound=True)
            if ipv4 or not match.startswith("ip ")]


def read_bridge() -> dict[str, list[str]] | None:
    """The lo bridge as loaded: {device: its chain's rules}; None when there is none."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.backends import nflist

    known = nflist.kernel_tables()   # one netlink dump: no nft started where there is none
    if known is not None and (BRIDGE_FAMILY, BRIDGE_TABLE) not in known:
        return None
    code, out, err = _run(["nft", "list", "table", BRIDGE_FAMILY, BRIDGE_TABLE])
    if code != 0:
        if "No such file or directory" in err:
            return None
        raise HatchError(f"nft list table {BRIDGE_FAMILY} {BRIDGE_TABLE} failed: {err}")
    chains: dict[str, list[str]] = {}
    rules: list[str] | None = None
    for line in out.splitlines():
        body = line.strip()
        device = _NFT_DEVICE.search(body)
        if device and body.startswith("type "):
            rules = chains.setdefault(device.group(1), [])
        elif rules is not None and body and body != "}" and not body.startswith("chain "):
            rules.append(body)
    return chains


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


def _run(argv: list[str], payload: bytes | None = None) -> tuple[int, str, str]:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.runner import require_binary, run_persistently

    result = run_persistently([require_binary(argv[0]), *argv[1:]], input=payload,
                              timeout=TOOL_TIMEOUT)
    return (result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace").strip())


def read_chains(layer: str) -> list[Chain]:
    """The chains of `layer` the hatch can be in, as loaded now (its rules included). Where
    the kernel can list its nf_tables tables (one netlink dump), only the tables the hatch can
    be in are read: not kube-proxy's nat table of 50,000 rules (seconds of iptables-save), nor
    iptables-nft's tables through nft."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.backends import nflist

    known = nflist.kernel_tables()
    if layer == NFT_LAYER:
        if known is None:
            code, out, err = _run(["nft", "-a", "-t", "list", "ruleset"])
            if code != 0:
                raise HatchError(f"nft list ruleset failed: {err}")
            return [c for c in parse_nft(out) if not _nft_skipped(c.family, c.table)]
        chains: list[Chain] = []
        for family, table in known:
            if _nft_skipped(family, table):
                continue
            # -t: sets without their elements (a set of 100k: a second to print and parse)
            code, out, err = _run(["nft", "-a", "-t", "list", "table", family, table])
            if code != 0 and "No such file or directory" not in err:   # (deleted meanwhile)
                raise HatchError(f"nft list table {family} {table} failed: {err}")
            chains += parse_nft(out) if code == 0 else []
        return chains
    save, _ = _iptables_tool(layer)
    tables = _iptables_tables(layer, known)
    out = ""
    for argv in [[save]] if tables is None else [[save, "-t", t] for t in tables]:
        code, text, err = _run(argv)
        if code != 0:
            raise HatchError(f"{save} failed: {err}")
        out += text
    return parse_iptables(out, layer)


def _iptables_tables(layer: str, known: Sequence[tuple[str, str]] | None) -> list[str] | None:
    """The tables of iptables layer `layer` the hatch can be in that exist (`known`: the
    kernel's nf_tables tables); None: read every table (legacy iptables, or no list). Only
    existing ones: `iptables-save -t raw` shows a raw table that does not exist, and the hatch
    would make it."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.backends.iptables import FAMILIES, uses_nf_tables

    family = FAMILIES[layer]
    if known is None or family.legacy or not uses_nf_tables(family.save):
        return None
    return [t for f, t in known if f == family.nft_family and t in IPTABLES_CHAINS]


class HatchError(Exception):
    """The hatch could not be loaded, moved or removed (the tool's own message)."""


def plan_layer(layer: str, chains: Sequence[Chain], spec: Spec | None) -> str:
    """The one transaction that makes `layer`'s hatch rules those of `spec` ("" when they
    are): an iptables-restore --noflush payload, or an nft script."""
    tag = spec.tag if spec is not None else ""
    if layer == NFT_LAYER:
        lines: list[str] = []
        for chain in chains:
            wanted = _wanted(chain, spec, layer)
            if _in_place(chain, wanted, tag):
                continue
            where = f"{chain.family} {chain.table} {chain.name}"
            lines += [f"delete rule {where} handle {chain.handles[i]}"
                      for i in chain.hatch_positions() if chain.handles[i] is not None]
            lines += [f"insert rule {where} {rule}" for rule in reversed(wanted)]
        return "".join(line + "\n" for line in lines)
    tables: dict[str, list[str]] = {}
    for chain in chains:
        wanted = _wanted(chain, spec, layer)
        if _in_place(chain, wanted, tag):
            continue
        block = tables.setdefault(chain.table, [])
        block += [f"-D {chain.name} {chain.rules[i]}" for i in chain.hatch_positions()]
        block += [f"-I {chain.name} 1 {rule}" for rule in reversed(wanted)]
    return "".join(iptsave.table_text(table, lines) for table, lines in tables.items() if lines)


def sync_layer(layer: str, spec: Spec | None, log: Log | None = None,
               commits: list[int] | None = None) -> str:
    """Make the hatch rules of `layer` exactly those of `spec` (None: remove them all), in one
    transaction, and read the layer back to prove it. Returns what is loaded now: "loaded",
    "none" (no chain there can drop, or no source of this family), "removed"; followed by
    "; not in TABLES (...)" where owned tables would need it (`_owned_tables`). Raises
    HatchError with the tool's message. `commits`: each load that worked adds its nf_tables
    commits (one per iptables table, one for nft); one that failed adds -1 (not known)."""
    last = "the hatch does not hold"
    bridge_refused = False   # nft refused the lo bridge: the hatch is loaded without it
    for attempt in range(4):
        chains = read_chains(layer)
        payload = plan_layer(layer, chains, spec)
        owned = _owned_tables(chains, spec, layer)
        bridged = ipv4_left_out = False
        bridge = ""
        if layer == NFT_LAYER:
            devices = bridge_devices() if owned and not bridge_refused else []
            ipv4 = not (devices and spec is not None and spec.sources4 and strict_rp_filter())
            ipv4_left_out = not ipv4
            bridged = bool(devices and spec is not None and bridge_rules(spec, ipv4))
            bridge = bridge_plan(spec if owned else None, read_bridge(), devices, ipv4)
        if not (payload + bridge):
            wanted = any(_wanted(c, spec, layer) for c in chains) or bridged
            state = "loaded" if wanted else ("none" if spec is not None else "removed")
            return state + bridge_state(owned, bridged, ipv4_left_out)
        if attempt == 3:
            break
        if layer == NFT_LAYER:
            code, _, err = _run(["nft", "-f", "-"], (payload + bridge).encode())
            if code != 0 and bridge and not bridge_refused:
                # the bridge may be what nft refuses (no nft_fwd_netdev, a device gone): the
                # hatch in the tables must not go with it
                bridge_refused = True
                if log is not None:
                    log(f"hatch: nft refused the lo bridge with it ({err or code}): "
                        "loading the hatch without the bridge")
        else:
            code, _, err = _run([_iptables_tool(layer)[1], "--noflush", "-w", "5"],
                                payload.encode())
        if commits is not None:
            commits.append(-1 if code != 0 else 1 if layer == NFT_LAYER
                           else len(iptsave.blocks(payload.splitlines())))
        if code != 0:
            last = err or f"exit {code}"
            if log is not None:
                log(f"hatch: {layer}: the tool refused (attempt {attempt + 1}): {last}")
    raise HatchError(f"{layer}: {last}")


def sync(spec: Spec | None, layers: Iterable[str], log: Log | None = None,
         commits: list[int] | None = None) -> dict[str, str]:
    """`sync_layer` for each layer that can hold the hatch; {layer: state or "error: ..."}.
    Never raises: a layer that fails is reported, the others are still done."""
    states: dict[str, str] = {}
    for layer in layers:
        if not layer_has(layer, NETFILTER):
            continue
        try:
            states[layer] = sync_layer(layer, spec, log, commits)
        except Exception as exc:  # noqa: BLE001 - reported per layer; the caller retries
            states[layer] = f"error: {exc}"
    return states


def available_layers() -> list[str]:
    """The layers of this system that can hold a hatch (for removing every last one)."""
    return [name for name in backends.available_layers() if layer_has(name, NETFILTER)]


def may_be_loaded(info: Mapping[str, Any] | None) -> bool:
    """A transaction's hatch (its record's `hatch`) may still be in the kernel: armed, or its
    removal begun and not proved."""
    return (info or {}).get("state") in ("armed", "removing")


def describe(info: Mapping[str, Any] | None, final: bool = False) -> str | None:
    """One line for `fwsafe status` (`final`: the transaction is over)."""
    if not info:
        return None
    state = info.get("state")
    if final and may_be_loaded(info):
        return ("hatch: STILL LOADED although the transaction is over (its guard ended before "
                "removing it): the next `fwsafe apply` removes it")
    if state == "off":
        return f"hatch: none ({info.get('why', 'off')})"
    layers = info.get("layers") or {}
    failed = {k: v for k, v in layers.items() if str(v).startswith("error")}
    where = ", ".join(k for k, v in layers.items() if str(v).split(";")[0] == "loaded") \
        or "no layer"
    opens = info.get("opens")
    when = time.strftime("%H:%M:%S", time.localtime(opens)) if opens else "?"
    who = ", ".join([*info.get("sources4", []), *info.get("sources6", [])])
    ports = ",".join(str(p) for p in info.get("ports", []))
    if state == "removed":
        text = "hatch: removed (checked: none left)"
    elif state in ("removing", "armed"):
        verb = "still loaded, being removed" if state == "removing" else "armed"
        text = (f"hatch: {verb}: SSH (port {ports}) from {who} is let in by the kernel from "
                f"{when} (deadline + {info.get('grace', '?')} s) in {where}")
    else:
        text = f"hatch: {state}"
    if failed:
        text += "; NOT loaded in " + "; ".join(f"{k} ({v[7:]})" for k, v in failed.items())
    owned = [str(v).split("; not in ", 1)[1].split(" (", 1)[0] for v in layers.values()
             if "; not in " in str(v)]
    if owned and state in ("removing", "armed"):
        text += f"; it CANNOT open SSH through {', '.join(owned)} ({OWNED})"
    bridged = [str(v).split(f"; {BRIDGE_PASSED} ", 1)[1] for v in layers.values()
               if f"; {BRIDGE_PASSED} " in str(v)]
    if bridged and state in ("removing", "armed"):
        text += (f"; past {', '.join(bridged)} (owned by another program) it loops SSH "
                 f"through lo, which that table accepts")
    return text


# --------------------------------------------------------------------------------------------
# Keeping it: the guard's side, and the way back's
# --------------------------------------------------------------------------------------------
def removed(record: Any, log: Log | None = None) -> bool:
    """Remove every hatch rule (this transaction's and any left behind) from every layer of
    this system, and prove it by reading them back; `record.hatch` says how it went. True when
    none is left."""
    states = sync(None, available_layers(), log)
    failed = any(state.startswith("error") for state in states.values())
    if record.hatch or failed:
        info = dict(record.hatch or {})
        info["layers"] = states
        info["state"] = "removing" if failed else (
            "removed" if info.get("state") != "off" else "off")
        record.hatch = info
    return not failed


class Keeper:
    """The guard's hatch: armed with the change, moved with the deadline, removed at the end."""

    def __init__(self, record: Any, log: Log) -> None:
        self.record = record
        self.log = log
        self.plan = plan_from_options(record.options)
        self.spec: Spec | None = None
        self.dirty = False      # a load or move that did not work yet: tried again
        self.removing = False   # the transaction ended: the hatch must go
        self.retry_at = 0.0

    def arm(self, deadline: float) -> Spec | None:
        """The hatch for the wall-clock `deadline` (None: no hatch for this transaction)."""
        wanted = self.record.options.get("hatch")
        if self.plan is None:
            why = wanted.get("why") if isinstance(wanted, dict) else None
            self.record.hatch = {"state": "off", "why": why or "not asked for"}
            return None
        self.spec = spec_for(self.record.id, self.plan, deadline)
        self.record.hatch = {
            "state": "armed", "opens": self.spec.opens, "grace": self.plan.get("grace"),
            "sources4": list(self.spec.sources4), "sources6": list(self.spec.sources6),
            "ports": list(self.spec.ports), "layers": {}}
        return self.spec

    def load(self, layers: Sequence[str]) -> int | None:
        """Put the hatch where it belongs in `layers` (and nowhere else), proved by reading.
        Returns the nf_tables commits made (None: not known, a load failed)."""
        if self.spec is None or self.removing:
            return 0
        commits: list[int] = []
        states = sync(self.spec, layers, self.log, commits)
        info = dict(self.record.hatch or {})
        info.update(layers=states, opens=self.spec.opens)
        self.record.hatch = info
        self.dirty = any(s.startswith("error") for s in states.values())
        self.log(f"hatch: SSH from {', '.join([*self.spec.sources4, *self.spec.sources6])} "
                 f"opens at {time.strftime('%H:%M:%S', time.localtime(self.spec.opens))}: "
                 + ", ".join(f"{k} {v}" for k, v in states.items()))
        return None if self.dirty or -1 in commits else sum(commits)

    def retime(self, deadline: float) -> bool:
        """Make the hatch open at `deadline` + grace (a new deadline, or the wall clock was
        stepped); True when that is another moment than the one loaded (2 s or more)."""
        if self.spec is None or self.removing or self.plan is None:
            return False
        wanted = spec_for(self.record.id, self.plan, deadline)
        if abs(wanted.opens - self.spec.opens) < 2:
            return False
        self.spec = wanted
        return True

    def follow(self, deadline: float, layers: Sequence[str]) -> None:
        """The deadline moved (extend) or the wall clock was stepped: move the hatch (one
        transaction per layer); a load that failed is tried again (at most every 5 s)."""
        moved = self.retime(deadline)
        if moved or (self.dirty and time.monotonic() >= self.retry_at):
            self.retry_at = time.monotonic() + 5.0
            self.load(layers)

    def remove(self) -> bool:
        """The transaction ended: remove the hatch (and any left behind), proved by reading."""
        self.removing = True
        done = removed(self.record, self.log)
        self.log("hatch: removed (checked: none left)" if done else
                 f"hatch: NOT removed yet: {self.record.hatch}")
        self.removing = not done
        return done
