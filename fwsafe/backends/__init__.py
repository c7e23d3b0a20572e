"""Firewall backends behind one small interface (see `fwsafe.backends.base.Layer`)."""

from __future__ import annotations

from fwsafe.backends.base import Layer
from fwsafe.errors import UsageError


def layer_for(name: str) -> Layer:
    """The layer object for a layer name stored in a transaction record."""
    if name in ("ipv4", "ipv6"):
        from fwsafe.backends.iptables import IptablesLayer

        return IptablesLayer(name)
    raise UsageError(f"unknown firewall layer {name!r}")


__all__ = ["Layer", "layer_for"]
