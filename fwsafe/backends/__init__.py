"""Firewall backends behind one small interface (see `fwsafe.backends.base.Layer`)."""

from __future__ import annotations

from collections.abc import Iterable

from fwsafe.backends.base import ApplyError, Layer
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
    if name in ("ipv4", "ipv6", "ipv4-legacy", "ipv6-legacy"):
        from fwsafe.backends.iptables import IptablesLayer

        return IptablesLayer(name)
    if name == "nft":
        from fwsafe.backends.nftables import NftLayer

        return NftLayer()
    if name == "ufw":
        from fwsafe.backends.ufw_layer import UfwLayer

        return UfwLayer()
    if name == "firewalld":
        from fwsafe.backends.firewalld_layer import FirewalldLayer

        return FirewalldLayer()
    if layer_kind(name) == "sshd":
        from fwsafe.backends.sshd_layer import SshdLayer

        return SshdLayer.for_name(name)
    raise UsageError(f"unknown firewall layer {name!r}")




def owned_elsewhere(name: str, layers: Iterable[str]) -> frozenset[str]:
    """The units of layer `name` that another of `layers` owns and reverts itself: firewalld's
    tables belong to the firewalld layer, never loaded back by the nft layer behind its back."""
    if name == "nft" and "firewalld" in layers:
        return FIREWALLD_TABLES
    return frozenset()


def compose_partial(name: str, content: bytes, live: bytes | None) -> bytes:
    """A `--partial` file of one layer as the complete content it stands for, given the live
    state: the chains (nft: tables) it names replaced, everything else as it is."""
    if layer_kind(name) in ON_DEMAND_LAYERS:  # files given whole
        return content
    if name == "nft":
        from fwsafe.backends.nftables import compose_partial as compose_nft

        return compose_nft(content)
    from fwsafe.backends.iptables import compose_partial as compose_iptables

    return compose_iptables(live or b"", content)


def available_layers() -> list[str]:
    """The layers that exist on this system (each is captured in every snapshot)."""
    return [name for name in ALL_LAYERS if layer_for(name).available()]


__all__ = ["ALL_LAYERS", "FIREWALLD_TABLES", "ON_DEMAND_LAYERS", "ApplyError", "Layer", "available_layers",
           "compose_partial", "layer_for", "layer_kind", "owned_elsewhere", "revert_order"]
