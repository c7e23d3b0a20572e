"""The change that `fwsafe sshd set|harden` and `fwsafe apply --sshd-set` hand to the apply
flow: the new content of the files that change, as the sshd layer's content (one layer, so that
the guard, its backstop and the revert treat it as any other)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from fwsafe.backends.sshd_layer import layer_name
from fwsafe.core.change import Change
from fwsafe.errors import InvalidRulesError, UsageError
from fwsafe.ondisk.sshd_files import NEW_FILE_MODE, FileState, SshdFiles, dump, read_file
from fwsafe.sshd.daemon import effective
from fwsafe.sshd.edit import Plan, parse_settings, plan_settings
from fwsafe.sshd.ports import listen_addresses
from fwsafe.sshd.socketunit import detect, dropin_content
from fwsafe.sshd.sshd_config import SSHD_CONFIG, SshdConfigError, Tree, read_tree

# `fwsafe sshd harden`: key-only logins, root by key only.
HARDEN = ("PasswordAuthentication=no", "KbdInteractiveAuthentication=no",
          "PermitRootLogin=prohibit-password")


@dataclass
class SshdChange:
    config: str
    plan: Plan
    old: dict[str, bytes | None]      # the content the changed files have now
    content: bytes | None             # the layer's content; None: nothing to change

    @property
    def layer(self) -> str:
        return layer_name(self.config)

    def describe(self) -> list[str]:
        """Which files change, in words."""
        lines = []
        for path in sorted(self.plan.files, key=lambda p: (p != self.plan.target, p)):
            what = "new file" if path in self.plan.created else "changed"
            if path == self.plan.target and path != self.config:
                what += ", read before the other drop-ins: its values win"
            lines.append(f"sshd: {path} ({what})")
        if self.plan.unchanged:
            lines.append("sshd: already in force: " + ", ".join(self.plan.unchanged))
        lines += [f"sshd: {note}" for note in self.plan.notes]
        return lines

    def diff(self) -> str:
        out: list[str] = []
        for path, new in sorted(self.plan.files.items()):
            old = self.old.get(path)
            out += difflib.unified_diff(
                (old or b"").decode(errors="replace").splitlines(keepends=True),
                new.decode(errors="replace").splitlines(keepends=True),
                fromfile=path if old is not None else "/dev/null", tofile=path)
        return "".join(out)


def plan_change(config: str | None, items: Sequence[str]) -> SshdChange:
    """Plan KEY=VALUE settings for the sshd started with `config` (default
    /etc/ssh/sshd_config). Usage errors exit 2; files fwsafe will not write exit 3."""
    path = os.path.normpath(os.path.abspath(config or SSHD_CONFIG))
    settings = parse_settings(items)
    if not settings:
        raise UsageError("give at least one KEY=VALUE, e.g. PasswordAuthentication=no")
    try:
        tree = read_tree(path)
    except SshdConfigError as exc:
        raise UsageError(f"sshd config: {exc}") from exc
    plan = plan_settings(tree, settings)
    _socket_dropin(path, tree, plan)
    files: dict[str, FileState] = {}
    base: dict[str, str | None] = {}
    old: dict[str, bytes | None] = {}
    for target, content in plan.files.items():
        if os.path.islink(target):
            raise InvalidRulesError(f"{target} is a symbolic link: fwsafe writes files, and would "
                                    "replace the link", hint="nothing was changed")
        live = read_file(target)
        old[target] = live.content if live is not None else None
        base[target] = live.digest() if live is not None else None
        files[target] = FileState(live.mode, live.uid, live.gid, content) if live is not None \
            else FileState(NEW_FILE_MODE, os.geteuid(), os.getegid(), content)
    content_ = dump(SshdFiles(path, files, base)) if files else None
    return SshdChange(path, plan, old, content_)


def _socket_dropin(config: str, tree: Tree, plan: Plan) -> None:
    """sshd started by ssh.socket (Accept=no) without Ubuntu's generator: where it listens is
    the socket's, so a change of Port or ListenAddress also writes fwsafe's drop-in for the
    socket (with the generator, sshd_config is its input and daemon-reload does it)."""
    if not plan.files:
        return
    sock = detect(config)
    if sock is None or sock.accept or sock.generator:
        return
    try:
        now, new = effective(tree), effective(read_tree(config, dict(plan.files)))
    except (InvalidRulesError, SshdConfigError):
        return  # validate() says why sshd refuses it
    if listen_addresses(now) == listen_addresses(new):
        return
    content = dropin_content(new)
    live = read_file(sock.dropin)
    if live is not None and live.content == content:
        return
    plan.files[sock.dropin] = content
    if live is None:
        plan.created.append(sock.dropin)
    ports = ", ".join(str(p) for p in sorted({p for _, p in listen_addresses(new)}))
    plan.notes.append(f"sshd is started by {sock.unit}: it will listen on {ports} through "
                      f"{sock.dropin}, put in force by daemon-reload and a restart of "
                      f"{sock.unit} and {sock.service} (open sessions stay)")


def add_to_change(change: Change, sshd: SshdChange) -> None:
    """Put the sshd part into `change` (after its firewall layers: the guard applies in order,
    so sshd moves last, once the firewall lets the new port in)."""
    if sshd.content is None:
        return
    change.add(sshd.layer, sshd.content, sshd.plan.target)
    change.notes += sshd.describe()
