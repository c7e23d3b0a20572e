"""Connectivity probes: "can I still reach this host after the firewall change?".

A probe is written as a URL:

    tcp://HOST:PORT                 a TCP connect (the port is required)
    ssh://[USER@]HOST[:PORT]        TCP connect, SSH banner and key exchange; no login
    ssh-auth://USER@HOST[:PORT]     a full SSH key login that runs `true` (never a password)
    http://... / https://...        an HTTP(S) GET; any status below 500 counts as up
    cmd:COMMAND                     a local command (split with shlex, no shell); exit 0 is up

IPv6 literals go in brackets: ``tcp://[fd00::1]:22``.

This module parses the URLs (`parse_probe`) and runs probes (`run_probe`, `run_probes`, at
the same time, each bounded); how each kind is tried is in fwsafe.core.probe_kinds, the host
and port syntax in fwsafe.core.endpoints. The guard imports it and runs the probes
periodically while a change is pending, so the import is kept light (paramiko, urllib.request
and subprocess are loaded by the kinds that need them). `run_probe` never raises for a network
failure; it reports it in a `ProbeResult`.
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fwsafe.core.endpoints import split_endpoint, validate_host
from fwsafe.core.probe_kinds import (
    ProbeFailed,
    SocketDeadline,
    probe_cmd,
    probe_http,
    probe_ssh,
    probe_ssh_auth,
    probe_tcp,
)
from fwsafe.errors import UsageError

__all__ = [
    "PROBE_KINDS",
    "Probe",
    "ProbeKind",
    "ProbeResult",
    "parse_probe",
    "run_probe",
    "run_probes",
]

ProbeKind = Literal["tcp", "ssh", "ssh-auth", "http", "https", "cmd"]

#: Every probe kind, in the order they are documented.
PROBE_KINDS: tuple[ProbeKind, ...] = ("tcp", "ssh", "ssh-auth", "http", "https", "cmd")

_FORMS = "tcp://HOST:PORT, ssh://[USER@]HOST[:PORT], ssh-auth://USER@HOST[:PORT], http://..., https://..., cmd:COMMAND"  # noqa: E501

#: Extra time `run_probes` waits past the timeout before it gives up on a probe thread.
_JOIN_GRACE_S = 2.0


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A parsed probe URL.

    `host`/`port` are set for every network kind (for http/https, `port` is the effective
    port: 80/443 when the URL has none).  `user` is set for ssh-auth (and for ssh when given).
    `path` is the path and query of an http/https URL.  `command` is the argv of a cmd probe.
    """

    url: str
    kind: ProbeKind
    host: str | None = None
    port: int | None = None
    user: str | None = None
    path: str | None = None
    command: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return self.url


def _bad(url: str, why: str, hint: str | None = None) -> UsageError:
    return UsageError(f"invalid probe {url!r}: {why}", hint=hint)


def _parse_network(url: str, kind: ProbeKind, rest: str) -> Probe:
    for ch in "/?#":
        if ch in rest:
            tail = rest[rest.index(ch) :]
            raise _bad(url, f"unexpected {tail!r} (a {kind}:// probe has no path)")
    try:
        user, host, port = split_endpoint(rest)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    if kind == "tcp":
        if port is None:
            raise _bad(url, "a port is required", hint="write tcp://HOST:PORT")
        if user is not None:
            raise _bad(url, "a tcp:// probe takes no user")
    elif kind == "ssh-auth" and user is None:
        raise _bad(url, "a user is required", hint="write ssh-auth://USER@HOST[:PORT]")
    return Probe(url=url, kind=kind, host=host, port=port if port is not None else 22, user=user)


def _parse_http(url: str, kind: ProbeKind) -> Probe:
    # imported by the guard and backstop processes, which keep their imports small: loaded when
    # used (by the http probe)
    import urllib.parse

    if any(c.isspace() for c in url):
        raise _bad(url, "whitespace is not allowed in a URL")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    host = parts.hostname
    if not host:
        raise _bad(url, "no host in the URL")
    if "@" in parts.netloc:
        raise _bad(url, "user names and passwords in the URL are not supported")
    if port == 0:
        raise _bad(url, "port 0 is not valid")
    try:
        validate_host(host)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    if ":" in host and not parts.netloc.startswith("["):
        raise _bad(url, "IPv6 address must be written in brackets")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    if port is None:
        port = 443 if kind == "https" else 80
    return Probe(url=url, kind=kind, host=host, port=port, path=path)


def parse_probe(url: str) -> Probe:
    """Parse a probe URL (see the module docstring for the forms).

    Raises UsageError naming the URL and what is wrong with it.
    """
    text = url.strip()
    if not text:
        raise UsageError("invalid probe '': empty probe URL", hint=f"forms: {_FORMS}")
    lower = text.lower()
    if lower.startswith("cmd:"):
        body = text[4:]
        if body.startswith("//"):
            raise _bad(text, "write cmd:COMMAND, not cmd://", hint=f"e.g. cmd:{body[2:]}")
        try:
            argv = shlex.split(body)
        except ValueError as exc:
            raise _bad(text, f"cannot split the command: {exc}") from None
        if not argv:
            raise _bad(text, "empty command", hint="e.g. cmd:ping -c1 -W1 192.0.2.1")
        return Probe(url=text, kind="cmd", command=tuple(argv))
    scheme, sep, rest = text.partition("://")
    if not sep:
        hint = f"did you mean tcp://{text}?" if re.search(r":\d+$", text) else None
        raise _bad(text, f"no scheme; expected one of: {_FORMS}", hint=hint)
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        return _parse_http(text, "http" if scheme == "http" else "https")
    if scheme == "tcp":
        return _parse_network(text, "tcp", rest)
    if scheme == "ssh":
        return _parse_network(text, "ssh", rest)
    if scheme == "ssh-auth":
        return _parse_network(text, "ssh-auth", rest)
    raise _bad(text, f"unknown probe type {scheme!r}; expected one of: {_FORMS}")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """The outcome of one probe attempt.  `error` is set iff `ok` is false."""

    url: str
    ok: bool
    latency_s: float
    error: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (latency rounded to the microsecond)."""
        return {
            "url": self.url,
            "ok": self.ok,
            "latency_s": round(self.latency_s, 6),
            "error": self.error,
            "detail": self.detail,
        }


def run_probe(
    probe: Probe,
    *,
    timeout: float = 3.0,
    key_filename: str | None = None,
    known_hosts: str | None = None,
    verify_tls: bool = True,
) -> ProbeResult:
    """Run one probe attempt with its own `timeout` (seconds) and report the outcome.

    Never raises for a network or command failure: `ok` is false and `error` says why.
    `key_filename` and `known_hosts` are used by ssh-auth probes (without `key_filename`,
    the agent and the default keys are tried; without `known_hosts`, any host key is
    accepted and `detail` says so).  `verify_tls=False` accepts any certificate for https.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    start = time.monotonic()
    deadline = SocketDeadline(timeout)
    error: str | None = None
    detail: str | None = None
    try:
        if probe.kind == "tcp":
            detail = probe_tcp(probe, deadline)
        elif probe.kind == "ssh":
            detail = probe_ssh(probe, deadline)
        elif probe.kind == "ssh-auth":
            detail = probe_ssh_auth(
                probe, deadline, key_filename=key_filename, known_hosts=known_hosts
            )
        elif probe.kind in ("http", "https"):
            detail = probe_http(probe, timeout, verify_tls=verify_tls)
        elif probe.kind == "cmd":
            detail = probe_cmd(probe, timeout)
        else:  # pragma: no cover - Probe.kind is a Literal
            error = f"unknown probe kind {probe.kind!r}"
    except ProbeFailed as exc:
        error, detail = exc.error, exc.detail
    except Exception as exc:  # a probe must never take the guard down
        error = f"{type(exc).__name__}: {exc}"
    latency = time.monotonic() - start
    return ProbeResult(
        url=probe.url, ok=error is None, latency_s=latency, error=error, detail=detail
    )


def run_probes(
    probes: Sequence[Probe],
    *,
    timeout: float = 3.0,
    key_filename: str | None = None,
    known_hosts: str | None = None,
    verify_tls: bool = True,
) -> list[ProbeResult]:
    """Run `probes` concurrently (one daemon thread each); results come in input order.

    A probe whose thread has not finished `timeout` + 2 s after the start is reported as
    failed (its thread is left behind as a daemon), so this call is bounded in time even if,
    say, a DNS lookup hangs.
    """
    results: list[ProbeResult | None] = [None] * len(probes)

    def worker(index: int, probe: Probe) -> None:
        results[index] = run_probe(
            probe,
            timeout=timeout,
            key_filename=key_filename,
            known_hosts=known_hosts,
            verify_tls=verify_tls,
        )

    start = time.monotonic()
    threads = []
    for index, probe in enumerate(probes):
        thread = threading.Thread(
            target=worker, args=(index, probe), name=f"fwsafe-probe-{index}", daemon=True
        )
        thread.start()
        threads.append(thread)
    end = start + timeout + _JOIN_GRACE_S
    for thread in threads:
        thread.join(max(end - time.monotonic(), 0.0))
    out: list[ProbeResult] = []
    for probe, result in zip(probes, results):
        if result is None:
            result = ProbeResult(
                url=probe.url,
                ok=False,
                latency_s=time.monotonic() - start,
                error=f"probe did not finish within {timeout + _JOIN_GRACE_S:g}s",
            )
        out.append(result)
    return out
