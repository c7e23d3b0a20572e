"""Plain commands that guard themselves (opt-in): `fwsafe shim install|remove|status`.

fwsafe protects a change only when the admin remembers to run it through fwsafe. The shim makes
the commands admins already type run under the guard: ``/usr/sbin/ufw`` (and
``/usr/bin/firewall-cmd`` where present) is moved aside with ``dpkg-divert --local --rename``
(to ``PATH.fwsafe-real``; a package upgrade then installs the new binary there, not over the
shim) and replaced by a small shell script, ``SCRIPT_TEMPLATE``:

* ``FWSAFE_SHIM=off``, or no terminal on stdin and stdout (a script, cron, the guard itself,
  the check's sandbox): the real command, unchanged. ``FWSAFE_SHIM=guard`` makes a script
  choose the guard anyway (it then arms and returns: confirm with `fwsafe confirm`);
* otherwise ``fwsafe shim run TOOL -- ARGS`` (`run`): a read-only invocation (``ufw status``,
  ``show``, ``app list``, ``--version``, ``--dry-run``; ``firewall-cmd --list-*``, ``--get-*``,
  ``--query-*``, ``--state``, ``--check-config``, ...) and one that does not come from an SSH
  session (an sshd among its ancestors, or SSH_CONNECTION) run the real command; anything
  else is ``fwsafe apply -- TOOL ARGS`` (countdown, confirmation from a new session, a
  predicted lockout refused, as with `fwsafe ufw`), with FWSAFE_SHIM=off for the command it
  runs. firewall-cmd cannot be tried on a copy: its change runs under the guard unchecked
  and is reverted through firewalld (tests/lab/test_firewalld_unguarded.py).

It works for root's PATH and through sudo alike, since it is the file at the command's own
path. `remove` deletes the shim and removes the diversion with ``--rename``: the real binary is
moved back, byte for byte. Only Debian's dpkg-divert is supported (elsewhere `install` refuses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fwsafe.errors import EnvironmentProblem, UsageError
from fwsafe.ondisk.atomic_files import write_file_atomically
from fwsafe.runner import RUN_MODULE, module_argv

TOOLS = {"ufw": "/usr/sbin/ufw", "firewall-cmd": "/usr/bin/firewall-cmd"}
REAL_SUFFIX = ".fwsafe-real"
ENV = "FWSAFE_SHIM"
MARK = "# fwsafe shim:"
DPKG_DIVERT = "dpkg-divert"

SCRIPT_TEMPLATE = """\
#!/bin/sh
{mark} `{tool}` under fwsafe's guard when it changes the firewall from an SSH session.
# The real command is {real} (dpkg-divert); `fwsafe shim remove` puts it back.
# FWSAFE_SHIM=off: always the plain command; FWSAFE_SHIM=guard: the guard even without a terminal.
real='{real}'
python='{python}'
case "${{FWSAFE_SHIM:-}}" in
    off) exec "$real" "$@" ;;
    guard) ;;
    *) [ -t 0 ] && [ -t 1 ] || exec "$real" "$@" ;;
esac
[ -x "$python" ] || exec "$real" "$@"
exec "$python" -c '{run_module}' fwsafe shim run {tool} -- "$@"
"""

# ufw: subcommands and options that only read.
UFW_READ_ONLY = frozenset({"status", "show", "version", "help"})
UFW_READ_ONLY_OPTIONS = frozenset({"--version", "-h", "--help", "--dry-run"})
# firewall-cmd: every argument must be one of these for the call to be read-only.
FIREWALLD_READ_ONLY_PREFIXES = ("--list-", "--get-", "--query-", "--info-", "--zone=",
                                "--policy=", "--ipset=", "--service=", "--helper=",
                                "--icmptype=")
FIREWALLD_READ_ONLY = frozenset({"--state", "--version", "-V", "-h", "--help", "--permanent",
                                 "-q", "--quiet", "--check-config"})


def script_text(tool: str, real: str, python: str) -> str:
    """The shim script put where `tool` was (`real`: where the real command went)."""
    return SCRIPT_TEMPLATE.format(mark=MARK, tool=tool, real=real, python=python,
                                  run_module=RUN_MODULE)


def real_path(tool: str) -> str:
    return TOOLS[tool] + REAL_SUFFIX


def read_only(tool: str, args: Sequence[str]) -> bool:
    """True when `tool ARGS` only reads (it passes straight through)."""
    if tool == "ufw":
        if any(a in UFW_READ_ONLY_OPTIONS for a in args):
            return True
        words = [a for a in args if not a.startswith("-")]
        if not words or words[0] in UFW_READ_ONLY:
            return True
        return words[0] == "app" and len(words) > 1 and words[1] in ("list", "info")
    return all(a in FIREWALLD_READ_ONLY or a.startswith(FIREWALLD_READ_ONLY_PREFIXES)
               for a in args)


def from_ssh(pid: int | None = None) -> bool:
    """This process runs in an SSH session: SSH_CONNECTION is set, or an sshd is among its
    ancestors (sudo drops SSH_CONNECTION; the process tree keeps the truth)."""
    if os.environ.get("SSH_CONNECTION"):
        return True
    current = os.getppid() if pid is None else pid
    for _ in range(64):
        if current <= 1:
            return False
        try:
            comm = Path(f"/proc/{current}/comm").read_text().strip()
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            return False
        if comm == "sshd" or comm.startswith("sshd-"):
            return True
        current = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def run(tool: str, args: Sequence[str]) -> None:
    """What the shim execs: the real command, or `fwsafe apply -- TOOL ARGS`. Never returns."""
    if tool not in TOOLS:
        raise UsageError(f"no shim for {tool!r} (known: {', '.join(TOOLS)})")
    real = real_path(tool)
    guarded = os.environ.get(ENV) == "guard" or from_ssh()
    if read_only(tool, args) or not guarded:
        try:
            os.execv(real, [TOOLS[tool], *args])
        except OSError as exc:   # removed by its package with the shim left (dpkg -r), ...
            raise EnvironmentProblem(
                f"cannot run the real {tool}, {real}: {exc.strerror}",
                hint=(f"was {tool}'s package removed? `fwsafe shim remove` takes the shim away "
                      f"(and puts {TOOLS[tool]} back where it is still there)"
                      if not os.path.lexists(real) else
                      f"{real} is there but cannot be run: see its mode and the interpreter "
                      "its first line names")) from exc
    env = {**os.environ, ENV: "off"}
    argv = module_argv("fwsafe", "apply", "--", tool, *args)   # not from the cwd's path
    os.execve(argv[0], argv, env)


# --------------------------------------------------------------------------------------------
def is_shim(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return MARK.encode() in handle.read(4096)
    except OSError:
        return False


def _divert(args: list[str]) -> None:
    result = subprocess.run([DPKG_DIVERT, "--local", "--rename", *args], capture_output=True,
                            text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise EnvironmentProblem(f"dpkg-divert {' '.join(args)} failed: "
                                 f"{(result.stderr or result.stdout).strip()}")


def status() -> list[dict[str, object]]:
    """Per command that is here (or shimmed): its path, the real one, whether the shim is on."""
    found = []
    for tool, path in TOOLS.items():
        real = real_path(tool)
        if not (os.path.exists(path) or os.path.exists(real)):
            continue
        found.append({"tool": tool, "path": path, "real": real,
                      "active": is_shim(path) and os.access(real, os.X_OK)})
    return found


def install() -> list[str]:
    if shutil.which(DPKG_DIVERT) is None:
        raise EnvironmentProblem("no dpkg-divert here: the shim needs it to survive package "
                                 "upgrades", hint="use `fwsafe ufw ...` / `fwsafe apply -- ...`")
    present = status()
    if not present:
        raise UsageError("neither ufw nor firewall-cmd is installed: nothing to shim")
    done = []
    for entry in present:
        tool, path, real = str(entry["tool"]), str(entry["path"]), str(entry["real"])
        if not is_shim(path):
            if not os.path.exists(real):
                _divert(["--divert", real, "--add", path])
            write_file_atomically(Path(path), script_text(tool, real, sys.executable).encode(),
                                  0o755)
        done.append(f"{tool}: {path} is the shim (the real command: {real}); typed in an SSH "
                    "session on a terminal, a change runs under the guard")
    return done


def remove() -> list[str]:
    done = []
    for entry in status():
        tool, path, real = str(entry["tool"]), str(entry["path"]), str(entry["real"])
        ours, real_there = is_shim(path), os.path.exists(real)
        if ours and real_there:
            os.unlink(path)   # where dpkg-divert --rename puts the real one back
        if ours or real_there:
            # also when the real one is gone (its package removed): a diversion left behind
            # would make the next install of the package put the command at `real`, not `path`
            _divert(["--divert", real, "--remove", path])
        if ours and not real_there:
            os.unlink(path)   # after: a refused dpkg-divert leaves it, for `remove` again
        done.append(f"{tool}: {path} is the plain command again" if os.path.exists(path) else
                    f"{tool}: the shim is removed; {tool} itself is not installed ({real} was "
                    "gone: its package removed?)")
    return done or ["no shim installed"]
