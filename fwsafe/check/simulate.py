"""A scratch network namespace that holds a copy of this host's firewall, to try a change on.

`simulate(change)` loads the current state of every layer into a throwaway network namespace
(and, for a command, copies of ufw's files bind-mounted in a private mount namespace), applies
the change there with the real tools and the real kernel, and returns the captures taken
afterwards. The live firewall and the real files are never touched.

The part that runs inside the namespace is this module's `main()` (`python -m fwsafe.check.simulate`),
which reads one JSON request on stdin and writes one JSON answer on stdout.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fwsafe.backends import layer_for
from fwsafe.backends.base import ApplyError
from fwsafe.check.netns import Namespaces, NetnsError
from fwsafe.errors import EnvironmentProblem, InvalidRulesError
from fwsafe.runner import require_binary

LOADERS = {
    "ipv4": ["iptables-restore"],
    "ipv6": ["ip6tables-restore"],
    "ipv4-legacy": ["iptables-legacy-restore"],
    "ipv6-legacy": ["ip6tables-legacy-restore"],
    "nft": ["nft", "-f", "-"],
}


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
    name = f"fwsb{os.getpid()}"
    namespaces = Namespaces(ip=require_binary("ip"))
    try:
        namespaces.create(name)
    except NetnsError as exc:
        raise EnvironmentProblem(f"cannot create a scratch network namespace: {exc}") from exc
    workdir = Path(tempfile.mkdtemp(prefix="fwsafe-sandbox-"))
    try:
        request = {
            "load": {k: _b64(v) for k, v in before.items() if k in LOADERS},
            "layers": {k: _b64(v) for k, v in (layers or {}).items()},
            "sources": dict(sources or {}),
            "run": list(run) if run else None,
            "watch": list(watch),
        }
        argv = namespaces.exec_argv(name, [sys.executable, "-m", "fwsafe.check.simulate"])
        if run and "ufw" in before:
            argv = _private_ufw(before["ufw"], workdir) + argv
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        result = subprocess.run(argv, input=json.dumps(request).encode(), capture_output=True,
                                timeout=600, check=False, env=env)
        try:
            answer = json.loads(result.stdout)
        except ValueError as exc:
            raise EnvironmentProblem(
                f"the sandbox failed: {result.stderr.decode(errors='replace').strip()}") from exc
        if answer.get("error"):
            raise InvalidRulesError(str(answer["error"]), hint="nothing was changed")
        return {k: _unb64(v) for k, v in answer["after"].items()}
    finally:
        try:
            namespaces.close()  # what still runs in it is killed
        except NetnsError as exc:
            print(f"fwsafe: warning: scratch namespace teardown: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def _private_ufw(capture: bytes, workdir: Path) -> list[str]:
    """A prefix that runs the rest in a private mount namespace where copies of ufw's files
    are bind-mounted over the real ones."""
    from fwsafe.ondisk.ufw import restore_ufw_files

    restore_ufw_files(capture, workdir)
    mounts = []
    for path in ("/etc/ufw", "/etc/default/ufw"):
        copy = workdir / path.lstrip("/")
        if copy.exists() and os.path.exists(path):
            mounts += [str(copy), path]
    script = ('while [ "$#" -gt 0 ] && [ "$1" != -- ]; do mount --bind "$1" "$2" || exit 97; '
              'shift 2; done; shift; exec "$@"')
    return [require_binary("unshare"), "--mount", "--propagation", "private", "sh", "-c", script,
            "sh", *mounts, "--"]


# --------------------------------------------------------------------------------------------
# Inside the scratch namespace
# --------------------------------------------------------------------------------------------
def _inside(request: dict[str, Any]) -> dict[str, Any]:
    for name, data in request["load"].items():
        content = _unb64(data)
        if not content.strip():
            continue
        result = subprocess.run(LOADERS[name], input=content, capture_output=True, check=False)
        if result.returncode != 0:
            return {"error": f"cannot load the current {name} state into the sandbox: "
                             f"{result.stderr.decode(errors='replace').strip()}"}
    if request.get("run"):
        result = subprocess.run(request["run"], stdin=subprocess.DEVNULL, capture_output=True,
                                check=False, timeout=600)
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
    request = json.loads(sys.stdin.buffer.read())
    try:
        answer = _inside(request)
    except (OSError, ApplyError, subprocess.SubprocessError) as exc:
        answer = {"error": str(exc)}
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
