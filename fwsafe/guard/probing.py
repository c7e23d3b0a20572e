"""The guard's probes (`apply --probe`): a thread runs them every interval; the guard counts
the results and reverts at N failures of one probe in a row, or confirms once every probe
passed M times in a row (`--confirm-on-probe`)."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

from fwsafe.core.transaction import Record

Result = tuple[str, bool, "str | None"]


class ProbeLoop(threading.Thread):
    """Runs the guard's probes every interval and hands each round's results to the guard."""

    def __init__(self, urls: Sequence[str], interval: float, timeout: float, wake: int) -> None:
        super().__init__(daemon=True, name="probes")
        self.urls = list(urls)
        self.interval = interval
        self.timeout = timeout
        self.wake = wake
        self.results: queue.Queue[list[Result]] = queue.Queue()
        self.stopped = threading.Event()

    def run(self) -> None:
        # imported by the guard and backstop processes, which keep their imports small: loaded when
        # used (probes: only with --probe)
        from fwsafe.core.probes import parse_probe, run_probes

        probes = [parse_probe(url) for url in self.urls]
        while not self.stopped.is_set():
            started = time.monotonic()
            results = run_probes(probes, timeout=self.timeout)
            self.results.put([(r.url, r.ok, r.error) for r in results])
            try:
                os.write(self.wake, b"p")
            except OSError:
                pass
            self.stopped.wait(max(0.0, self.interval - (time.monotonic() - started)))


class ProbeWatch:
    """The probe thread and the counting of its results."""

    def __init__(self, record: Record, wake: int, log: Callable[[str], None]) -> None:
        self.record = record
        self.log = log
        self.needed = int(record.options.get("probe_failures", 3))
        self.confirm_after = int(record.options.get("confirm_on_probe", 0) or 0)
        self.failures: dict[str, int] = {}
        self.passes: dict[str, int] = {}
        self.loop = ProbeLoop(record.probes, float(record.options.get("probe_interval", 2.0)),
                              float(record.options.get("probe_timeout", 3.0)), wake)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stopped.set()

    def verdict(self) -> tuple[str, str] | None:
        """("revert", why) or ("confirm", how) once the results decide it; else None."""
        while True:
            try:
                results = self.loop.results.get_nowait()
            except queue.Empty:
                return None
            for url, ok, error in results:
                if ok:
                    self.failures[url] = 0
                    self.passes[url] = self.passes.get(url, 0) + 1
                    continue
                self.passes[url] = 0
                self.failures[url] = self.failures.get(url, 0) + 1
                self.log(f"probe {url} failed ({self.failures[url]}/{self.needed}): {error}")
                if self.failures[url] >= self.needed:
                    return "revert", f"probe {url} failed {self.needed} times in a row: {error}"
            if self.confirm_after and all(self.passes.get(u, 0) >= self.confirm_after
                                          for u in self.record.probes):
                return "confirm", f"every probe passed {self.confirm_after} times in a row"
