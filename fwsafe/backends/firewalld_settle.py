"""Around firewalld's reload: waiting until the programs that answer it (Docker writing its
iptables chains again) are done, and a task (core's read of the iptables layers before the
flush) run in a thread meanwhile.

Used by the firewalld layer (fwsafe.backends.firewalld_layer): after a reload it reverts or
sees in a capture, the iptables layers are read only once nf_tables has been quiet a while.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fwsafe.backends import nflist

# After a reload: firewalld flushes every iptables table (ip/ip6 filter, nat, mangle, raw:
# Docker's chains and the admin's rules in DOCKER-USER), says "Reloaded" on D-Bus, and Docker
# writes its chains again, one firewall-cmd passthrough at a time (about 0.1 s apart, done
# 0.2-0.5 s after the reload here). Others are done when nf_tables' generation has not moved
# for SETTLE_QUIET s; waited for at most SETTLE_LIMIT s (a program that commits all the time),
# less than the backstop's grace for a guard that says nothing (guard/backstop.py, 5 s).
HANDLE_TABLE = "inet firewalld"   # its handle is new after every reload
SETTLE_QUIET = 1.0
SETTLE_LIMIT = 4.0
SETTLE_POLL = 0.05


def wait_quiet(generation: Callable[[], int | None] = nflist.generation, *,
               quiet: float = SETTLE_QUIET, limit: float = SETTLE_LIMIT,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> tuple[bool, int]:
    """Wait until nf_tables' generation has not moved for `quiet` seconds, `limit` seconds at
    most: (quiet reached, the commits seen meanwhile). (False, 0) at once when the generation
    cannot be read."""
    start = clock()
    first = generation()
    if first is None:
        return False, 0
    last, moved = first, start
    while True:
        now = clock()
        if now - moved >= quiet:
            return True, last - first
        if now - start >= limit:
            return False, last - first
        sleep(SETTLE_POLL)
        got = generation()
        if got is None:
            return False, last - first
        if got != last:
            last, moved = got, clock()


def in_thread(task: Callable[[], None] | None) -> Callable[[], None]:
    """`task` started in a thread; the call returned waits until it is done (again: at once)."""
    if task is None:
        return lambda: None
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(task)

    def wait() -> None:
        try:
            future.result()
        finally:
            pool.shutdown(wait=True)
    return wait


def settle_after_reload() -> str:
    """Wait for the programs that answer firewalld's reload (Docker: its iptables chains
    written again) to be done, so that what is read next (the iptables layers' three-way
    merge) is the state they leave, and nothing they write lands after it. What to log."""
    started = time.monotonic()
    quiet, commits = wait_quiet()
    waited = time.monotonic() - started
    if quiet:
        return (f"firewalld: others done answering its reload ({commits} commit(s) in "
                f"{waited:.1f} s, the last {SETTLE_QUIET:g} s quiet)")
    return (f"firewalld: nf_tables still moving {waited:.1f} s after the reload "
            f"({commits} commit(s)); going on")


