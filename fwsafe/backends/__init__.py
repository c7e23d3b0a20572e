"""Firewall backends behind one small interface (see `fwsafe.backends.base.Layer`), and the
registry of layers: their names, in capture order, and what each is (`Layer.facts`: netfilter,
files, iptables-save text, checked for a lockout, ...). Every other module asks it
(`layers_with`, `layer_has`) instead of keeping a tuple of layer names (an architecture test
keeps it so)."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from concurrent.futures import Future

from fwsafe.backends.base import (
    BASED_CHANGE,
    FILE_SET,
    FILES,
    FLUSHES_IPTABLES,
    IPTABLES_SAVE,
    LOADS_IPTABLES,
    NETFILTER,
    NFT_TABLES,
    ON_DEMAND,
    PREDICTED,
    ROLLBACK,
    RULES_FILE,
    SANDBOX_FILES,
    ApplyError,
    FidelityError,
    FidelityProofs,
    Layer,
    ProofKey,
)
from fwsafe.backends.families import FAMILIES
from fwsafe.errors import UsageError
from fwsafe.ondisk.firewalld_files import FIREWALLD_TABLES

# Capture order; a revert goes in reverse (firewalld and files first, iptables last).
ALL_LAYERS = ("ipv4", "ipv6", "ipv4-legacy", "ipv6-legacy", "nft", "ufw", "firewalld")
# Captured only for a change that gives content for them (never in every snapshot); reverted
# first. A name may carry a path: "sshd:<the config file, percent-encoded>" (backends.sshd_layer).
ON_DEMAND_LAYERS = ("sshd",)


def layer_kind(name: str) -> str:
    """A layer's kind: "sshd" for "sshd:%2Fsrv%2Fsshd_config", else the name itself."""
    return name.split(":", 1)[0]


def revert_order(names: Iterable[str]) -> list[str]:
    """The order a revert goes in: on-demand layers (sshd's files) first, then the reverse of
    the capture order."""
    given = list(names)
    first = [n for n in given if layer_kind(n) in ON_DEMAND_LAYERS]
    return first + [n for n in reversed(ALL_LAYERS) if n in given]


def layer_for(name: str) -> Layer:
    """The layer object for a layer name stored in a transaction record."""
    if name in FAMILIES:   # the iptables layers (fwsafe.backends.families)
        # each backend is imported when first asked for (the CLI starts faster)
        from fwsafe.backends.iptables import IptablesLayer

        return IptablesLayer(name)
    if name == "nft":
        # each backend is imported when first asked for (the CLI starts faster)
        from fwsafe.backends.nftables import NftLayer

        return NftLayer()
    if name == "ufw":
        # each backend is imported when first asked for (the CLI starts faster)
        from fwsafe.backends.ufw_layer import UfwLayer

        return UfwLayer()
    if name == "firewalld":
        # each backend is imported when first asked for (the CLI starts faster)
        from fwsafe.backends.firewalld_layer import FirewalldLayer

        return FirewalldLayer()
    if layer_kind(name) == "sshd":
        # each backend is imported when first asked for (the CLI starts faster)
        from fwsafe.backends.sshd_layer import SshdLayer

        return SshdLayer.for_name(name)
    raise UsageError(f"unknown firewall layer {name!r}")


@functools.cache
def layers_with(*facts: str) -> tuple[str, ...]:
    """The layers (kinds, for an on-demand one) that have every one of `facts`
    (fwsafe.backends.base: NETFILTER, FILES, ...), in capture order, on-demand ones last."""
    return tuple(name for name in (*ALL_LAYERS, *ON_DEMAND_LAYERS)
                 if set(facts) <= layer_for(name).facts)


def layer_has(name: str, fact: str) -> bool:
    """Whether layer `name` (also "sshd:<path>") has `fact`; an unknown name has none. Only
    that layer's backend is imported (the guard and backstop ask it while the clock runs)."""
    kind = layer_kind(name)
    return kind in (*ALL_LAYERS, *ON_DEMAND_LAYERS) and fact in _facts(kind)


@functools.cache
def _facts(kind: str) -> frozenset[str]:
    return layer_for(kind).facts


def first_with(fact: str, names: Iterable[str]) -> str | None:
    """The first of `names` (layers as given, also "sshd:<path>") that has `fact`, or None: a
    change's nft layer for NFT_TABLES."""
    return next((name for name in names if layer_has(name, fact)), None)


def restore_command(name: str) -> tuple[str, ...]:
    """The command that loads layer `name`'s whole capture, read on stdin, into an empty
    network namespace (`Layer.restore_command`: iptables-restore, nft -f); () for a layer
    (or an unknown name) that is not loaded so."""
    kind = layer_kind(name)
    if kind not in (*ALL_LAYERS, *ON_DEMAND_LAYERS):
        return ()
    return _restore_command(kind)


@functools.cache
def _restore_command(kind: str) -> tuple[str, ...]:
    return layer_for(kind).restore_command


def owned_elsewhere(name: str, layers: Iterable[str]) -> frozenset[str]:
    """The units of layer `name` that another of `layers` owns and reverts itself: firewalld's
    tables belong to the firewalld layer, never loaded back by the nft layer behind its back."""
    if name == "nft" and "firewalld" in layers:
        return FIREWALLD_TABLES
    return frozenset()


def one_transaction_tables(name: str, content: bytes) -> list[str] | None:
    """The nft layer's change `content` (one `nft -f` transaction: one nf_tables commit) as
    the tables it writes to, its units; None when its statements do not all name their table,
    and for every other layer."""
    if name != "nft":
        return None
    # each backend is imported when first asked for (the CLI starts faster)
    from fwsafe.backends.nftables import change_tables

    return change_tables(content)


def compose_partial(name: str, content: bytes, live: bytes | None) -> bytes:
    """A `--partial` file of one layer as the complete content it stands for, given the live
    state: the chains (nft: tables) it names replaced, everything else as it is."""
    if layer_kind(name) in ON_DEMAND_LAYERS:  # files given whole
        return content
    if name == "nft":
        # each backend is imported when first asked for (the CLI starts faster)
        from fwsafe.backends.nftables import compose_partial as compose_nft

        return compose_nft(content)
    # each backend is imported when first asked for (the CLI starts faster)
    from fwsafe.backends.iptables import compose_partial as compose_iptables

    return compose_iptables(live or b"", content)


def watched_layers(changed: Iterable[str] | None, captured: Iterable[str]) -> list[str]:
    """The layers of `captured` that a change giving content for layers `changed` (None: a
    command, which can alter any) can alter: compared after the apply to find what it
    touched."""
    if changed is None:
        return list(captured)
    watch = set(changed)
    if "nft" in watch:  # `flush ruleset` also wipes the tables of iptables-nft
        watch |= set(layers_with(RULES_FILE))
    return [name for name in captured if name in watch]


def lossy_tables(name: str, tables: Collection[str] | None, *, saved: bytes | None,
                 generation: int | None,
                 ahead: Future[tuple[int | None, dict[str, str]]] | None = None,
                 proofs: FidelityProofs | None = None) -> list[str]:
    """The tables of layer `name` (of `tables`; None: all) whose capture does not show the
    kernel's state exactly, so that loading it back would not restore them: iptables-nft's
    (fwsafe.backends.fidelity); [] for every other layer. `saved`: the capture read at
    nf_tables' `generation`; `ahead`: `fidelity_digests_ahead(name)` run beside it; `proofs`:
    the tables proven exact before (not tried again), and those proven now. Raises
    FidelityError when it cannot tell."""
    if not layer_has(name, IPTABLES_SAVE):
        return []
    # fidelity tries the tables in a scratch namespace (fwsafe.check.netns): loaded only for
    # a change that can write to a table of iptables-nft
    from fwsafe.backends.fidelity import lossy_tables as lossy

    return lossy(name, tables, saved=saved, generation=generation, ahead=ahead, proofs=proofs)


def fidelity_digests_ahead(name: str) -> tuple[int | None, dict[str, str]]:
    """The live digests `lossy_tables` compares for iptables layer `name`, read ahead (beside
    the reading of the layers) with the nf_tables generation they hold at."""
    # fidelity's module is loaded only for a change that can write to iptables-nft's tables
    from fwsafe.backends.fidelity import NFT_FAMILY, digests_ahead

    return digests_ahead(NFT_FAMILY[name])


def available_layers() -> list[str]:
    """The layers that exist on this system (each is captured in every snapshot)."""
    return [name for name in ALL_LAYERS if layer_for(name).available()]


__all__ = ["ALL_LAYERS", "BASED_CHANGE", "FILE_SET", "FILES", "FIREWALLD_TABLES", "LOADS_IPTABLES",
           "FLUSHES_IPTABLES", "IPTABLES_SAVE", "NETFILTER", "NFT_TABLES", "ON_DEMAND",
           "ON_DEMAND_LAYERS", "PREDICTED", "ROLLBACK", "RULES_FILE", "SANDBOX_FILES",
           "ApplyError", "FidelityError", "FidelityProofs", "Layer", "ProofKey",
           "available_layers", "compose_partial", "first_with", "layer_for", "layer_has",
           "layer_kind", "lossy_tables", "layers_with", "owned_elsewhere", "restore_command",
           "revert_order", "watched_layers"]
