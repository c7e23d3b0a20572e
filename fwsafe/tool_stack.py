"""The stack the firewall tools are started with.

iptables-nft overflows the usual 8 MiB stack reading a table of tens of thousands of chains:
`iptables-save` (1.8.9) of a kube-proxy host of 80,000 chains, loaded back in the order
iptables-save prints them (by name: a snapshot, a revert, netfilter-persistent at boot), dies
of SIGSEGV after 50 s; with 16 MiB it prints them. fwsafe would then neither read the host nor
check a change. Every fwsafe process (the CLI, the guard, its backstop) raises its soft
RLIMIT_STACK at start, within the hard limit: every program it starts inherits it. glibc
sizes a process's default thread stack by the limit the process starts with, so fwsafe's
Python children (the guard, the sandbox's agent and simulator) pin their threads' stacks to
8 MiB (`threading.stack_size`), as its own processes do. Standard library only.
"""

from __future__ import annotations

import contextlib
import resource
import threading

TOOL_STACK_BYTES = 256 << 20   # about 1.3 million chains at the rate measured (8 MiB: 40k)
THREAD_STACK_BYTES = 8 << 20


def raise_for_tools() -> int | None:
    """Raise the soft stack limit to TOOL_STACK_BYTES (never lower it, never past the hard
    limit). Returns the soft limit now (None: not known)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(ValueError, RuntimeError):
        threading.stack_size(THREAD_STACK_BYTES)
    if soft == resource.RLIM_INFINITY:
        return soft
    wanted = TOOL_STACK_BYTES if hard == resource.RLIM_INFINITY else min(TOOL_STACK_BYTES, hard)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
    except (OSError, ValueError):
        return soft
    return wanted
