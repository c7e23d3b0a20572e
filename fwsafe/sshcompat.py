"""paramiko across the versions fwsafe runs with: Debian 12's 2.12 (the .deb depends on the
distribution's python3-paramiko) and 3.x/4.x from PyPI (pip, pipx).

Two things fwsafe uses arrived in paramiko 3.x: a key's ``fingerprint`` (``SHA256:...``, as
OpenSSH prints it) and ``SSHClient.connect(channel_timeout=...)``. These helpers give the same
result everywhere; paramiko itself is imported only where it is used.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
from typing import Any


def fingerprint(key: Any) -> str:
    """``SHA256:<base64 without padding>`` of a paramiko public key (OpenSSH's format)."""
    value = getattr(key, "fingerprint", None)
    if isinstance(value, str):
        return value
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def channel_timeout(client: Any, seconds: float) -> dict[str, float]:
    """``{"channel_timeout": seconds}`` for ``client.connect`` where paramiko knows it (3.x);
    ``{}`` on older versions, where opening a channel takes the timeout of the call itself."""
    try:
        known = "channel_timeout" in inspect.signature(client.connect).parameters
    except (TypeError, ValueError):
        known = False
    return {"channel_timeout": seconds} if known else {}
