"""The interface every firewall backend implements.

A *layer* is one independently restorable piece of firewall state: the IPv4 iptables ruleset,
the IPv6 one, the nftables ruleset, ufw's files. A change touches some layers; fwsafe captures
each touched layer before the change (the snapshot), applies the change atomically per layer,
and a revert restores from the snapshot exactly what the change touched.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

RetryLog = Callable[[str], None]


class ApplyError(Exception):
    """The backend's tool refused the change (the kernel's answer, not a parse of ours)."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class Layer(abc.ABC):
    name: str

    @abc.abstractmethod
    def check_tools(self) -> None:
        """Raise EnvironmentProblem when the tools this layer needs are missing."""

    @abc.abstractmethod
    def capture(self) -> bytes:
        """The layer's current state, in a form that `restore` loads back."""

    @abc.abstractmethod
    def validate(self, change: bytes, source: str) -> None:
        """Raise InvalidRulesError (naming `source` and the line) if `change` cannot load."""

    @abc.abstractmethod
    def apply(self, change: bytes, source: str) -> None:
        """Apply `change` atomically; raise ApplyError, with nothing changed, if refused.
        `source` names the change in messages (the file name)."""

    @abc.abstractmethod
    def restore(self, before: bytes, change: bytes, *, on_retry: RetryLog | None = None) -> None:
        """Put back, from `before`, what `change` touched; leave everything else as it is.

        Must keep trying when processes cannot be started for lack of memory. Raises
        ApplyError when the tool itself refuses the snapshot.
        """

    @abc.abstractmethod
    def differences(self, before: bytes, change: bytes) -> list[str]:
        """After a restore: what `change` touched that is not as in `before` ([] = all good)."""
