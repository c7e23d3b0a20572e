"""Scratch namespaces left by a killed fwsafe process (fwsafe.check.netns.orphans): those of
every prefix (the check's and the proof's sandboxes with a suffix, the simulation's and the
fidelity round trip's without) are found when their owner is gone, never a live owner's nor a
name of another shape."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fwsafe.check import netns


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_orphans_of_every_prefix_and_only_those(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    dead, live = _dead_pid(), os.getpid()
    names = [f"fwck{dead}as", f"fwck{live}as", f"fwpr{dead}c", f"fwrt{dead}", f"fwrt{live}",
             f"fwsb{dead}", f"fwsb{dead}x1", f"fwsbx{dead}", "fwsb", f"lab-fwsb{dead}",
             "fwsb0", f"fwsb{dead}zzs", "fwrt4194305000", "fwck0s", f"fwck{dead}"]
    for name in names:
        (tmp_path / name).touch()
    monkeypatch.setattr(netns, "NETNS_DIR", tmp_path)
    assert netns.orphans("fwck") == [f"fwck{dead}as"]
    assert netns.orphans("fwpr") == [f"fwpr{dead}c"]
    assert netns.orphans("fwrt") == [f"fwrt{dead}"]
    assert netns.orphans("fwsb") == [f"fwsb{dead}"]
