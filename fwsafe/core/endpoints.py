"""Host and port syntax shared by the probes (fwsafe.core.probes), the config file
(fwsafe.core.config, its [hosts]) and the remote commands: a host name or IP address,
``[USER@]HOST[:PORT]`` with IPv6 literals in brackets, and ``host:port`` written back."""

from __future__ import annotations

import ipaddress
import re

_LABEL_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
#: A login name as probes, the config and the remote commands accept it.
USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._$-]*$")


def validate_host(host: str, *, allow_bare_ipv6: bool = True) -> str:
    """Check that `host` is a hostname, an IPv4 address or (bare) IPv6 address; return it.

    Brackets are not accepted here (see `split_endpoint`).  Raises ValueError with a short
    reason.
    """
    if not host:
        raise ValueError("empty host")
    if ":" in host:
        if not allow_bare_ipv6:
            raise ValueError(f"IPv6 address {host!r} must be written in brackets, e.g. [{host}]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
        return host
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None
        return host
    if len(name) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"invalid host name {host!r}")
    return host


def _parse_port(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid port {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port


def split_endpoint(text: str) -> tuple[str | None, str, int | None]:
    """Split ``[USER@]HOST[:PORT]`` into ``(user, host, port)``; missing parts are None.

    IPv6 literals must be bracketed (``root@[fd00::1]:2222``); the brackets are removed from
    the returned host.  Raises ValueError with a short reason when the text is malformed.
    """
    if not text:
        raise ValueError("empty host")
    if any(c.isspace() for c in text):
        raise ValueError("whitespace is not allowed")
    user: str | None = None
    rest = text
    if "@" in text:
        user, _, rest = text.rpartition("@")
        if not user:
            raise ValueError("empty user name before '@'")
        if not USER_RE.match(user):
            raise ValueError(f"invalid user name {user!r}")
    port: int | None = None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError("missing ']' after IPv6 address")
        host = rest[1:end]
        after = rest[end + 1 :]
        if not host:
            raise ValueError("empty IPv6 address in brackets")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address [{host}]") from None
        if after:
            if not after.startswith(":"):
                raise ValueError(f"unexpected {after!r} after ']'")
            port = _parse_port(after[1:])
        return user, host, port
    if rest.count(":") > 1:
        raise ValueError(f"IPv6 address must be written in brackets, e.g. [{rest}]:PORT")
    host, sep, port_text = rest.partition(":")
    if sep:
        port = _parse_port(port_text)
    validate_host(host, allow_bare_ipv6=False)
    return user, host, port


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host put in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
