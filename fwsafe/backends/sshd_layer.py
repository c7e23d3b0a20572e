"""sshd: its configuration files, changed under the guard (`fwsafe sshd set|harden`,
`fwsafe apply --sshd-set`).

The layer holds the files sshd reads: the main configuration and every file it includes, one
unit per file (as ufw's layer). It is captured only for a change that gives content for it,
never in every firewall snapshot. Its name carries the main file: `sshd` for
/etc/ssh/sshd_config, `sshd:<the path, percent-encoded>` for another one (a private sshd, the
lab's), so that the guard, its backstop and `recover` find the same files from the record.

apply: refuse when a file changed since the change was made; write the files (atomically, with
their mode and owner), reload sshd and wait until it listens again, on new sockets, on the
ports the new configuration names. A daemon that does not come back is a refused change: the
guard puts the files back and reloads again.

revert: the touched files back byte for byte (a file the change created is removed), a reload
(on a systemd host the system's sshd is started again if it is gone), then a fresh capture
must show the files as they were.

Socket-activated sshd (ssh.socket, Accept=no: fwsafe.sshd.socketunit): the system's layer also
holds the socket unit's files under /etc/systemd/system (its drop-ins, fwsafe's own
zz-fwsafe-listen.conf among them), so the snapshot and the revert cover them byte for byte; a
change and a revert are put in force by daemon-reload and a restart of the socket and its
service that keeps the open sessions, instead of a SIGHUP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, unquote

from fwsafe.backends.base import (
    BASED_CHANGE,
    FILE_SET,
    FILES,
    MERGE,
    ON_DEMAND,
    ROLLBACK,
    ApplyError,
    Layer,
    RetryLog,
)
from fwsafe.errors import InvalidRulesError, UsageError
from fwsafe.ondisk.sshd_files import (
    FileState,
    SshdFiles,
    SshdFilesError,
    dump,
    load,
    read_file,
    remove_file,
    write_file,
)
from fwsafe.sshd.daemon import (
    Reload,
    ReloadError,
    effective,
    listen_ports,
    pidfiles,
    sshd_binary,
    systemctl,
    test_config,
)
from fwsafe.sshd.ports import listen_addresses, port_conflicts
from fwsafe.sshd.socketunit import (
    SocketUnit,
    detect,
    is_socket_file,
    refusal,
    restart,
    socket_files,
)
from fwsafe.sshd.sshd_config import SSHD_CONFIG, SshdConfigError, Tree, read_tree

SSHD_LAYER = "sshd"
_PREFIX = SSHD_LAYER + ":"


def layer_name(config: str) -> str:
    """The layer name for sshd started with `-f config`."""
    path = os.path.normpath(os.path.abspath(config))
    return SSHD_LAYER if path == SSHD_CONFIG else _PREFIX + quote(path, safe="")


def is_sshd_layer(name: str) -> bool:
    """Whether `name` is an sshd layer's ("sshd", "sshd:<path>"; see layer_name)."""
    return name == SSHD_LAYER or name.startswith(_PREFIX)


def config_path(name: str) -> str:
    """The main configuration file of a layer name (see layer_name)."""
    if name == SSHD_LAYER:
        return SSHD_CONFIG
    path = unquote(name[len(_PREFIX):]) if name.startswith(_PREFIX) else ""
    if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
        raise UsageError(f"unknown firewall layer {name!r}")
    return path


def overlay_of(layer: SshdFiles) -> dict[str, bytes | None]:
    return {path: state.content for path, state in layer.files.items()}


def expected_ports(tree: Tree) -> set[int] | None:
    """The ports sshd listens on with this configuration (None: sshd -T cannot tell)."""
    try:
        return listen_ports(effective(tree)) or None
    except InvalidRulesError:
        return None


class SshdLayer(Layer):
    label = "sshd config"
    tools = ("sshd",)
    facts = frozenset({FILES, ON_DEMAND, ROLLBACK, FILE_SET, BASED_CHANGE})

    def __init__(self, config: str = SSHD_CONFIG) -> None:
        self.config = config
        self.name = layer_name(config)

    @classmethod
    def for_name(cls, name: str) -> SshdLayer:
        return cls(config_path(name))

    def available(self) -> bool:
        return False   # captured only for a change that involves it (see the module's doc)

    def kept_under(self, root: Path) -> bool:
        # its capture reads the running sshd's configuration: on this system only
        return root == Path("/") and os.path.isfile(self.config)

    def tree(self, layer: SshdFiles | None = None) -> Tree:
        return read_tree(self.config, overlay_of(layer) if layer is not None else None)

    def capture(self) -> bytes:
        try:
            tree = self.tree()
        except SshdConfigError as exc:
            raise ApplyError(str(exc)) from exc
        files: dict[str, FileState] = {}
        extra = socket_files() if self.config == SSHD_CONFIG else []
        for path in [*tree.files, *extra]:
            state = read_file(path)
            if state is not None:
                files[path] = state
        return dump(SshdFiles(self.config, files))

    def units(self, data: bytes) -> dict[str, str]:
        return {path: state.unit() for path, state in load(data).files.items()}

    def unit_texts(self, data: bytes) -> dict[str, str]:
        return {path: state.content.decode(errors="replace")
                for path, state in load(data).files.items()}

    def check_tools(self) -> None:
        sshd_binary()

    def _load(self, change: bytes, source: str) -> SshdFiles:
        try:
            layer = load(change)
        except SshdFilesError as exc:
            raise InvalidRulesError(f"{source}: {exc}", path=source) from exc
        if layer.config != self.config:
            raise InvalidRulesError(f"{source}: the change is for {layer.config}, not "
                                    f"{self.config}", path=source)
        return layer

    # -- before anything changes ----------------------------------------------------------
    def validate(self, change: bytes, source: str) -> None:
        """`sshd -t` on the candidate, a daemon to reload, ports that are free."""
        layer = self._load(change, source)
        try:
            current, candidate = self.tree(), self.tree(layer)
        except SshdConfigError as exc:
            raise InvalidRulesError(str(exc), path=source) from exc
        problem = test_config(candidate)
        if problem is not None:
            raise InvalidRulesError(f"sshd refuses the new configuration: {problem}",
                                    path=source, hint="nothing was changed")
        reload = Reload(self.config, pidfiles(current))
        sock = detect(self.config)
        if sock is not None:
            self._validate_socket(sock, layer, current, candidate)
        else:
            why = reload.reloadable()
            if why is not None:
                raise InvalidRulesError(f"{why}: the new configuration could not be put in force",
                                        hint="nothing was changed; give --sshd-config the file "
                                             "the running sshd was started with (-f)")
        conflicts = port_conflicts(effective(candidate), reload.daemon())
        if conflicts:
            raise InvalidRulesError("; ".join(conflicts), hint="nothing was changed")

    @staticmethod
    def _validate_socket(sock: SocketUnit, layer: SshdFiles, current: Tree,
                         candidate: Tree) -> None:
        """A socket-activated sshd: the change must be one fwsafe can put in force there."""
        moved = listen_addresses(effective(current)) != listen_addresses(effective(candidate))
        if sock.accept and not moved:
            return  # every connection starts a new sshd that reads the new files
        why = refusal(sock)
        if why is not None:
            raise InvalidRulesError(f"sshd is socket-activated ({sock.unit}): {why}",
                                    hint="nothing was changed")
        if moved and not sock.generator and sock.dropin not in layer.files:
            raise InvalidRulesError(
                f"sshd is socket-activated ({sock.unit}) and the change moves its ports, but it "
                f"does not write {sock.dropin}: it was made for a host without the socket",
                hint="nothing was changed; make the change again here")

    # -- under the guard ---------------------------------------------------------------------
    def apply(self, change: bytes, source: str) -> None:
        layer = self._load(change, source)
        for path, digest in layer.base.items():
            live = read_file(path)
            if (live.digest() if live is not None else None) != digest:
                raise ApplyError(f"{path} changed since fwsafe read it: nothing was written "
                                 "(run the command again)")
        old = self.tree()
        for path, state in sorted(layer.files.items()):
            write_file(path, state)
        new = self.tree()
        sock = detect(self.config)
        try:
            if sock is not None and not sock.accept:
                restart(sock, expected_ports(new))
            else:
                Reload(self.config, pidfiles(old) + pidfiles(new), expected_ports(new)).run()
        except ReloadError as exc:
            raise ApplyError(f"sshd did not take the new configuration: {exc}") from exc

    def revert(self, before: bytes, after: bytes | None, units: Sequence[str], *,
               level: str = MERGE, on_retry: RetryLog | None = None,
               live: bytes | None = None) -> list[str]:
        """The touched files back whole from the snapshot (the levels are all the same for
        files), then a reload; verified by a fresh capture."""
        old = load(before)
        known = set(old.files) | (set(load(after).files) if after is not None else set())
        try:
            known |= set(load(self.capture()).files)
        except ApplyError:   # the main file is gone: it comes back from the snapshot
            pass
        for path in units:
            if path not in known:
                raise ApplyError(f"{path} is not one of sshd's files")
            want, now = old.files.get(path), read_file(path)
            if want is None:
                remove_file(path)
            elif now != want:
                write_file(path, want)
        tree = self.tree()
        reload = Reload(self.config, pidfiles(tree), expected_ports(tree), restart_if_down=True)
        problems = []
        sock = detect(self.config, failed_too=True)
        if sock is not None and not sock.accept:
            problems += self._restart_socket(sock, on_retry)
        elif self.config == SSHD_CONFIG and any(map(is_socket_file, units)):
            # The socket is not up (early in a boot): systemd reads the files back when it
            # starts it.
            code, out = systemctl("daemon-reload")
            if code != 0:
                problems.append(f"{self.label}: systemctl daemon-reload: {out}")
        elif reload.reloadable() is not None:
            if on_retry is not None:
                on_retry(f"sshd files put back; {reload.reloadable()}: it reads them when it "
                         "starts")
        else:
            try:
                done = reload.run()
                if on_retry is not None:
                    on_retry(f"sshd reloaded: {done}")
            except ReloadError as exc:
                problems.append(f"{self.label}: reload: {exc}")
        now_units = self.units(self.capture())
        old_units = self.units(before)
        return [f"{self.label} {u}" for u in units if now_units.get(u) != old_units.get(u)] \
            + problems

    def _restart_socket(self, sock: SocketUnit, on_retry: RetryLog | None) -> list[str]:
        try:
            done = restart(sock, None)
        except ReloadError as exc:
            return [f"{self.label}: {sock.unit}: {exc}"]
        if on_retry is not None:
            on_retry(f"sshd's socket restarted: {done}")
        return []
