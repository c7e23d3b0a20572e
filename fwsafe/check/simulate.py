"""A scratch network namespace that holds a copy of this host's firewall, to try a change on.

`simulate(change)` loads the current state of every layer into a throwaway network namespace,
applies the change there with the real tools and the real kernel, and returns the captures
taken afterwards. The live firewall, files and daemons are never touched: the sandbox has its
own mount, PID, UTS and IPC namespaces too, every file is a private copy, and the live host's
daemon sockets are tripwires (fwsafe.check.isolation). A command that reached one cannot be
simulated (CannotSimulateError): it would have acted on a live daemon.

The part that runs inside the namespace is this module's `main()` (`python -m fwsafe.check.simulate`),
which reads one JSON request on stdin and writes one JSON answer on stdout.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fwsafe.backends import SANDBOX_FILES, layer_for, layer_has, restore_command
from fwsafe.backends.base import ApplyError
from fwsafe.check.isolation import UNSHARE_ARGS, Tripwires, describe, enter, host_sockets
from fwsafe.check.netns import Namespaces, NetnsError, remove_orphans
from fwsafe.errors import CannotSimulateError, EnvironmentProblem, InvalidRulesError
from fwsafe.ondisk.ufw_files import UfwFilesError
from fwsafe.runner import module_argv, require_binary
from fwsafe.tool_stack import raise_for_tools

SIMULATE_PREFIX = "fwsb"   # fwsb<pid>: the scratch namespace of a simulated change



def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def simulate(
    before: Mapping[str, bytes],
    *,
    layers: Mapping[str, bytes] | None = None,
    sources: Mapping[str, str] | None = None,
    run: Sequence[str] | None = None,
    watch: Sequence[str],
) -> dict[str, bytes]:
    """Apply a change to a copy of `before` in a scratch namespace; return the `watch` layers
    captured afterwards. Raises InvalidRulesError when the change is refused there."""
    remove_orphans(SIMULATE_PREFIX)   # left by a simulation whose process was killed
    name = f"{SIMULATE_PREFIX}{os.getpid()}"
    namespaces = Namespaces(ip=require_binary("ip"))
    try:
        namespaces.create(name)
    except NetnsError as exc:
        raise EnvironmentProblem(f"cannot create a scratch network namespace: {exc}") from exc
    try:
        request = {
            "load": {k: _b64(v) for k, v in before.items() if restore_command(k)},
            "files": {k: _b64(v) for k, v in before.items() if layer_has(k, SANDBOX_FILES)},
            "layers": {k: _b64(v) for k, v in (layers or {}).items()},
            "sources": dict(sources or {}),
            "run": list(run) if run else None,
            "watch": list(watch),
            "sockets": host_sockets(),
        }
        argv = namespaces.exec_argv(name, [require_binary("unshare"), *UNSHARE_ARGS,
                                           *module_argv("fwsafe.check.simulate")])
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        result = subprocess.run(argv, input=json.dumps(request).encode(), capture_output=True,
                                timeout=600, check=False, env=env)
        try:
            answer = json.loads(result.stdout)
        except ValueError as exc:
            raise EnvironmentProblem(
                f"the sandbox failed: {result.stderr.decode(errors='replace').strip()}") from exc
    finally:
        try:
            namespaces.close()  # what still runs in it is killed
        except NetnsError as exc:
            print(f"fwsafe: warning: scratch namespace teardown: {exc}", file=sys.stderr)
    if answer.get("broken"):
        raise EnvironmentProblem(f"cannot build the sandbox: {answer['broken']}",
                                 hint="nothing was changed")
    if answer.get("reached"):
        label, reached = " ".join(run or []), describe(answer["reached"])
        raise CannotSimulateError(
            f"`{label}` cannot be tried on a copy: in the sandbox it reached {reached}, so it "
            "acts on a live daemon and what it would do is not known; it was not run on the "
            "live host", reached=reached,
            hint="nothing was changed; `fwsafe apply -- COMMAND` runs it under the guard, "
                 "with the snapshot taken before it runs (and no lockout prediction)")
    if answer.get("error"):
        raise InvalidRulesError(str(answer["error"]), hint="nothing was changed")
    return {k: _unb64(v) for k, v in answer["after"].items()}


# --------------------------------------------------------------------------------------------
# Inside the scratch namespace
# --------------------------------------------------------------------------------------------
def _inside(request: dict[str, Any], wires: Tripwires) -> dict[str, Any]:
    for name, data in request["files"].items():   # the sandbox starts from these as captured
        if data:   # (ufw's files: a ufw command reads them)
            layer_for(name).apply(_unb64(data), name)
    for name, data in request["load"].items():
        content = _unb64(data)
        if not content.strip():
            continue
        result = subprocess.run(list(restore_command(name)), input=content, capture_output=True,
                                check=False)
        if result.returncode != 0:
            return {"error": f"cannot load the current {name} state into the sandbox: "
                             f"{result.stderr.decode(errors='replace').strip()}"}
    if request.get("run"):
        result = subprocess.run(request["run"], stdin=subprocess.DEVNULL, capture_output=True,
                                check=False, timeout=600)
        reached = wires.hits()
        if reached:   # what it did here is not what it would do: it talked to a daemon
            return {"reached": reached}
        if result.returncode != 0:
            out = (result.stdout + result.stderr).decode(errors="replace").strip()
            return {"error": f"{' '.join(request['run'])} failed (exit {result.returncode}): "
                             f"{out}"}
    for name, data in request["layers"].items():
        try:
            layer_for(name).apply(_unb64(data), request["sources"].get(name, name))
        except ApplyError as exc:
            return {"error": exc.message}
    after = {name: _b64(layer_for(name).capture()) for name in request["watch"]}
    return {"after": after}


def main() -> int:
    raise_for_tools()   # its thread keeps 8 MiB (the limit it inherits is the tools')
    request = json.loads(sys.stdin.buffer.read())
    try:
        wires, readonly = enter(request["sockets"])
    except OSError as exc:
        answer: dict[str, Any] = {"broken": str(exc)}
    else:
        try:
            answer = _inside(request, wires)
        except (OSError, ApplyError, subprocess.SubprocessError, UfwFilesError) as exc:
            answer = {"error": str(exc)}
        if readonly and answer.get("error"):
            answer["error"] += (" (in the sandbox these are read-only, not copies: "
                                f"{', '.join(readonly)})")
        reached = wires.stop()
        if reached:
            answer = {"reached": reached}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
