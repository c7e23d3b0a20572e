"""The lockout check that `fwsafe apply` runs before it changes anything (see fwsafe.check.predict).

For rules files the candidate is the files themselves. For a command (`-- ufw deny 22/tcp`)
the command is first run on a copy of this host's firewall in a scratch namespace
(fwsafe.check.simulate), and the iptables rulesets it leaves there are the candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future

from fwsafe.backends import PREDICTED, RULES_FILE, available_layers, layer_for, layer_has, layers_with
from fwsafe.check.clients import default_sessions
from fwsafe.check.predict import Captured, CheckReport, predict
from fwsafe.check.prune import warm
from fwsafe.check.simulate import simulate
from fwsafe.core.change import Change


def candidate_layers(change: Change, captured: Mapping[str, bytes] | None = None
                     ) -> dict[str, tuple[bytes, str]]:
    """What `predict` loads: {layer: (content, where it came from)}. ``captured``: the host's
    layers if already read."""
    if change.run is None:  # ufw's files (a rollback) carry no rules the kernel sees
        return {name: (content, change.sources[name]) for name, content in change.layers.items()
                if layer_has(name, PREDICTED)}
    known = captured or {}
    captured = {name: known[name] if name in known else layer_for(name).capture()
                for name in available_layers()}
    watch = [name for name in layers_with(RULES_FILE) if name in captured]
    after = simulate(captured, run=change.run, watch=watch)
    label = " ".join(change.run)
    return {name: (after[name], f"`{label}` ({name})") for name in watch}


def precheck(change: Change, *, clients: list[str] | None = None, port: int | None = None,
             captured: Captured = None) -> CheckReport | None:
    """Predict whether `change` cuts the SSH path of the known clients. None when no client is
    known (not in an SSH session and no established SSH connection), so nothing to protect.
    `captured`: the host's layers, or what gives them (`predict`)."""
    sessions, default_port = default_sessions()
    chosen = clients or [s.client for s in sessions]
    if not chosen:
        return None
    layers = candidate_layers(change, None if change.run is None else
                              captured() if callable(captured) else captured)
    if not layers:
        return None
    servers = {s.client: s.server for s in sessions if s.client in chosen}
    return predict(layers, clients=chosen, port=port or default_port,
                   servers=servers, validate=False, captured=captured)


def warm_up(change: Change) -> None:
    """The lockout check's work that needs only the change (fwsafe.check.prune.warm), done
    ahead, e.g. while the host's firewall is read; never raises."""
    if change.run is not None:
        return
    try:
        warm(candidate_layers(change))
    except Exception:  # noqa: BLE001 - only a head start: the check does it all again
        return


def warm_layers(captured: Mapping[str, bytes]) -> None:
    """The same head start for the host's layers as read; never raises."""
    try:
        warm({name: (content, name) for name, content in captured.items()
              if layer_has(name, PREDICTED)})
    except Exception:  # noqa: BLE001 - only a head start
        return


def warm_current(captures: Mapping[str, Future[bytes]]) -> None:
    """The same, each layer as soon as it is read; never raises."""
    for name, future in captures.items():
        if layer_has(name, PREDICTED):
            try:
                content = future.result()
            except Exception:  # noqa: BLE001 - the snapshot says why, not this head start
                continue
            warm_layers({name: content})
