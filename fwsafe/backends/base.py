"""The interface every firewall backend implements.

A *layer* is one independently captured piece of firewall state: the IPv4 iptables ruleset,
the IPv6 one, leftover iptables-legacy tables, native nftables tables, ufw's files, firewalld
(its files and model; it is reverted through firewalld itself: backends/firewalld_layer.py).

Each layer splits its state into *units*, the pieces a revert puts back one by one:

    iptables / ip6tables (nft or legacy)  one unit per chain:   "filter/INPUT"
    nftables (native tables)              one unit per table:   "inet fw"
    ufw                                   one unit per file:    "/etc/ufw/user.rules"
    firewalld (files and its runtime      one unit per file, zone, policy, and for the direct
    model, through firewall-cmd)          rules and the kernel's tables: "zone public"
    sshd (only for a change involving it) one unit per file:    "/etc/ssh/sshd_config"

A change *touches* the units whose content differs between the snapshot taken before it and a
capture taken right after it was applied. A revert loads, atomically and per table, a complete
computed target for the tables (files) holding touched units, then verifies it. It goes through
levels, each a fallback for the one before when the tool refuses the target:

    MERGE   the three-way merge of before / after the change / live (fwsafe.core.merge): only the
            change's own rules are undone; what others did meanwhile stays
    SNAPSHOT_UNITS  the touched units put back whole from the snapshot, the rest as it is live
    SNAPSHOT_TABLES  the snapshot of every touched table, whole (access before fidelity)
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RetryLog = Callable[[str], None]

MERGE = "merge"
SNAPSHOT_UNITS = "snapshot units"
SNAPSHOT_TABLES = "snapshot tables"
LEVELS = (MERGE, SNAPSHOT_UNITS, SNAPSHOT_TABLES)

# What a layer is and what the rest of fwsafe does with it (`Layer.facts`): every module asks
# the registry (fwsafe.backends: `layers_with`, `layer_has`), none keeps a list of layer names.
NETFILTER = "netfilter"          # its own tool loads its rules into netfilter (iptables, nft)
IPTABLES_SAVE = "iptables-save"  # its state is iptables-save text (v4, v6, nft or legacy)
FILES = "files"                  # its state is files another program loads (ufw, firewalld,
                                 # sshd): after a reboot only these are put back
ON_DEMAND = "on-demand"          # captured only for a change that gives content for it
PREDICTED = "predicted"          # the lockout check loads it in its sandbox
RULES_FILE = "rules-file"        # what --rules / --rules6 give; a command tried on a copy is
                                 # judged by what it leaves here
FLUSHES_IPTABLES = "flushes-iptables"   # its revert may reload a daemon that flushes the
                                 # iptables tables and makes others write theirs again
                                 # (firewalld's reload; Docker): core reverts the iptables
                                 # layers from what others had left before it (core.revert)
NFT_TABLES = "nft-tables"        # its state is native nftables tables (`nft list ruleset`),
                                 # a change an nft script
ROLLBACK = "rollback"            # `fwsafe rollback` puts it back from the history (a rules file;
                                 # sshd: its files, then a reload; firewalld: through firewalld,
                                 # its files then `--reload` and the runtime model, or the files
                                 # alone for a files-only layer, the power cycle's)
FILE_SET = "file-set"            # its capture is whole files by path (ufw's, sshd's; not
                                 # firewalld's, which holds its runtime model too): the history
                                 # shows a change of it file by file (`Layer.unit_texts`)
SANDBOX_FILES = "sandbox-files"  # its files are written into the lockout check's sandbox (its
                                 # own mounts) before a command is tried there, which reads them
                                 # (ufw's commands): put there by `Layer.apply`
LOADS_IPTABLES = "loads-iptables"  # its files are loaded into iptables tables by a program
                                 # of its own (ufw's rules files, through iptables-restore): a
                                 # change of them can write any table of the iptables layers
BASED_CHANGE = "based-change"    # its change names what each file it writes holds now, and is
                                 # refused when one changed since (sshd): a rollback writes only
                                 # the files that differ, against their content now


class FidelityError(Exception):
    """Whether a capture shows the kernel's state exactly could not be told (a tool failed or
    timed out: `Layer.lossy_tables`)."""


# A table proven to round-trip exactly (fwsafe.backends.fidelity): (nf_tables family, table,
# its digest (nflist.digests), the identity of the family's iptables-save and -restore tools)
ProofKey = tuple[str, str, str, str]


@dataclass
class FidelityProofs:
    """The fidelity test's memory: `known`, the tables proven to round-trip exactly before
    (given); `found`, those the round trip proved now (to remember); `skipped`, the tables
    ("ip filter") it did not round-trip because their live digest was in `known`."""
    known: frozenset[ProofKey] = frozenset()
    found: list[ProofKey] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class ApplyError(Exception):
    """A backend's tool refused (the kernel's answer, not a parse of ours)."""

    def __init__(self, message: str, *, line: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.hint = hint   # what to do, when known (shown by whoever reports it)


# A layer's whole state as the kernel was proved to hold it after a revert's load: nf_tables'
# generation when the live state was read before the load, its generation right after the
# load (only the load's own commits between), and the state's text (fwsafe.core.revert).
Proved = tuple[int, int, bytes]


class Layer(abc.ABC):
    name: str
    label: str
    tools: tuple[str, ...] = ()   # binaries needed to change this layer
    facts: frozenset[str] = frozenset()   # NETFILTER, FILES, ... (above)
    # The command that loads the layer's whole capture, read on stdin, into an empty network
    # namespace (the lockout check's sandbox: fwsafe.check.simulate); () for a layer whose
    # state is not loaded so.
    restore_command: tuple[str, ...] = ()
    proved: Proved | None = None  # set by `revert` when the kernel proved the whole state
    # Told the whole state a revert is about to load (what `proved` will hold if the kernel
    # proves it), to start work on it while the tool loads it; never raises.
    on_target: Callable[[bytes], None] | None = None
    # Set by `revert` when its work flushed the iptables tables and made others write theirs
    # again (a FLUSHES_IPTABLES layer that reloaded its daemon); `before_flush` is run by such
    # a revert, done before anything that may flush them (core.revert reads them there).
    disturbed: bool = False
    before_flush: Callable[[], None] | None = None
    ready_to_flush: Callable[[], None] = staticmethod(lambda: None)

    @abc.abstractmethod
    def available(self) -> bool:
        """True when this layer exists on this system and should be captured."""

    @abc.abstractmethod
    def capture(self) -> bytes:
        """The layer's current state, serialised (iptables-save text, nft text, JSON)."""

    def settle(self, before: bytes | None, log: RetryLog) -> None:
        """Wait (bounded) until the programs that answer a change of this layer (from its
        capture `before`) with changes of their own are done, so that a capture read next is
        the state they leave (firewalld: Docker writes its iptables chains again after every
        reload). Nothing for most layers."""
        del before, log

    def in_nf_tables(self) -> bool:
        """Whether the layer's state lives in nf_tables, whose generation number moves on with
        every change (fwsafe.backends.nflist.generation): then a capture stays exact for as
        long as the generation is the same."""
        return False

    def capture_under(self, root: Path) -> bytes:
        """The layer's state for the history of the system mounted at `root` ("/": this one,
        else a rescue system's mount): what `capture` reads from the running system, unless
        its state is files it reads under `root` (ufw's)."""
        del root
        return self.capture()

    def kept_under(self, root: Path) -> bool:
        """Whether the system at `root` keeps this layer's files though the layer is not
        available here (not in `available_layers`): the history captures them all the same
        (`capture_under`): ufw's files under a rescue system's mount, sshd's (this system's
        only: its capture reads the running sshd's configuration)."""
        del root
        return False

    @abc.abstractmethod
    def units(self, data: bytes) -> dict[str, str]:
        """Split a capture into units: {unit id: normalised content}."""

    @abc.abstractmethod
    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        """Undo the change on the live state at `level` (see the module's documentation):
        compute the complete target of each table or file holding one of `units`, load it
        atomically, capture again and compare. `after` is the capture right after the change
        (None when it was never taken: MERGE then acts as SNAPSHOT_UNITS). `live`: the live state when
        the caller knows it (nothing changed since `after`), instead of capturing it again.
        Returns what still differs ([] = done and verified); raises ApplyError when the tool
        refuses the target. Keeps
        trying while processes cannot be started for lack of memory."""

    def declared(self, data: bytes) -> dict[str, set[str]]:
        """{table: the units it declares (iptables: its chains)}, from the declarations alone
        (fast: no rule is read); a layer whose units are whole tables or files: {unit: set()}."""
        return {unit: set() for unit in self.units(data)}

    # -- content changes (iptables / nft files); layers that take none keep these defaults --
    def recognises(self, content: bytes) -> bool:
        """A rules file written for this layer, told by its content (`--backend auto`)."""
        return False

    def check_tools(self) -> None:
        """Raise EnvironmentProblem when the tools needed to change this layer are missing."""
        # the tools' runner is needed only to check a layer's tools (the interface stays light)
        from fwsafe.runner import require_binary

        for tool in self.tools:
            require_binary(tool)

    def validate(self, change: bytes, source: str) -> None:
        raise ApplyError(f"the {self.label} layer does not take a rules file")

    def validate_text(self, change: bytes, source: str) -> None:
        """What `validate` checks in the text alone, without asking the kernel (a layer
        without such a split: all of `validate`)."""
        self.validate(change, source)

    def apply(self, change: bytes, source: str) -> None:
        raise ApplyError(f"the {self.label} layer does not take a rules file")

    def unit_texts(self, data: bytes) -> dict[str, str]:
        """The units as text a person can read in a diff (by default what `units` gives)."""
        return self.units(data)

    # -- derived --------------------------------------------------------------------------
    def touched(self, before: bytes, after: bytes) -> list[str]:
        old, new = self.units(before), self.units(after)
        return sorted(u for u in set(old) | set(new) if old.get(u) != new.get(u))


def line_starting(pattern: re.Pattern[str], text: str) -> int | None:
    """The number (from 1) of the first line of `text` that starts with what `pattern` matches,
    or None. The pattern begins with the newline before such a line ("\\n[^\\S\\n]*..."): a
    literal the regex engine searches for fast, where "^" with re.M is tried at every
    character (tens of milliseconds on a large ruleset); a newline is put in front of the text.
    """
    match = pattern.search("\n" + text)
    return None if match is None else text.count("\n", 0, match.start()) + 1
