"""The config file's keys read and checked (for fwsafe.core.config, which builds the Config):
a `Reader` that takes each key of a table with its type check and reports unknown ones with a
"did you mean", the TOML syntax error with its line, and the checks of the values that need
more than a type (probe URLs, addresses, the persist mode, the [hosts.NAME] tables)."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Literal

from fwsafe.core.endpoints import USER_RE, validate_host
from fwsafe.core.probes import parse_probe
from fwsafe.errors import ConfigError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

__all__ = ["DEFAULT_PORT", "PERSIST_MODES", "HostConfig", "PersistMode", "Reader", "check_hosts",
           "check_list", "check_persist", "check_probes", "check_sources", "check_state_dir",
           "describe", "toml_error"]

#: The SSH port of a [hosts.NAME] (and of an ad-hoc host) that names none.
DEFAULT_PORT = 22
PersistMode = Literal["auto", "netfilter-persistent", "nftables", "none"]
PERSIST_MODES: tuple[PersistMode, ...] = ("auto", "netfilter-persistent", "nftables", "none")

_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HostConfig:
    """A ``[hosts.NAME]`` table.  `user`, `key`, `known_hosts` are None when not given."""

    name: str
    host: str
    user: str | None = None
    port: int = DEFAULT_PORT
    key: str | None = None
    known_hosts: str | None = None


_AT_LINE_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_AT_EOF_RE = re.compile(r"\s*\(at end of document\)$")


def toml_error(path: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    message = str(exc)
    line: int | None = getattr(exc, "lineno", None)
    column: int | None = getattr(exc, "colno", None)
    msg = getattr(exc, "msg", None)
    match = _AT_LINE_RE.search(message)
    if match:
        line, column = line or int(match.group(1)), column or int(match.group(2))
        message = message[: match.start()]
    elif _AT_EOF_RE.search(message):
        message = _AT_EOF_RE.sub("", message) + " (at end of file)"
    if isinstance(msg, str) and msg:
        message = msg
    where = f"{path}:{line}" if line is not None else path
    col = f", column {column}" if column is not None and line is not None else ""
    return ConfigError(f"{where}: invalid TOML: {message}{col}")


class Reader:
    """Validates one table: each `take` pops a key; `finish` reports what is left."""

    def __init__(self, path: str, table: Mapping[str, Any], prefix: str) -> None:
        self.path = path
        self.table = dict(table)
        self.prefix = prefix
        self.known: list[str] = []

    def keypath(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def error(self, key: str, what: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.path}: {self.keypath(key)}: {what}", hint=hint)

    def take(self, key: str, check: Callable[[str, Any], Any], default: Any) -> Any:
        self.known.append(key)
        if key not in self.table:
            return default
        return check(key, self.table.pop(key))

    def finish(self) -> None:
        for key in self.table:
            close = difflib.get_close_matches(key, self.known, n=1, cutoff=0.6)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{self.path}: unknown key {self.keypath(key)!r}{suggestion}",
                hint=f"valid keys here: {', '.join(self.known)}",
            )

    # -- type checks --------------------------------------------------------------------------

    def type_error(self, key: str, expected: str, value: Any) -> ConfigError:
        return self.error(key, f"expected {expected}, got {describe(value)}")

    def int_min(self, minimum: int) -> Callable[[str, Any], int]:
        def check(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.type_error(key, "an integer", value)
            if value < minimum:
                raise self.error(key, f"must be >= {minimum}, got {value}")
            return value

        return check

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.type_error(key, "a boolean", value)
        return value

    def positive_number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.type_error(key, "a number", value)
        if not value > 0 or value != value or value == float("inf"):
            raise self.error(key, f"must be a positive number, got {value}")
        return float(value)

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.type_error(key, "a string", value)
        if not value:
            raise self.error(key, "must not be empty")
        return value


def describe(value: Any) -> str:
    kinds = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return kind
    text = repr(value) if not isinstance(value, bool) else str(value).lower()
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} ({text})"


def check_state_dir(reader: Reader, key: str, value: Any) -> str:
    text = os.path.expanduser(reader.string(key, value))
    if not os.path.isabs(text):
        raise reader.error(key, f"must be an absolute path, got {value!r}")
    return os.path.normpath(text)


def check_probes(reader: Reader, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise reader.type_error(key, "an array of probe URLs", value)
    urls: list[str] = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if not isinstance(item, str):
            raise reader.type_error(item_key, "a probe URL string", item)
        try:
            parse_probe(item)
        except UsageError as exc:
            raise reader.error(item_key, exc.message, hint=exc.hint) from None
        urls.append(item.strip())
    return tuple(urls)


def check_list(reader: Reader, key: str, value: Any, array: str, item_kind: str,
                parse: Callable[[str], str]) -> tuple[str, ...]:
    """An array of strings, each read by `parse` (a ValueError says what is wrong)."""
    if not isinstance(value, list):
        raise reader.type_error(key, array, value)
    entries: list[str] = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if not isinstance(item, str):
            raise reader.type_error(item_key, item_kind, item)
        try:
            entries.append(parse(item))
        except ValueError as exc:
            raise reader.error(item_key, str(exc)) from None
    return tuple(entries)


def _source(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network") from None


def check_sources(reader: Reader, key: str, value: Any) -> tuple[str, ...]:
    return check_list(reader, key, value, 'an array of addresses or networks '
                       '("203.0.113.7", "2001:db8::/64")', "an address or network string",
                       _source)


def check_persist(reader: Reader, key: str, value: Any) -> PersistMode:
    text = reader.string(key, value)
    for mode in PERSIST_MODES:
        if text == mode:
            return mode
    close = difflib.get_close_matches(text, PERSIST_MODES, n=1)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    raise reader.error(
        key,
        f"unknown value {text!r}{suggestion}",
        hint=f"one of: {', '.join(PERSIST_MODES)}",
    )


def check_hosts(path: str, reader: Reader, key: str, value: Any) -> dict[str, HostConfig]:
    if not isinstance(value, dict):
        raise reader.type_error(key, "a table of [hosts.NAME] tables", value)
    hosts: dict[str, HostConfig] = {}
    for name, table in value.items():
        name_key = f"{key}.{name}"
        if not _HOST_NAME_RE.match(name):
            raise reader.error(
                name_key,
                "invalid host name (use letters, digits, '.', '_' and '-')",
            )
        if not isinstance(table, dict):
            raise reader.type_error(name_key, "a table", table)
        hosts[name] = _check_host_table(path, name, table, f"{name_key}.")
    return hosts


def _check_host_table(path: str, name: str, table: Mapping[str, Any], prefix: str) -> HostConfig:
    reader = Reader(path, table, prefix)

    def host_check(key: str, value: Any) -> str:
        text = reader.string(key, value)
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if "@" in text or text.count(":") == 1:
            raise reader.error(
                key,
                f"invalid host name {text!r}",
                hint="only the host goes here: the user goes in 'user', the port in 'port'",
            )
        try:
            return validate_host(text, allow_bare_ipv6=True)
        except ValueError as exc:
            raise reader.error(key, str(exc)) from None

    def user_check(key: str, value: Any) -> str:
        text = reader.string(key, value)
        if not USER_RE.match(text):
            raise reader.error(key, f"invalid user name {text!r}")
        return text

    def port_check(key: str, value: Any) -> int:
        port: int = reader.int_min(1)(key, value)
        if port > 65535:
            raise reader.error(key, f"port {port} out of range 1-65535")
        return port

    host = reader.take("host", host_check, None)
    user = reader.take("user", user_check, None)
    port = reader.take("port", port_check, DEFAULT_PORT)
    key = reader.take("key", reader.string, None)
    known_hosts = reader.take("known_hosts", reader.string, None)
    reader.finish()
    if host is None:
        raise ConfigError(f"{path}: {prefix}host: missing (required in every [hosts.NAME])")
    return HostConfig(name=name, host=host, user=user, port=port, key=key, known_hosts=known_hosts)
