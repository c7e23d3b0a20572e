"""The connectivity probes' entry points (`parse_probe`, `run_probes`, `ProbeResult`), while
their code moves: everything is in fwsafe.core.probe_kinds for one commit (so that git follows
its history); the next one splits it by role."""

from fwsafe.core.probe_kinds import ProbeResult as ProbeResult
from fwsafe.core.probe_kinds import parse_probe as parse_probe
from fwsafe.core.probe_kinds import run_probes as run_probes
