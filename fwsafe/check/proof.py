"""The revert's second proof, access: the lockout check's kernel verdict on the live firewall
after a revert, for the SSH clients that the check before the change let in. Handed to core's
revert by whoever reverts (the guard, the backstop, `recover` through its callers) as
`PROVER` (fwsafe.core.revert.Prover): core names no package above it."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from fwsafe.backends import NFT_TABLES, RULES_FILE, layers_with, owned_elsewhere
from fwsafe.core.revert import Access, Prover, live_state
from fwsafe.core.transaction import Record

# The sandbox and the analysis are heavy to import (and the guard keeps its imports small):
# they are imported in the functions that use them ("heavy: only when used" below).


def access_check(record: Record) -> Access | None:
    """The lockout check's kernel verdict on the live firewall, for the SSH clients that the
    check before the change let in (`record.options["check"]`); None when none is known."""
    check: Mapping[str, Any] = record.options.get("check") or {}
    clients = list(check.get("clients") or [])
    port = int(check.get("port") or 22)
    families: list[str] = [n for n in layers_with(RULES_FILE) if n in record.captured]
    if not clients or not families:
        return None
    # firewalld's rules are its tables in the nft layer (inet firewalld)
    families += [n for n in record.captured if owned_elsewhere(n, record.captured)]

    def prove(known: Mapping[str, tuple[int, bytes]]) -> tuple[bool | None, str]:
        # heavy: only when used (above)
        from fwsafe.check.predict import predict
        from fwsafe.check.sandbox import PROOF_PREFIX

        remove_dead_proofs()   # a dead prover's namespaces (its PID in their names) go first
        state = {n: live_state(n, known) for n in families}
        live = {n: (data, f"the {n} firewall after the revert") for n, data in state.items()}
        # The host's current state is the live one: the sandbox starts from it, and the
        # candidate is that same state (one reading, one pruning analysis). The native nft
        # tables as the revert proved them loaded, when it did (not read again: a set of 100k
        # elements takes a second to list).
        captured = {**state, **{n: live_state(n, known) for n in layers_with(NFT_TABLES)
                                if n in known}}
        report = predict(live, clients=clients, port=port, validate=False, captured=captured,
                         sandbox_prefix=PROOF_PREFIX)
        if report.lockout:
            return False, "access FAILED: " + report.lockout_message()
        passed = [v.path for v in report.verdicts if v.ok]
        if not passed:
            return None, "access not proved: no SSH path could be tested"
        return True, f"access: a NEW SSH connection gets in ({'; '.join(passed)})"
    return prove


def remove_dead_proofs() -> list[str]:
    """Remove the access proof's sandbox namespaces whose owner died (a guard or reverter
    killed during its proof); called by whoever takes over from a dead owner. A note for the
    record on what could not be removed ([] when nothing was left)."""
    # heavy: only when used (above)
    from fwsafe.check.netns import remove_orphans
    from fwsafe.check.sandbox import PROOF_PREFIX

    left = remove_orphans(PROOF_PREFIX)
    return [f"could not remove the sandbox of a dead proof: {', '.join(left)}"] if left else []


def warm_proof(name: str, data: bytes) -> None:
    """Start the access proof's pruning analysis of layer `name`'s state `data` in a thread
    (fwsafe.check.precheck.warm_layers: the proof finds it done when that is the state it
    checks; else it was only a head start lost)."""
    # heavy: only when used (above)
    from fwsafe.check.precheck import warm_layers

    try:
        threading.Thread(target=warm_layers, args=({name: data},), daemon=True).start()
    except Exception:  # noqa: BLE001 - only a head start (no thread: the proof does it)
        return


PROVER = Prover(access=access_check, warm=warm_proof, remove_dead=remove_dead_proofs)
