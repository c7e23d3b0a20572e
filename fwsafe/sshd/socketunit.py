"""sshd started by a socket unit: Debian 13's and Ubuntu 22.10+/24.04's `ssh.socket` with
`Accept=no` (systemd listens and hands the sockets to `ssh.service`'s `sshd -D`).

There, sshd_config's Port and ListenAddress do nothing by themselves: the socket unit's
`ListenStream=` lines are where sshd listens. Detected by behaviour (`detect`): the socket unit
is active, its `Accept=`, `BindIPv6Only=` and `Listen` as systemd reports them, and Ubuntu's
sshd-socket-generator present or not. The ports then live in one of two places:

* with the generator (Ubuntu 24.04): sshd_config itself; the generator turns its Port and
  ListenAddress into the socket's `ListenStream=` at every `systemctl daemon-reload`;
* without it (Debian 13): fwsafe's own drop-in `/etc/systemd/system/ssh.socket.d/zz-fwsafe-listen.conf`
  (`ListenStream=` reset, then one line per address), written from what `sshd -T` says the
  new sshd_config listens on (`listen_streams`).

Putting a change in force (`restart`): `systemctl daemon-reload`, stop `ssh.socket` (so that
no connection starts the service meanwhile), stop `ssh.service` (its `KillMode=process` stops
the listener only: the sessions already open live on; a unit that would kill them is refused
beforehand), start the socket (systemd refuses while the service holds the old sockets, hence
the stops), start the service again, and wait until the socket and the listener listen on the
expected ports.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fwsafe.ondisk.sshd_files import DROPIN_NAME, SOCKET_UNITS, UNIT_DIR
from fwsafe.sshd.daemon import (
    Effective,
    ReloadError,
    active_unit,
    is_sshd,
    listening,
    systemctl,
    systemd_main_pid,
    systemd_running,
)
from fwsafe.sshd.ports import WILDCARDS, listen_addresses
from fwsafe.sshd.sshd_config import SSHD_CONFIG

GENERATOR = "/usr/lib/systemd/system-generators/sshd-socket-generator"
RESTART_WAIT_S = 15.0
DROPIN_HEADER = (b"# Written by fwsafe (sshd set): where sshd listens, from sshd_config's Port and\n"
                 b"# ListenAddress. fwsafe rewrites it at the next change of those.\n")


@dataclass(frozen=True)
class SocketUnit:
    """The socket unit that starts the system's sshd, as systemd reports it."""

    unit: str                         # ssh.socket (or sshd.socket)
    accept: bool                      # Accept=yes: one sshd per connection (inetd style)
    listens: tuple[str, ...]          # systemd's Listen entries: "[::]:22", "0.0.0.0:2222"
    ipv6_only: bool = False           # BindIPv6Only=ipv6-only: "[::]:P" does not serve IPv4
    generator: bool = False           # Ubuntu's sshd-socket-generator makes ListenStream=

    @property
    def service(self) -> str:
        return self.unit.removesuffix(".socket") + ".service"

    @property
    def dropin_dir(self) -> str:
        return f"{UNIT_DIR}/{self.unit}.d"

    @property
    def dropin(self) -> str:
        """fwsafe's own drop-in (used where there is no generator)."""
        return f"{self.dropin_dir}/{DROPIN_NAME}"

    def addresses(self) -> list[tuple[str, int]]:
        """(address, port) it listens on, as listen_addresses gives them for sshd -T: a
        dual-stack "[::]:P" serves IPv4 too, so it counts as 0.0.0.0 as well."""
        out: list[tuple[str, int]] = []
        for entry in self.listens:
            host, _, port = entry.rpartition(":")
            if not port.isdigit():
                continue
            host = host.strip("[]") or "::"
            out.append((host, int(port)))
            if host == "::" and not self.ipv6_only:
                out.append(("0.0.0.0", int(port)))
        return out

    def ports(self) -> list[int]:
        return sorted({port for _, port in self.addresses()})

    def as_effective(self, values: Effective) -> Effective:
        """`values` (sshd -T) with the socket's addresses as its listenaddress lines."""
        out = dict(values)
        out["listenaddress"] = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                                for h, p in self.addresses()]
        return out


def socket_files(unit_dir: str = UNIT_DIR) -> list[str]:
    """The administrator's files that shape sshd's socket units: an override of a unit and
    every drop-in (the snapshot holds them; a revert puts them back byte for byte)."""
    found = []
    for unit in SOCKET_UNITS:
        whole = f"{unit_dir}/{unit}"
        if os.path.isfile(whole) and not os.path.islink(whole):
            found.append(whole)
        dropins = f"{whole}.d"
        try:
            names = sorted(os.listdir(dropins))
        except OSError:
            continue
        found += [f"{dropins}/{n}" for n in names if n.endswith(".conf")
                  and os.path.isfile(f"{dropins}/{n}") and not os.path.islink(f"{dropins}/{n}")]
    return found


def is_socket_file(path: str, unit_dir: str = UNIT_DIR) -> bool:
    """Is `path` one of the files socket_files() may list (existing or not)?"""
    return any(path == f"{unit_dir}/{unit}" or path.startswith(f"{unit_dir}/{unit}.d/")
               for unit in SOCKET_UNITS)


def parse_show(text: str) -> tuple[bool, tuple[str, ...], bool]:
    """Accept, Listen and BindIPv6Only from `systemctl show -p Accept -p Listen -p
    BindIPv6Only` ("Listen=[::]:22 (Stream)", one line per address)."""
    accept, ipv6_only = False, False
    listens: list[str] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "Accept":
            accept = value.strip() == "yes"
        elif key == "BindIPv6Only":
            ipv6_only = value.strip() == "ipv6-only"
        elif key == "Listen" and value.strip().endswith("(Stream)"):
            listens.append(value.strip().removesuffix("(Stream)").strip())
    return accept, tuple(listens), ipv6_only


def failed_unit(units: tuple[str, ...] = SOCKET_UNITS) -> str | None:
    """The first of `units` that systemd reports as failed (a socket that could not listen)."""
    for unit in units:
        code, out = systemctl("is-failed", unit)
        if code == 0 and out.splitlines()[:1] == ["failed"]:
            return unit
    return None


def detect(config: str, *, generator: str = GENERATOR,
           failed_too: bool = False) -> SocketUnit | None:
    """The socket unit that starts the sshd reading `config`, if there is one (only the
    system's sshd, /etc/ssh/sshd_config, on a host run by systemd); with `failed_too`, also a
    socket unit that failed (a revert brings it back)."""
    if config != SSHD_CONFIG or not systemd_running():
        return None
    unit = active_unit(SOCKET_UNITS) or (failed_unit() if failed_too else None)
    if unit is None:
        return None
    code, out = systemctl("show", "-p", "Accept", "-p", "Listen", "-p", "BindIPv6Only", unit)
    if code != 0:
        return None
    accept, listens, ipv6_only = parse_show(out)
    return SocketUnit(unit, accept, listens, ipv6_only, os.path.exists(generator))


def listen_streams(values: Effective) -> tuple[list[str], bool]:
    """The `ListenStream=` values for what `sshd -T` says sshd listens on, and whether they
    need `BindIPv6Only=ipv6-only`: a port on both wildcards is one dual-stack `ListenStream=PORT`
    (as Debian's ssh.socket has it); any other address is given as is."""
    wanted = listen_addresses(values)
    streams: list[str] = []
    ipv6_only = False
    for host, port in wanted:
        both = {("0.0.0.0", port), ("::", port)} <= set(wanted)
        if both and host in WILDCARDS:
            value = str(port)
        elif ":" in host:
            value = f"[{host}]:{port}"
            ipv6_only = ipv6_only or host == "::"
        else:
            value = f"{host}:{port}"
        if value not in streams:
            streams.append(value)
    return streams, ipv6_only


def dropin_content(values: Effective) -> bytes:
    """fwsafe's drop-in for the socket: ListenStream= reset, then where sshd -T listens."""
    streams, ipv6_only = listen_streams(values)
    lines = ["[Socket]", "ListenStream="] + [f"ListenStream={s}" for s in streams]
    if ipv6_only:
        lines.append("BindIPv6Only=ipv6-only")
    return DROPIN_HEADER + ("\n".join(lines) + "\n").encode()


def refusal(sock: SocketUnit) -> str | None:
    """Why fwsafe will not change where this socket-activated sshd listens (None: it will)."""
    if sock.accept:
        return (f"{sock.unit} has Accept=yes (one sshd per connection): fwsafe changes the "
                "listening ports of Accept=no sockets only")
    code, out = systemctl("show", "-p", "KillMode", "--value", sock.service)
    mode = out.strip() if code == 0 else "unknown"
    if mode != "process":
        return (f"{sock.service} has KillMode={mode}: stopping its listener to move the socket "
                "would end the open SSH sessions")
    return None


def _step(*args: str) -> None:
    code, out = systemctl(*args)
    if code != 0:
        raise ReloadError(f"systemctl {' '.join(args)} failed: {out}")


def restart(sock: SocketUnit, ports: set[int] | None, wait_s: float = RESTART_WAIT_S) -> str:
    """Put new socket settings and sshd_config in force without ending open sessions (see the
    module's doc); what was done. Raises ReloadError."""
    _step("daemon-reload")
    # The socket first: while it listens, any connection (a scanner, a monitor, a probe)
    # starts the service again, and systemd then refuses to start the socket anew ("service
    # already active") and leaves it failed.
    _step("stop", sock.unit)
    _step("stop", sock.service)          # KillMode=process: the listener only
    try:
        _step("start", sock.unit)
    except ReloadError:
        systemctl("start", sock.service)   # sshd alone, on sshd_config's ports, meanwhile
        raise
    _step("start", sock.service)
    end = time.monotonic() + wait_s
    seen: set[int] = set()
    while True:
        now = detect(SSHD_CONFIG)
        pid = systemd_main_pid(sock.service)
        if now is not None and pid is not None and is_sshd(pid):
            seen = set(listening(pid).values())
            if seen and (ports is None or (ports <= seen and ports == set(now.ports()))):
                return (f"systemctl daemon-reload; stop {sock.unit} and {sock.service}; "
                        f"start them; sshd (PID {pid}) "
                        f"listens on {', '.join(map(str, sorted(seen)))}")
        if time.monotonic() > end:
            want = f" (expected {', '.join(map(str, sorted(ports)))})" if ports else ""
            state = ("the socket unit is not active" if now is None else
                     f"the socket listens on {', '.join(now.listens) or 'nothing'}, sshd on "
                     f"{', '.join(map(str, sorted(seen))) or 'nothing'}")
            raise ReloadError(f"{sock.unit} did not come back within {wait_s:g} s: "
                              f"{state}{want}")
        time.sleep(0.1)
