"""The lockout check of a change to sshd's configuration: once it is live, could the user who
must confirm it log in again, through a NEW session?

The user is the one of this SSH session (`$SUDO_USER`, else `$USER`), or `--user`; the client,
the address and the port it arrives at are those of `$SSH_CONNECTION` (outside a session: the
established connections to sshd). For each client, sshd itself says which values it would use
for that login (`sshd -T -C user=..,addr=..,laddr=..,lport=..` on the candidate, Match blocks
applied), and fwsafe.sshd.access judges them: AllowUsers/DenyUsers/AllowGroups/DenyGroups,
PermitRootLogin, a method that works (an authorized key; a password), AuthenticationMethods.

Where sshd would listen: the address the session arrives at must still be served; if the port
moves, the firewall (the change's rules, else the live ones) is tried with the new port in the
check's sandbox (fwsafe.check.precheck), as `apply` tries a rules file.

A problem that the current configuration shows just the same is not weighed (the user is logged
in, so something fwsafe cannot see lets them in: PAM, GSSAPI, an AuthorizedKeysCommand); it is
reported as not checked.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fwsafe.backends import PREDICTED, layer_has, layers_with
from fwsafe.backends.sshd_layer import SshdLayer, is_sshd_layer
from fwsafe.check.clients import Session, default_sessions
from fwsafe.core.change import Change
from fwsafe.errors import LockoutRefused
from fwsafe.ondisk.sshd_files import load
from fwsafe.sshd import access
from fwsafe.sshd.daemon import Effective, effective
from fwsafe.sshd.ports import WILDCARDS, listen_addresses
from fwsafe.sshd.socketunit import detect
from fwsafe.sshd.sshd_config import Tree, read_tree

REFUSED_HINT = ("nothing was changed; fix the setting, or apply anyway with --force (the guard "
                "still reverts it unless confirmed)")


def confirming_user(explicit: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Who logs in to confirm: --user, else the user behind sudo, else this session's user."""
    environ = os.environ if env is None else env
    for value in (explicit, environ.get("SUDO_USER"), environ.get("USER"),
                  environ.get("LOGNAME")):
        if value:
            return value
    return pwd.getpwuid(os.getuid()).pw_name


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)

    @property
    def lockout(self) -> bool:
        return bool(self.problems)

    def summary(self) -> str:
        text = "; ".join(self.problems if self.problems else self.ok) or "nothing to check"
        if self.notes:
            text += "; NOT checked: " + "; ".join(self.notes[:3])
        return text


def served_ports(values: Effective, server: str) -> list[int]:
    """The ports sshd listens on at `server` (an address of this host)."""
    ports = set()
    for address, port in listen_addresses(values):
        family_match = (":" in address) == (":" in server)
        if address == server or (address in WILDCARDS and family_match):
            ports.add(port)
    return sorted(ports)


def _spec(user: str, session: Session | None, port: int | None) -> dict[str, str]:
    spec = {"user": user}
    if session is not None:
        spec.update(host=session.client, addr=session.client, laddr=session.server,
                    lport=str(port or session.server_port))
    return spec


class SshdCheck:
    """One change's check (see the module's documentation)."""

    def __init__(self, change: Change, user: str | None = None) -> None:
        self.change = change
        self.user = confirming_user(user)
        self.who = access.account(self.user)
        self.verdict = Verdict()
        self.trees: list[tuple[Tree, Tree]] = []
        for name, content in change.layers.items():
            if is_sshd_layer(name):
                layer = SshdLayer.for_name(name)
                self.trees.append((layer.tree(), layer.tree(load(content))))
        self.sessions, _ = default_sessions()
        self.tried: set[int] = set()      # ports the firewall was tried with

    def run(self) -> Verdict:
        if not self.sessions:
            self.verdict.notes.append("no SSH client known (not in an SSH session, no "
                                      "established connection): address-dependent settings "
                                      "and the firewall")
        targets: list[Session | None] = list(self.sessions) or [None]
        for current, candidate in self.trees:
            listening = self._listening_values(current, candidate)
            for session in targets:
                served = served_ports(listening[1], session.server) if session else []
                self._login(current, candidate, session, served)
                if session is not None:
                    self._listening(served_ports(listening[0], session.server), served,
                                    candidate, session)
        return self.verdict

    @staticmethod
    def _listening_values(current: Tree, candidate: Tree) -> tuple[Effective, Effective]:
        """What sshd listens on now and after the change. Started by ssh.socket: now is the
        socket's (systemd's Listen); after is the socket's too unless the change moves Port or
        ListenAddress (then the socket follows sshd_config: fwsafe's drop-in or the generator)."""
        now, new = effective(current), effective(candidate)
        sock = detect(current.main)
        if sock is None:
            return now, new
        moved = listen_addresses(now) != listen_addresses(new)
        return sock.as_effective(now), (new if moved else sock.as_effective(new))

    def _login(self, current: Tree, candidate: Tree, session: Session | None,
               served: list[int]) -> None:
        port = None
        if session is not None and served and session.server_port not in served:
            port = served[0]  # the new port is where the next login arrives
        now_values = effective(current, _spec(self.user, session, None))
        now = self._problems(now_values, session)
        new_values = effective(candidate, _spec(self.user, session, port))
        where = f" from {session.client}" if session else ""
        found = []
        for problem in self._problems(new_values, session):
            if any(p.kind == problem.kind for p in now):
                self.verdict.notes.append(
                    f"{problem.message()} — but so under the current configuration, and you "
                    "are logged in: something fwsafe cannot see lets you in")
            else:
                found.append(f"{blame(problem, now_values, new_values).message()} "
                             f"(login{where})")
        self.verdict.problems += found
        if not found:
            keys = access.authorized_keys(new_values, self.who)
            working = [m for m, why in access.method_blockers(new_values, self.who, keys).items()
                       if why is None]
            self.verdict.ok.append(f"{self.user} can still log in{where} "
                                   f"({', '.join(working) or 'by a way fwsafe cannot see'})")

    def _problems(self, values: Effective, session: Session | None) -> list[access.Problem]:
        addr = session.client if session else None
        found = [access.access_problem(values, self.who, addr, addr),
                 access.login_problem(values, self.who, access.authorized_keys(values, self.who))]
        return [p for p in found if p is not None]

    def _listening(self, now_served: list[int], served: list[int], candidate: Tree,
                   session: Session) -> None:
        firewall = any(layer_has(n, PREDICTED) for n in self.change.layers)
        if session.server_port not in now_served:
            self.verdict.notes.append(
                f"sshd's configuration alone does not make it listen on {session.server}:"
                f"{session.server_port}, where this session arrives (-p or -o on its command "
                "line? a socket unit?): where it listens after the change")
            if firewall:
                self._firewall([session.server_port], moved=False)
            return
        if not served:
            named = "ListenAddress" if candidate.first("listenaddress") else "Port"
            values = [d.text() for d in candidate.global_directives(named)] or [named]
            self.verdict.problems.append(
                f"{', '.join(values)}: sshd would no longer listen on {session.server}, where "
                f"{session.client} arrives")
            return
        moved = session.server_port not in served
        if moved or firewall:
            self._firewall(served if moved else [session.server_port], moved)

    def _firewall(self, ports: list[int], moved: bool) -> None:
        """Try the firewall with `ports` (one that lets the clients in is enough)."""
        # the lockout check's sandbox and analysis are heavy to import: loaded only when used (only
        # when sshd's change meets a firewall)
        from fwsafe.check.precheck import precheck

        if self.tried & set(ports):
            return
        self.tried |= set(ports)
        candidate = firewall_change(self.change)
        failures = []
        for port in ports:
            report = precheck(candidate, port=port) if candidate.layers else None
            if report is None:
                self.verdict.ok.append(f"port {port}: no firewall rules to try")
                return
            if not report.lockout:
                self.verdict.ok.append(f"port {port}: the firewall lets new SSH connections in "
                                       f"({', '.join(report.clients)})")
                unknown = [f"{v.path}: {v.detail}" for v in report.verdicts if v.ok is None]
                self.verdict.notes += unknown[:2]
                return
            failures.append((f"Port {port}: " if moved else "") + report.lockout_message())
        self.verdict.problems.append("; ".join(failures))


def blame(problem: access.Problem, before: Effective, after: Effective) -> access.Problem:
    """Name first the settings that the change itself alters."""
    def changed(setting: str) -> bool:
        key = setting.split(" ", 1)[0].lower()
        return before.get(key) != after.get(key)

    named = tuple(s for s in problem.settings if changed(s))
    rest = tuple(s for s in problem.settings if not changed(s))
    return replace(problem, settings=named or rest)


def firewall_change(change: Change) -> Change:
    """The firewall a new SSH connection would meet: the change's rules files, else the live
    rules (tried as they are)."""
    out = Change(partial=change.partial)
    for name in layers_with(PREDICTED):
        if name in change.layers:
            out.add(name, change.layers[name], change.sources.get(name, name))
    if out.layers:
        return out
    # the live layers are read only when the change gives no rules file
    from fwsafe.backends import available_layers, layer_for

    for name in available_layers():
        if layer_has(name, PREDICTED):
            content = layer_for(name).capture()
            if content.strip():
                out.add(name, content, f"the live {name} rules")
    return out


def predict_sshd(change: Change, user: str | None = None) -> Verdict:
    """Would the confirming user get in again once `change` is live?"""
    return SshdCheck(change, user).run()


def check_sshd_change(change: Change, *, force: bool, user: str | None = None) -> dict[str, Any]:
    """The check `apply` runs for a change that involves sshd: refuse a predicted lockout
    (exit 3) unless forced; what to record otherwise."""
    verdict = predict_sshd(change, user)
    if verdict.lockout and not force:
        raise LockoutRefused("lockout predicted: " + "; ".join(verdict.problems),
                             hint=REFUSED_HINT)
    summary = verdict.summary()
    if verdict.lockout:
        summary = "LOCKOUT PREDICTED (applied with --force): " + summary
    return {"ran": True, "lockout": verdict.lockout, "summary": summary}


def key_check(config: str, files: Mapping[str, bytes], user: str | None = None,
              ) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the confirming user's keys under the candidate (the main file
    `config`, `files` changed): `fwsafe sshd harden` needs an authorized key that sshd would
    accept, and prefers Ed25519."""
    who = access.account(confirming_user(user))
    candidate = read_tree(config, dict(files))
    sessions, _ = default_sessions()
    values = effective(candidate, _spec(who.name, sessions[0] if sessions else None, None))
    keys = access.authorized_keys(values, who)
    problems: list[str] = []
    warnings = [f"sshd would not take {item}" for item in keys.refused]
    if keys.keys:
        families = sorted({k.family for k in keys.keys})
        if "Ed25519" not in families:
            warnings.append(f"{who.name} has only {'/'.join(families)} keys: prefer Ed25519 "
                            "(ssh-keygen -t ed25519)")
    elif keys.from_command:
        warnings.append("keys come from AuthorizedKeysCommand: fwsafe cannot see them")
    else:
        problems.append(f"PasswordAuthentication no: {who.name} has no authorized key sshd "
                        f"would accept (read {keys.describe_files()}); add one first "
                        "(ssh-copy-id, an Ed25519 key)")
    return problems, warnings
