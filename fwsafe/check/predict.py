"""`fwsafe check`: predict a lockout before applying, with the kernel's own verdict.

The candidate ruleset is loaded into a throwaway pair of network namespaces that mimics the
host's management path (the interface name and addresses the SSH traffic arrives on, the
client's address, the management port), on top of a copy of the host's current firewall
layers, exactly as ``fwsafe apply`` would load it. Then real packets go through real
netfilter:

(a) a NEW TCP connection from each client to the management port (a listener accepts it);
(b) a connection opened under the CURRENT rules keeps carrying data after the switch;
(c) both over IPv6 for IPv6 clients.

Where a packet is lost, the rule that dropped it is named from the kernel's own answer:
``iptables-save -c`` packet counters for iptables layers, ``nft monitor trace`` for nftables,
mapped back to the file and line that made the rule. What the sandbox cannot reproduce (rate
limits, owners, marks, ...) is reported as "not checked", never as safe.

The firewall of the namespace that runs the check is only read, never changed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from fwsafe.backends import NFT_TABLES, PREDICTED, RULES_FILE, first_with, layer_has, layers_with
from fwsafe.backends.families import FAMILIES
from fwsafe.check.attempts import Prober, find_not_checked
from fwsafe.check.clients import (
    default_clients_and_port,
    default_sessions,
    normalize_address,
    parse_clients,
    parse_ssh_connection,
)
from fwsafe.check.host import (
    ClientPath,
    client_path,
    current_state,
    host_families,
    host_interfaces,
    plan_links,
)
from fwsafe.check.loading import SandboxFirewall
from fwsafe.check.sandbox import CHECK_PREFIX, Sandbox, SandboxError
from fwsafe.check.unreproducible import LIMITS
from fwsafe.core.change import Change, validate_change
from fwsafe.errors import EnvironmentProblem, FwsafeError, UsageError
from fwsafe.runner import require_binary

__all__ = [
    "DEFAULT_TIMEOUT",
    "LIMITS",
    "CheckReport",
    "Verdict",
    "default_clients_and_port",
    "default_sessions",
    "parse_clients",
    "parse_ssh_connection",
    "predict",
]

DEFAULT_TIMEOUT = 1.0


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One management path and what the kernel did with it.

    `ok` is True (the path stays open), False (a lockout: the packets are lost) or None (not
    checked: the sandbox could not test it, or the outcome depends on what it cannot
    reproduce). `culprit` names the rule that dropped the packets ("FILE:LINE: `rule`").
    """

    path: str
    ok: bool | None
    culprit: str | None = None
    detail: str = ""
    # Rules the path met that the sandbox cannot reproduce and that could decide its fate.
    unverified: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "culprit": self.culprit, "detail": self.detail,
                "unverified": self.unverified}


@dataclass
class CheckReport:
    verdicts: list[Verdict] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    lockout: bool = False
    clients: list[str] = field(default_factory=list)
    port: int = 22
    layers: dict[str, str] = field(default_factory=dict)   # layer -> source file
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    left_out: int = 0       # rules the sandbox did not load: none of its packets can match them
    pruning: list[str] = field(default_factory=list)   # what it loaded whole, and why

    @property
    def unknown(self) -> int:
        return sum(1 for v in self.verdicts if v.ok is None)

    @property
    def matters(self) -> list[str]:
        """The rules not checked that could matter: a packet of a management path met them
        and they could decide its fate (each once); the rest of `not_checked` cannot."""
        return list(dict.fromkeys(item for v in self.verdicts for item in v.unverified))

    def lockout_message(self) -> str:
        failed = [v for v in self.verdicts if v.ok is False]
        if not failed:
            return ""
        first = failed[0]
        text = f"lockout predicted on port {self.port}: {first.path}: {first.detail}"
        if first.culprit:
            text += f"; dropped by {first.culprit}"
        if len(failed) > 1:
            text += f" (and {len(failed) - 1} more lost path(s))"
        return text

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-serializable object (what `fwsafe check --json` prints)."""
        data: dict[str, Any] = {
            "ok": not self.lockout,
            "lockout": self.lockout,
            "exit_code": 1 if self.lockout else 0,
            "port": self.port,
            "clients": self.clients,
            "layers": self.layers,
            "verdicts": [v.to_json() for v in self.verdicts],
            "not_checked": self.not_checked,
            "not_checked_matters": self.matters,
            "unknown": self.unknown,
            "notes": self.notes,
            "limits": LIMITS,
            "duration_s": round(self.duration_s, 3),
            "sandbox": {"rules_left_out": self.left_out, "pruning": self.pruning},
        }
        if self.lockout:
            data["kind"] = "LockoutPredicted"
            data["error"] = self.lockout_message()
        return data

    def describe(self, verbose: bool = False) -> str:
        """The report for people: one screen by default, everything with ``verbose``
        (fwsafe.check.check_report)."""
        # the report's text is needed only when a verdict is described (predict starts faster)
        from fwsafe.check.check_report import check_text

        return check_text(self, verbose)


# --------------------------------------------------------------------------------------------
# Input checks: the backends' own validation (iptables-restore --test, nft -c -f)
# --------------------------------------------------------------------------------------------
def _validate(layers: Mapping[str, tuple[bytes, str]]) -> None:
    change = Change()
    for name in layers_with(PREDICTED):
        if name in layers:
            change.add(name, *layers[name])
    validate_change(change)


# --------------------------------------------------------------------------------------------
# Signals: a check interrupted by SIGTERM/SIGHUP still removes its sandbox
# --------------------------------------------------------------------------------------------
class Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def signals_raise() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP while the sandbox is torn down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, lambda s, f: pending.append(s))
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if pending:
            if pending[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(pending[0])


@contextmanager
def scratch_sandbox(tag: str, prefix: str = CHECK_PREFIX) -> Iterator[Sandbox]:
    """A sandbox (``Sandbox(tag, prefix)``) that is removed whatever happens: SIGTERM/SIGHUP raise, and
    are held while it is torn down; an interruption becomes a FwsafeError saying so."""
    with signals_raise():
        try:
            sandbox = Sandbox(tag, prefix)
            try:
                yield sandbox
            finally:
                with signals_held():
                    sandbox.close()
        except Terminated as exc:
            raise FwsafeError(f"interrupted by signal {exc.signum}; the sandbox was removed and "
                              "nothing was changed") from exc


def _endpoint(address: str | None, port: int) -> str:
    return f"[{address}]:{port}" if address and ":" in address else f"{address}:{port}"


def _downgrade(verdict: Verdict, relevant: list[str], degraded: list[str]) -> Verdict:
    """A path the sandbox let through is only safe if nothing it cannot reproduce was met."""
    if verdict.ok is not True or not (relevant or degraded):
        return verdict
    reasons = []
    if relevant:
        reasons.append("it met rules whose outcome the sandbox cannot reproduce: "
                       + " | ".join(relevant))
    if degraded:
        reasons.append("; ".join(degraded))
    verdict.ok = None
    verdict.unverified = list(relevant)
    verdict.detail += "; but NOT checked: " + "; ".join(reasons)
    return verdict


def _culprit_fields(culprits: list[str]) -> tuple[str | None, str]:
    if not culprits:
        return None, ("; no DROP/REJECT rule or DROP policy counted the lost packets "
                      "(see the nat table, routing or a layer the sandbox lacks)")
    extra = f"; also: {' | '.join(culprits[1:])}" if len(culprits) > 1 else ""
    return culprits[0], extra


Captured = Mapping[str, bytes] | Callable[[], Mapping[str, bytes]] | None


def predict(layers: dict[str, tuple[bytes, str]], *, clients: list[str], port: int,
            servers: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
            validate: bool = True, captured: Captured = None,
            sandbox_prefix: str = CHECK_PREFIX) -> CheckReport:
    """Predict whether applying `layers` would lock the management clients out.

    `layers` maps "ipv4" / "ipv6" (iptables-save files) and "nft" (an nftables file) to
    (content, source file name). `clients` are the management clients' addresses, `port` the
    management (SSH) port. Optional: `servers` maps a client to the local address it connects
    to (default: the source address the host uses towards it); `timeout` is how long one
    connection attempt may take in the sandbox; `validate=False` skips the validation (when
    the caller has validated already); `captured` the host's layers if already read
    (fwsafe.check.host.capture_host), or what gives them once they are (called after the
    sandbox is built: the reading goes on meanwhile); `sandbox_prefix` names the sandbox's namespaces
    (fwsafe.check.sandbox.PROOF_PREFIX for the proof after a revert).

    Raises InvalidRulesError (exit 3) for rules the backend refuses, UsageError (exit 2) for
    bad arguments, EnvironmentProblem when the sandbox cannot be built. Never raises for a
    lockout: the report says so (`lockout`); the caller raises LockoutPredicted.
    """
    started = time.monotonic()
    unknown = sorted(set(layers) - set(layers_with(PREDICTED)))
    if unknown or not layers:
        raise UsageError(f"layers must be some of {', '.join(layers_with(PREDICTED))}; got "
                         f"{', '.join(sorted(layers)) or 'none'}")
    if not clients:
        raise UsageError("no management client known: give --client IP")
    if not 0 < port < 65536:
        raise UsageError(f"invalid port {port}")
    try:
        client_list = [normalize_address(c) for c in clients]
    except ValueError as exc:
        raise UsageError(f"not an IP address: {exc}") from exc
    hints = {normalize_address(k): normalize_address(v) for k, v in (servers or {}).items()}
    if os.geteuid() != 0:
        raise EnvironmentProblem("fwsafe check must run as root (it builds network namespaces)",
                                 hint="try: sudo fwsafe check ...")

    report = CheckReport(clients=client_list, port=port,
                         layers={name: layers[name][1] for name in layers_with(PREDICTED) if name in layers})
    with scratch_sandbox(f"{os.getpid()}", sandbox_prefix) as sandbox:
        if validate:
            _validate(layers)
        _run(layers, client_list, hints, port, timeout, report, sandbox, captured)
    report.duration_s = time.monotonic() - started
    return report


def _run(layers: Mapping[str, tuple[bytes, str]], clients: list[str], hints: dict[str, str],
         port: int, timeout: float, report: CheckReport, sandbox: Sandbox,
         captured: Captured = None) -> None:
    if first_with(NFT_TABLES, layers) is not None:   # an nft script to load
        require_binary("nft")
    interfaces = host_interfaces()
    paths = [client_path(c, hints.get(c), interfaces) for c in clients]
    links, lo_addresses = plan_links(paths, interfaces)
    testable = [p for p in paths if p.problem is None]

    verdicts: dict[tuple[str, str], Verdict] = {}

    def path_name(kind: str, path: ClientPath) -> str:
        return f"{kind} tcp {path.client} -> :{port} ({path.family_label})"

    for path in paths:
        if path.problem:
            for kind in ("new", "established"):
                verdicts[(kind, path.client)] = Verdict(path_name(kind, path), None, None,
                                                        f"not checked: {path.problem}")

    if testable:
        try:
            sandbox.build(links, lo_addresses, agents=True,
                          client_agent=any(not p.local for p in testable))
        except SandboxError as exc:
            raise EnvironmentProblem(f"the check sandbox failed: {exc}") from exc
        # The host's layers, read meanwhile (when `captured` gives them)
        tools, native = current_state(layers, captured() if callable(captured) else captured)
        firewall = SandboxFirewall(sandbox, layers, tools, native)
        prober = Prober(firewall, timeout)
        try:
            # After the build: the pruning analysis of a large ruleset (fwsafe.check.prune,
            # perhaps still running ahead in a thread) goes on while the namespaces are made.
            known_interfaces = ["lo", *(link.name for link in links)]
            firewall.prune_to([*(a for i in interfaces.values() for a, _, _ in i.addresses),
                               *clients, *(p.server for p in paths if p.server),
                               *lo_addresses], known_interfaces, [port])
            assert sandbox.srv_agent is not None
            listening = sandbox.srv_agent.request({"op": "listen", "port": port})
            if not listening.get("ok"):
                raise SandboxError(str(listening.get("error")))
            firewall.copy_sysctls()
            firewall.load_current()
            _check_paths(prober, testable, port, known_interfaces, verdicts, path_name)
        except SandboxError as exc:
            raise EnvironmentProblem(f"the check sandbox failed: {exc}") from exc
        report.not_checked = [item.text() for item in prober.not_checked]
        report.left_out = firewall.left_out
        report.pruning = firewall.pruning
        report.notes += firewall.degraded + firewall.notes

    for path in paths:
        for kind in ("new", "established"):
            verdict = verdicts.get((kind, path.client))
            if verdict is not None:
                report.verdicts.append(verdict)
    have = {p.family for p in paths}
    wanted = host_families(interfaces)
    if any(layer_has(name, NFT_TABLES) for name in layers):   # an nft table may be inet
        wanted |= {4, 6}
    wanted |= {FAMILIES[name].ip_version for name in layers if layer_has(name, RULES_FILE)}
    for family in sorted(wanted - have):
        report.verdicts.append(Verdict(
            f"tcp ? -> :{port} (ipv{family})", None, None,
            f"not checked: no IPv{family} client known; give --client with the IPv{family} "
            "address you connect from"))
    report.lockout = any(v.ok is False for v in report.verdicts)


def _check_paths(prober: Prober, paths: list[ClientPath], port: int,
                 known_interfaces: list[str], verdicts: dict[tuple[str, str], Verdict],
                 path_name: Callable[[str, ClientPath], str]) -> None:
    """Open a connection per path under the current rules, switch to the candidate, then see
    whether it still carries data, and whether a new one is accepted."""
    sandbox, firewall, timeout = prober.sandbox, prober.firewall, prober.timeout
    opened: dict[str, dict[str, Any]] = {}
    for number, path in enumerate(paths):
        agent = sandbox.srv_agent if path.local else sandbox.cli_agent
        assert agent is not None
        opened[path.client] = agent.request(
            {"op": "open", "id": f"e{number}", "src": path.client, "dst": path.server,
             "port": port, "timeout": timeout}, wait=timeout + 10)
    blocked_now: dict[int, list[str]] = {}
    for family in {p.family for p in paths if not opened[p.client].get("ok")}:
        blocked_now[family] = prober.diagnose_current(family)

    problem = firewall.load_candidate()
    if problem is not None:
        for path in paths:
            for kind in ("new", "established"):
                verdicts[(kind, path.client)] = Verdict(
                    path_name(kind, path), None, None,
                    f"not checked: the sandbox could not load the candidate: {problem}")
        return
    firewall.read_state()
    prober.not_checked = find_not_checked(firewall, known_interfaces)
    firewall.start_trace()

    for number, path in enumerate(paths):
        name = path_name("established", path)
        endpoint = _endpoint(path.server, port)
        first = opened[path.client]
        if not first.get("ok"):
            why = blocked_now.get(path.family) or []
            verdicts[("established", path.client)] = Verdict(
                name, None, why[0] if why else None,
                f"not checked: no connection to {endpoint} could be opened "
                f"under the CURRENT rules in the sandbox ({first.get('error')}), so the sandbox "
                "does not reproduce how this client reaches the host now")
            continue
        result = prober.attempt(path, {"op": "ping", "id": f"e{number}", "timeout": timeout})
        if result.ok:
            verdict = Verdict(name, True, None,
                              f"a connection to {endpoint} opened under the "
                              "current rules still carries data after the switch")
        else:
            culprit, extra = _culprit_fields(result.culprits)
            verdict = Verdict(name, False, culprit,
                              f"a connection to {endpoint} opened under the "
                              f"current rules stops carrying data after the switch "
                              f"({result.error}){extra}")
        verdicts[("established", path.client)] = _downgrade(verdict, result.relevant,
                                                            firewall.degraded)

    for path in paths:
        name = path_name("new", path)
        endpoint = _endpoint(path.server, port)
        result = prober.attempt(path, {"op": "new", "src": path.client, "dst": path.server,
                                       "port": port, "timeout": timeout})
        if result.ok:
            verdict = Verdict(name, True, None, f"a new connection to {endpoint} is accepted")
        else:
            culprit, extra = _culprit_fields(result.culprits)
            verdict = Verdict(name, False, culprit,
                              f"a new connection to {endpoint} fails ({result.error}){extra}")
        verdicts[("new", path.client)] = _downgrade(verdict, result.relevant, firewall.degraded)
