"""Reading the live firewall ahead: `fwsafe apply` (and `fwsafe check`) need every layer read
before anything else can happen, so the `fwsafe` command starts that read first of all
(`fwsafe.entry`), while Python still loads the command line interface (about 50 ms), and the
apply takes it over (`fwsafe.control.flow`; the check: `fwsafe.check.host.capture_host`).

The reading is only used when nf_tables' generation number, taken before it started, is still
the same when it is taken over (for the apply: once it holds the state directory's lock), so
nothing changed in between; files and legacy tables are read again before the snapshot in any
case (`fwsafe.control.apply_snapshot.refresh`).
It only reads; a command that does not take it over (`apply --help`, a usage error) just exits.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from fwsafe.backends import available_layers, layer_for, nflist
from fwsafe.context import RUN


@dataclass
class Reading:
    generation: int | None            # nf_tables' generation before the reading started
    captures: dict[str, Future[bytes]]


def start() -> None:
    """Start reading every layer this system has, each in a daemon thread."""
    generation = nflist.generation()
    captures: dict[str, Future[bytes]] = {}
    for name in available_layers():
        future: Future[bytes] = Future()
        threading.Thread(target=_capture, args=(name, future), daemon=True,
                         name=f"fwsafe-read-{name}").start()
        captures[name] = future
    RUN.ahead = Reading(generation, captures)


def _capture(name: str, future: Future[bytes]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(layer_for(name).capture())
    except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the reading over
        future.set_exception(exc)


def take() -> Reading | None:
    """The reading started ahead, handed over once; None when there is none or when nf_tables
    changed since it started."""
    reading, RUN.ahead = RUN.ahead, None
    if not isinstance(reading, Reading):
        return None
    return reading if nflist.generation() == reading.generation else None


def start_capture(pool: Executor, layers: list[str]) -> dict[str, Future[bytes]]:
    """Read `layers` now, in parallel: IPv4 and IPv6 together, legacy tables, native
    nftables, ufw's files."""
    return {name: pool.submit(layer_for(name).capture) for name in layers}


def read(pool: Executor, layers: list[str]) -> tuple[int | None, dict[str, Future[bytes]]]:
    """`layers` being read: from the reading started ahead where it has them (and nothing
    changed since), the others now in `pool`; with nf_tables' generation as of before the
    reading (for `fwsafe.control.apply_snapshot.refresh`)."""
    ahead = take()
    if ahead is None:
        return nflist.generation(), start_capture(pool, layers)
    captures = {name: ahead.captures[name] for name in layers if name in ahead.captures}
    captures.update(start_capture(pool, [name for name in layers if name not in captures]))
    return ahead.generation, captures
