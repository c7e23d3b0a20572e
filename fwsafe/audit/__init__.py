"""`fwsafe audit`: what can the world reach? Every listening socket, and whether an outside
address gets through to it, decided by the kernel in the lockout check's sandbox.

The phases: :mod:`~fwsafe.audit.listeners` reads the listening sockets from /proc (and who
holds them); :mod:`~fwsafe.audit.plan` decides who sends from where (the world, each local
subnet) and to which address; :mod:`~fwsafe.audit.reach` builds the sandbox
(fwsafe.check.sandbox) with the current firewall (and a candidate on top), mirrors the
listeners there and sends the packets (:mod:`fwsafe.netns_agent` runs inside);
:mod:`~fwsafe.audit.findings` (with :mod:`~fwsafe.audit.facts` and
:mod:`~fwsafe.audit.docker`) says what is wrong; :mod:`~fwsafe.audit.audit_report` holds the answer.

The API: :func:`audit` (what `fwsafe audit` prints) and :func:`exposure_change` (what
`fwsafe check` adds: the services a candidate ruleset opens or closes). Both only read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fwsafe.audit.audit_report import AuditReport, ExposureChange
from fwsafe.audit.facts import docker_facts, host_findings
from fwsafe.audit.findings import (
    SEVERITIES,
    expected_ports,
    forward_findings,
    listener_findings,
)
from fwsafe.audit.listeners import Listener, read_listeners
from fwsafe.audit.reach import CANDIDATE, CURRENT, DEFAULT_TIMEOUT, reachability
from fwsafe.core.config import Config

__all__ = ["DEFAULT_TIMEOUT", "AuditReport", "ExposureChange", "Listener", "audit",
           "exposure_change", "read_listeners"]


def audit(config: Config, state_dir: Path, *,
          candidate: Mapping[str, tuple[bytes, str]] | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> AuditReport:
    """Every listener of this network namespace and who outside reaches it under the live
    rules, or under `candidate` (layer -> (content, source file), as `fwsafe check` loads it)
    before it is applied; with the findings. Raises EnvironmentProblem when the sandbox cannot
    be built (not root, no network namespaces), InvalidRulesError for a candidate the kernel
    refuses."""
    listeners = read_listeners()
    expected = expected_ports(config.expected_open)
    reach = reachability(listeners, candidate=candidate, timeout=timeout)
    chosen = CANDIDATE if candidate is not None else CURRENT
    docker, docker_found = docker_facts(expected)
    report = AuditReport(listeners, reach, chosen, expected,
                         rules={layer: source for layer, (_, source) in (candidate or {}).items()},
                         docker=docker.targets(), docker_user_rules=docker.docker_user_rules)
    if candidate is not None:
        report.change = ExposureChange.between(listeners, reach)
    findings = [*listener_findings(listeners, reach.rounds.get(chosen, {}), expected),
                *forward_findings(report.forwards, expected),
                *docker_found, *host_findings(state_dir, config.boot_hook)]
    report.findings = sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
    return report


def exposure_change(candidate: Mapping[str, tuple[bytes, str]], *,
                    timeout: float = DEFAULT_TIMEOUT,
                    captured: Mapping[str, bytes] | None = None) -> ExposureChange:
    """The services that loading `candidate` would open to, or close for, outside addresses;
    `captured`: the host's layers if already read (fwsafe.check.host.capture_host)."""
    listeners = read_listeners()
    return ExposureChange.between(listeners, reachability(listeners, candidate=candidate,
                                                          timeout=timeout, captured=captured))
