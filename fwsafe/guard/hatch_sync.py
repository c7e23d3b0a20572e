"""The escape hatch made what it must be in the kernel: each layer's chains read, the one
transaction that puts the hatch where it belongs (and nowhere else) planned and loaded, then
read back to prove it (`sync_layer`, `sync`); the lo bridge read and loaded with nft's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from fwsafe import backends
from fwsafe.backends import NETFILTER, iptsave, layer_has
from fwsafe.guard.hatch_bridge import bridge_devices, bridge_plan, bridge_state, strict_rp_filter
from fwsafe.guard.hatch_chains import Chain, parse_iptables, parse_nft
from fwsafe.guard.hatch_spec import (
    IN_HOOKS,
    IPTABLES_CHAINS,
    NFT_FAMILIES,
    NFT_LAYER,
    NFT_TYPES,
    OUT_HOOKS,
    Log,
    Spec,
    bridge_rules,
    iptables_rules,
    is_ipv6_layer,
    nft_rules,
)
from fwsafe.ondisk.hatch_rules import BRIDGE_FAMILY, BRIDGE_TABLE, is_bridge

TOOL_TIMEOUT = 30.0
_NFT_DEVICE = re.compile(r'hook\s+ingress\s+device\s+"?([^"\s;]+)"?')


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
    return iptables_rules(spec, is_ipv6_layer(layer), chain.name)


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


def _run(argv: list[str], payload: bytes | None = None) -> tuple[int, str, str]:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.runner import require_binary, run_persistently

    result = run_persistently([require_binary(argv[0]), *argv[1:]], input=payload,
                              timeout=TOOL_TIMEOUT)
    return (result.returncode, result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace").strip())


# An iptables layer's whole state as a revert proved it loaded (RevertResult.known): nf_tables'
# generation right after its load, the state, and the tables that load replaced whole
Proved = tuple[int, bytes, frozenset[str]]


def read_chains(layer: str, proved: Proved | None = None) -> list[Chain]:
    """The chains of `layer` the hatch can be in, as loaded now (its rules included). Where
    the kernel can list its nf_tables tables (one netlink dump), only the tables the hatch can
    be in are read: not kube-proxy's nat table of 50,000 rules (seconds of iptables-save), nor
    iptables-nft's tables through nft. `proved`: an iptables layer's state as a revert loaded
    it (`Proved`): while nf_tables' generation is still the one right after that load, and
    every table the hatch can be in that exists is one the load replaced whole (so no hatch
    rule is left there: the snapshot it loads holds none), those tables are the answer, not
    read again (0.7 s of iptables-save at 50,000 rules). Captures strip the hatch, so the
    state itself cannot tell: the tables replaced whole do."""
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used
    from fwsafe.backends import nflist

    known = nflist.kernel_tables()
    if proved is not None and layer != NFT_LAYER and nflist.generation() == proved[0]:
        able = _iptables_tables(layer, known)   # where a hatch can be, that exists
        if able is not None and set(able) <= proved[2]:
            return [chain for chain in parse_iptables(proved[1].decode(errors="replace"), layer)
                    if chain.table in proved[2]]
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
               commits: list[int] | None = None,
               proved: Proved | None = None) -> str:
    """Make the hatch rules of `layer` exactly those of `spec` (None: remove them all), in one
    transaction, and read the layer back to prove it. Returns what is loaded now: "loaded",
    "none" (no chain there can drop, or no source of this family), "removed"; followed by
    "; not in TABLES (...)" where owned tables would need it (`_owned_tables`). Raises
    HatchError with the tool's message. `commits`: each load that worked adds its nf_tables
    commits (one per iptables table, one for nft); one that failed adds -1 (not known).
    `proved`: the layer's state as a revert proved it (`read_chains`), for the first reading."""
    last = "the hatch does not hold"
    bridge_refused = False   # nft refused the lo bridge: the hatch is loaded without it
    for attempt in range(4):
        chains = read_chains(layer, proved if attempt == 0 else None)
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
         commits: list[int] | None = None,
         proved: Mapping[str, Proved] | None = None) -> dict[str, str]:
    """`sync_layer` for each layer that can hold the hatch; {layer: state or "error: ..."}.
    Never raises: a layer that fails is reported, the others are still done. `proved`: the
    layers' states as a revert proved them (`Proved`)."""
    states: dict[str, str] = {}
    for layer in layers:
        if not layer_has(layer, NETFILTER):
            continue
        try:
            states[layer] = sync_layer(layer, spec, log, commits, (proved or {}).get(layer))
        except Exception as exc:  # noqa: BLE001 - reported per layer; the caller retries
            states[layer] = f"error: {exc}"
    return states


def available_layers() -> list[str]:
    """The layers of this system that can hold a hatch (for removing every last one)."""
    return [name for name in backends.available_layers() if layer_has(name, NETFILTER)]


