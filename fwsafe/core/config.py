"""The configuration file: ``/etc/fwsafe/fwsafe.toml`` (or ``--config FILE``, or $FWSAFE_CONFIG).

Every key is optional; see ``examples/fwsafe.toml`` for an annotated example.  Unknown keys and
wrong types are errors (with a "did you mean" suggestion), so that a typo never silently falls
back to a default.

This module finds and loads the file (`load_config`) and holds what it gives: the defaults,
`Config`, the hosts' targets, the ports `audit` expects open. Each key is read and checked by
fwsafe.core.config_checks.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fwsafe.core.config_checks import (
    DEFAULT_PORT,
    HostConfig,
    PersistMode,
    Reader,
    check_hosts,
    check_list,
    check_persist,
    check_probes,
    check_sources,
    check_state_dir,
    toml_error,
)
from fwsafe.core.endpoints import format_host_port, split_endpoint
from fwsafe.core.probes import Probe, parse_probe
from fwsafe.errors import ConfigError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_USER",
    "ENV_VAR",
    "Config",
    "HostTarget",
    "OpenPort",
    "load_config",
    "parse_open_port",
]

#: Read when neither ``--config`` nor $FWSAFE_CONFIG is given (and only if it exists).
DEFAULT_CONFIG_PATH = "/etc/fwsafe/fwsafe.toml"
ENV_VAR = "FWSAFE_CONFIG"
DEFAULT_USER = "root"
#: The longest window `apply --timeout` and `extend` accept by default (`max_timeout`): 24 h.
DEFAULT_MAX_TIMEOUT = 86400
#: The largest rules file read by default (`max_rules_bytes`): 64 MiB.
DEFAULT_MAX_RULES_BYTES = 64 * 1024 * 1024
MIN_SECONDS = 1.0
#: The backstop kills a guard stuck past its deadline after this many seconds (`stuck_grace`).
DEFAULT_STUCK_GRACE = 5.0
#: The kernel escape hatch opens this many seconds after the deadline (`hatch_grace`).
DEFAULT_HATCH_GRACE = 30.0



#: What `fwsafe audit` expects the world to reach when the config names nothing (`expected_open`).
DEFAULT_EXPECTED_OPEN: tuple[str, ...] = ("22/tcp",)
_OPEN_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?/(tcp|udp)$")


@dataclass(frozen=True)
class HostTarget:
    """Where to connect: the result of `Config.resolve_host`.  Paths have ``~`` expanded.

    `name` is the ``[hosts.NAME]`` the target came from, or None for an ad-hoc spec.
    """

    host: str
    port: int = DEFAULT_PORT
    user: str = DEFAULT_USER
    key: str | None = None
    known_hosts: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.user}@{self.hostport}"

    @property
    def hostport(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        return format_host_port(self.host, self.port)

    def probe_url(self, kind: Literal["tcp", "ssh", "ssh-auth"] = "ssh-auth") -> str:
        """A probe URL for this target, e.g. ``ssh-auth://root@[fd00::1]:22``."""
        if kind == "tcp":
            return f"tcp://{self.hostport}"
        return f"{kind}://{self.user}@{self.hostport}"


@dataclass(frozen=True)
class Config:
    """The effective configuration.  `source` is the file it was read from (None: defaults)."""

    timeout: int = 60
    state_dir: str = "/var/lib/fwsafe"
    probe_interval: float = 2.0
    probe_failures: int = 3
    probe_timeout: float = 3.0
    probes: tuple[str, ...] = ()
    history_keep: int = 50
    persist: PersistMode = "auto"
    max_timeout: int = DEFAULT_MAX_TIMEOUT
    max_rules_bytes: int = DEFAULT_MAX_RULES_BYTES
    boot_hook: bool = True   # on systemd hosts, apply installs the boot recovery unit
    reboot_recovery: bool = True   # the boot unit's recovery by power cycle
    reboot_recovery_window: float = 600.0   # ... two boots at most this many seconds apart
    expected_open: tuple[str, ...] = DEFAULT_EXPECTED_OPEN   # `fwsafe audit`: "PORT[-PORT]/PROTO"
    stuck_grace: float = DEFAULT_STUCK_GRACE  # the backstop kills a guard stuck this long past
    hatch: bool = True                        # the kernel escape hatch with every apply
    hatch_grace: float = DEFAULT_HATCH_GRACE  # ... opens this long after the deadline
    admin_sources: tuple[str, ...] = ()       # who it lets in besides this SSH session's client
    hosts: dict[str, HostConfig] = field(default_factory=dict)
    source: str | None = None

    def seconds(self, text: str | float, what: str) -> float:
        """A number of seconds from the command line (`--timeout`, `extend SECONDS`), bounded
        by `max_timeout`; see `check_seconds`."""
        return check_seconds(text, what=what, maximum=self.max_timeout)

    def parsed_probes(self) -> list[Probe]:
        """`probes` parsed (they were validated when the file was loaded)."""
        return [parse_probe(url) for url in self.probes]

    def resolve_host(self, spec: str) -> HostTarget:
        """A named host (``web1``) or ``[USER@]HOST[:PORT]`` (``root@[fd00::1]:2222``).

        A name from ``[hosts.*]`` wins over a DNS name.  Raises UsageError for a malformed
        spec.
        """
        named = self.hosts.get(spec)
        if named is not None:
            return HostTarget(
                host=named.host,
                port=named.port,
                user=named.user or DEFAULT_USER,
                key=_expand(named.key),
                known_hosts=_expand(named.known_hosts),
                name=named.name,
            )
        try:
            user, host, port = split_endpoint(spec.strip())
        except ValueError as exc:
            hint = None
            if self.hosts:
                close = difflib.get_close_matches(spec, list(self.hosts), n=1)
                hint = (
                    f"did you mean the configured host {close[0]!r}?"
                    if close
                    else f"configured hosts: {', '.join(sorted(self.hosts))}"
                )
            raise UsageError(
                f"invalid host {spec!r}: {exc} (expected NAME or [USER@]HOST[:PORT])", hint=hint
            ) from None
        return HostTarget(
            host=host,
            port=port if port is not None else DEFAULT_PORT,
            user=user or DEFAULT_USER,
        )


@dataclass(frozen=True)
class OpenPort:
    """One `expected_open` entry: a port (or a range of ports) and a protocol."""

    low: int
    high: int
    proto: str

    def matches(self, proto: str, port: int) -> bool:
        return proto == self.proto and self.low <= port <= self.high

    def __str__(self) -> str:
        ports = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return f"{ports}/{self.proto}"


def parse_open_port(text: str) -> OpenPort:
    """"22/tcp", "60000-61000/udp" -> OpenPort; ValueError (saying what is wrong) otherwise."""
    match = _OPEN_PORT_RE.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not PORT/PROTO (e.g. \"443/tcp\", \"60000-61000/udp\"; "
                         "PROTO is tcp or udp)")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: ports must be 1-65535, the range low to high")
    return OpenPort(low, high, match.group(3))


def check_seconds(text: str | float, *, what: str, maximum: float = DEFAULT_MAX_TIMEOUT) -> float:
    """A finite number of seconds from 1 to `maximum`; anything else (inf, nan, zero, a
    negative or a larger number, not a number) is a UsageError (exit 2) in one line."""
    allowed = f"give 1 to {maximum:g} s (max_timeout in the config)"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {str(text)!r} is not a number of seconds; {allowed}") from None
    if not math.isfinite(value):
        raise UsageError(f"{what}: {text} is not a finite number of seconds; {allowed}")
    if not MIN_SECONDS <= value <= maximum:
        raise UsageError(f"{what}: {text} s is out of range; {allowed}")
    return value


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.expanduser(path)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | None, *, env: Mapping[str, str] = os.environ) -> Config:
    """Load the configuration.

    Resolution: `path` (must exist) > $FWSAFE_CONFIG (must exist; empty means unset) >
    `DEFAULT_CONFIG_PATH` if it exists > the built-in defaults.  Raises ConfigError naming
    the file (and the key path, or the line for a TOML syntax error).
    """
    if path is not None:
        return _load_file(path, origin="--config")
    env_path = env.get(ENV_VAR)
    if env_path:
        return _load_file(env_path, origin=f"${ENV_VAR}")
    if os.path.exists(DEFAULT_CONFIG_PATH):
        return _load_file(DEFAULT_CONFIG_PATH, origin="default")
    return Config()


def _load_file(path: str, *, origin: str) -> Config:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (from {origin})",
            hint="create it (see examples/fwsafe.toml) or point --config elsewhere",
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the configuration") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(path, exc) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _build(path, data)


def _build(path: str, data: Mapping[str, Any]) -> Config:
    top = Reader(path, data, "")
    timeout = top.take("timeout", top.int_min(1), 60)
    state_dir = top.take("state_dir", lambda k, v: check_state_dir(top, k, v), "/var/lib/fwsafe")
    probe_interval = top.take("probe_interval", top.positive_number, 2.0)
    probe_failures = top.take("probe_failures", top.int_min(1), 3)
    probe_timeout = top.take("probe_timeout", top.positive_number, 3.0)
    probes = top.take("probes", lambda k, v: check_probes(top, k, v), ())
    history_keep = top.take("history_keep", top.int_min(1), 50)
    persist = top.take("persist", lambda k, v: check_persist(top, k, v), "auto")
    max_timeout = top.take("max_timeout", top.int_min(1), DEFAULT_MAX_TIMEOUT)
    max_rules_bytes = top.take("max_rules_bytes", top.int_min(1), DEFAULT_MAX_RULES_BYTES)
    boot_hook = top.take("boot_hook", top.boolean, True)
    reboot_recovery = top.take("reboot_recovery", top.boolean, True)
    reboot_recovery_window = top.take("reboot_recovery_window", top.positive_number, 600.0)
    expected_open = top.take("expected_open", lambda k, v: _check_open_ports(top, k, v),
                             DEFAULT_EXPECTED_OPEN)
    hosts = top.take("hosts", lambda k, v: check_hosts(path, top, k, v), {})
    stuck_grace = top.take("stuck_grace", top.positive_number, DEFAULT_STUCK_GRACE)
    hatch = top.take("hatch", top.boolean, True)
    hatch_grace = top.take("hatch_grace", top.positive_number, DEFAULT_HATCH_GRACE)
    admin_sources = top.take("admin_sources", lambda k, v: check_sources(top, k, v), ())
    top.finish()
    if timeout > max_timeout:
        raise top.error("timeout", f"must be <= max_timeout ({max_timeout}), got {timeout}")
    return Config(
        timeout=timeout,
        state_dir=state_dir,
        probe_interval=probe_interval,
        probe_failures=probe_failures,
        probe_timeout=probe_timeout,
        probes=probes,
        history_keep=history_keep,
        persist=persist,
        max_timeout=max_timeout,
        max_rules_bytes=max_rules_bytes,
        boot_hook=boot_hook,
        reboot_recovery=reboot_recovery,
        reboot_recovery_window=reboot_recovery_window,
        expected_open=expected_open,
        stuck_grace=stuck_grace,
        hatch=hatch,
        hatch_grace=hatch_grace,
        admin_sources=admin_sources,
        hosts=hosts,
        source=path,
    )


def _check_open_ports(reader: Reader, key: str, value: Any) -> tuple[str, ...]:
    return check_list(reader, key, value, 'an array of "PORT/PROTO" strings',
                       'a "PORT/PROTO" string', lambda item: str(parse_open_port(item)))
