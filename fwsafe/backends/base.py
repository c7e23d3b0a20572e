"""The interface every firewall backend implements.

A *layer* is one independently captured piece of firewall state: the IPv4 iptables ruleset,
the IPv6 one, leftover iptables-legacy tables, native nftables tables, ufw's files.

Each layer splits its state into *units*, the pieces a revert puts back one by one:

    iptables / ip6tables (nft or legacy)  one unit per chain:   "filter/INPUT"
    nftables (native tables)              one unit per table:   "inet fw"
    ufw                                   one unit per file:    "/etc/ufw/user.rules"

A change *touches* the units whose content differs between the snapshot taken before it and a
capture taken right after it was applied. A revert restores exactly the touched units from the
snapshot (re-creating what the change deleted, deleting what it created) and leaves every other
unit as it is at revert time: a chain that Docker or fail2ban added during the window survives.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

RetryLog = Callable[[str], None]


class ApplyError(Exception):
    """A backend's tool refused (the kernel's answer, not a parse of ours)."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class Layer(abc.ABC):
    name: str
    label: str
    tools: tuple[str, ...] = ()   # binaries needed to change this layer

    @abc.abstractmethod
    def available(self) -> bool:
        """True when this layer exists on this system and should be captured."""

    @abc.abstractmethod
    def capture(self) -> bytes:
        """The layer's current state, serialised (iptables-save text, nft text, JSON)."""

    @abc.abstractmethod
    def units(self, data: bytes) -> dict[str, str]:
        """Split a capture into units: {unit id: normalised content}."""

    @abc.abstractmethod
    def restore_units(self, before: bytes, units: Sequence[str], *,
                      on_retry: RetryLog | None = None) -> None:
        """Put the given units back as they are in `before` (absent there: remove them), and
        leave all other units as they are now. Keeps trying while processes cannot be started
        for lack of memory; raises ApplyError when the tool refuses."""

    # -- content changes (iptables / nft files); layers that take none keep these defaults --
    def check_tools(self) -> None:
        """Raise EnvironmentProblem when the tools needed to change this layer are missing."""
        from fwsafe.runner import require_binary

        for tool in self.tools:
            require_binary(tool)

    def validate(self, change: bytes, source: str) -> None:
        raise ApplyError(f"the {self.label} layer does not take a rules file")

    def apply(self, change: bytes, source: str) -> None:
        raise ApplyError(f"the {self.label} layer does not take a rules file")

    def unit_texts(self, data: bytes) -> dict[str, str]:
        """The units as text a person can read in a diff (by default what `units` gives)."""
        return self.units(data)

    # -- derived --------------------------------------------------------------------------
    def touched(self, before: bytes, after: bytes) -> list[str]:
        old, new = self.units(before), self.units(after)
        return sorted(u for u in set(old) | set(new) if old.get(u) != new.get(u))

    def differences(self, before: bytes, units: Sequence[str]) -> list[str]:
        """After a restore: the units that are still not as in `before` ([] = all good)."""
        old, now = self.units(before), self.units(self.capture())
        return [f"{self.label} {u}" for u in units if old.get(u) != now.get(u)]
