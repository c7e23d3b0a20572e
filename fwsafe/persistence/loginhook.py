"""The login mark: how the power-cycle recovery knows that an SSH login succeeded.

A PAM session hook (pam_exec, in the session stack sshd runs for every login) writes
``STATE_DIR/login-mark`` = ``BOOT_ID UNIX_TIME`` at the first successful SSH login of each boot
(later logins of the same boot find the mark already there and write nothing). At boot,
fwsafe.persistence.powercycle compares the mark with the previous boot's id: equal means
"someone got in over SSH during the previous boot", and nothing is restored.

The same hook, at every SSH login, starts ``python -m fwsafe.guard.backstop --converge`` in the
background when the state directory has a transaction: a change left open past its deadline
with nothing of fwsafe alive (the kernel's escape hatch let this login in) is reverted
(fwsafe.guard.spawn.converge; issue 23).

Why PAM: sshd opens a PAM session for every login that succeeded (Debian's and Ubuntu's sshd
run with UsePAM yes), whatever the authentication method, and the hook runs as root before the
user's shell. wtmp is not written by every sshd (Debian 13 moved to wtmpdb), and the journal of
the previous boot is lost where it is volatile (Debian's default without /var/log/journal).

The hook is a small shell script (a Python interpreter at every login would cost ~0.1 s);
PAM_SERVICE must be ``sshd`` (cron, su, sudo and console logins open sessions too: they are not
SSH logins). It is enabled through Debian's pam-auth-update (a profile in
/usr/share/pam-configs, added to common-session, which /etc/pam.d/sshd includes), never by
editing sshd's own PAM file, a conffile of openssh-server. The .deb ships it for /var/lib/fwsafe
(``/usr/lib/fwsafe/login-mark``, profile ``fwsafe``); `install()` writes a copy for another
state directory or a venv install (``/usr/local/lib/fwsafe/login-mark``, profile
``fwsafe-local``). Where there is no pam-auth-update, or the hook is not in sshd's session
stack, `active()` is False and the power-cycle recovery stays off, saying why (the fallback).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fwsafe.core import transaction
from fwsafe.ondisk.atomic_files import local_path, write_file_atomically

MARK = "login-mark"
PACKAGED_SCRIPT = "/usr/lib/fwsafe/login-mark"
LOCAL_SCRIPT = "/usr/local/lib/fwsafe/login-mark"
PAM_CONFIGS = "/usr/share/pam-configs"
PACKAGED_PROFILE = "fwsafe"
LOCAL_PROFILE = "fwsafe-local"
PAM_FILES = ("/etc/pam.d/sshd", "/etc/pam.d/common-session")
PAM_AUTH_UPDATE = "pam-auth-update"
PACKAGED_PYTHON = "/usr/bin/python3"   # the .deb's fwsafe runs on the distribution's Python

SCRIPT_TEMPLATE = """\
#!/bin/sh
# fwsafe: mark the first successful SSH login of each boot (PAM session hook, pam_exec), for
# the power-cycle recovery: two boots within reboot_recovery_window and no mark in between put
# back the last known-good firewall (see `fwsafe status`, docs/rescue.md). Writes
# {state_dir}/{mark} = "BOOT_ID TIME"; never fails a login.
[ "$PAM_TYPE" = open_session ] || exit 0
[ "$PAM_SERVICE" = sshd ] || exit 0
dir='{state_dir}'
[ -d "$dir" ] || exit 0
# A change left open past its deadline with nothing of fwsafe alive (the kernel's escape hatch
# let this login in): reverted in the background, silently (fwsafe.guard.spawn.converge).
# Python starts only while the newest transaction is open (not at every login).
tx=
read -r tx 2>/dev/null < "$dir/current"
case "$tx" in ''|*/*|.*) tx= ;; esac
[ -n "$tx" ] && grep -Eqs '"state": "({open_states})"' "$dir/tx/$tx/record.json" \
    && setsid '{python}' -m fwsafe.guard.backstop --converge "$dir" </dev/null >/dev/null 2>&1 &
read -r boot 2>/dev/null < /proc/sys/kernel/random/boot_id || exit 0
mark="$dir/{mark}"
seen=
read -r seen rest 2>/dev/null < "$mark"
[ "$seen" = "$boot" ] && exit 0
umask 077
tmp="$dir/.{mark}.$$"
rm -f "$tmp"
printf '%s %s\\n' "$boot" "$(date +%s)" > "$tmp" && sync "$tmp" && mv -f "$tmp" "$mark" \\
    && sync "$dir"
rm -f "$tmp"
exit 0
"""

PROFILE_TEMPLATE = """\
Name: fwsafe: mark successful SSH logins (power-cycle recovery of the firewall)
Default: yes
Priority: 0
Session-Type: Additional
Session:
	optional	pam_exec.so quiet {script}
"""

_UNSAFE = re.compile(r"[\s\"'\\%$;`]")


def render_script(state_dir: str, python: str = PACKAGED_PYTHON) -> str:
    """The hook for `state_dir`; `python` (fwsafe's interpreter) reverts an orphaned change."""
    for what, value in (("state directory", state_dir), ("interpreter", python)):
        if not value.startswith("/") or _UNSAFE.search(value):
            raise ValueError(f"unsuitable {what} for the login hook: {value!r}")
    return SCRIPT_TEMPLATE.format(state_dir=state_dir, mark=MARK, python=python,
                                  open_states="|".join(sorted(transaction.OPEN_STATES)))


def render_profile(script: str) -> str:
    return PROFILE_TEMPLATE.format(script=script)


def read_mark(state_dir: Path) -> tuple[str, float] | None:
    """(boot id, time) of the last login mark, or None (no mark, or unreadable)."""
    try:
        fields = (state_dir / MARK).read_text().split()
        return fields[0], float(fields[1])
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return None


def _hook_scripts(root: Path) -> list[str]:
    """The login-mark scripts named by pam_exec lines of sshd's session stack."""
    found: list[str] = []
    for name in PAM_FILES:
        try:
            text = local_path(root, name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 3 or words[0] != "session" or "pam_exec.so" not in words[2]:
                continue
            found += [w for w in words[3:] if w.startswith("/") and w.endswith("/" + MARK)]
    return found


def sshd_opens_pam_sessions(root: Path) -> tuple[bool, str]:
    """Whether sshd's logins pass PAM's session stack (where the hook runs): sshd with
    `UsePAM yes` (Debian's sshd_config says so; sshd's own default is no). Another SSH server
    (dropbear) or `UsePAM no`: the hook never runs. (yes/no, why)"""
    # sshd's configuration reader: only when PAM sessions are asked
    from fwsafe.sshd.sshd_config import (
        SSHD_CONFIG,
        SshdConfigError,
        default_reader,
        read_tree,
        split_words,
    )

    def reader(path: str) -> bytes | None:
        return default_reader(str(local_path(root, path)))

    try:
        tree = read_tree(SSHD_CONFIG, reader=reader)
    except SshdConfigError as exc:
        return False, f"sshd's configuration cannot be read ({exc}): the hook marks sshd logins"
    words = split_words(tree.value("usepam") or "no")   # sshd's own default is no
    value = (words[0] if words else "no").lower()
    if value != "yes":
        return False, (f"sshd has UsePAM {value}: its logins open no PAM session, so the hook "
                       "never runs (`fwsafe sshd set UsePAM=yes` turns it on)")
    return True, "sshd uses PAM"


def active(root: Path, state_dir: str) -> tuple[bool, str]:
    """Whether SSH logins leave the mark in `state_dir`: (yes/no, why)."""
    for script in _hook_scripts(root):
        path = local_path(root, script)
        try:
            text = path.read_text()
        except OSError:
            continue
        if os.access(path, os.X_OK) and f"dir='{state_dir}'" in text:
            pam, why = sshd_opens_pam_sessions(root)
            if not pam:
                return False, f"SSH logins are NOT marked: {why}"
            return True, f"SSH logins are marked by {script} (PAM session hook)"
    return False, ("no login hook: no PAM session hook of fwsafe marks SSH logins in "
                   f"{state_dir}, so nothing tells whether anyone got in between two boots "
                   "(`fwsafe install-boot-hook` installs it where pam-auth-update exists)")


def can_install(root: Path) -> bool:
    """pam-auth-update is there (Debian, Ubuntu): the hook can be enabled."""
    if root != Path("/"):
        return local_path(root, PAM_CONFIGS).is_dir()
    return shutil.which(PAM_AUTH_UPDATE) is not None


def wanted(root: Path, state_dir: str) -> bool:
    """The hook could be installed and is not: not active, and not tried yet (a profile of
    ours that pam-auth-update did not enable, e.g. a locally edited common-session, is not
    written again at every apply; `active` then says why the recovery is off)."""
    return (can_install(root) and not active(root, state_dir)[0]
            and not local_path(root, f"{PAM_CONFIGS}/{LOCAL_PROFILE}").exists())


def install(root: Path, state_dir: str) -> list[str]:
    """Write the local hook and its pam-auth-update profile and enable it (on `/` only);
    nothing when the packaged hook serves `state_dir` already. One line per thing done."""
    if active(root, state_dir)[0]:
        return [f"login hook active already: {active(root, state_dir)[1]}"]
    if not can_install(root):
        return ["login hook NOT installed: no pam-auth-update here; the power-cycle recovery "
                "stays off (it cannot tell whether anyone logged in)"]
    script = local_path(root, LOCAL_SCRIPT)
    script.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file_atomically(script, render_script(state_dir, sys.executable).encode(), 0o755)
    profile = local_path(root, f"{PAM_CONFIGS}/{LOCAL_PROFILE}")
    write_file_atomically(profile, render_profile(LOCAL_SCRIPT).encode(), 0o644)
    done = [f"wrote the login hook {script} and its PAM profile {profile}"]
    if root == Path("/"):
        result = subprocess.run([PAM_AUTH_UPDATE, "--package"], capture_output=True, text=True,
                                timeout=60, check=False)
        ok, why = active(root, state_dir)
        done.append("enabled it (pam-auth-update --package)" if ok else
                    f"login hook NOT enabled: {why} (pam-auth-update: "
                    f"{(result.stderr or result.stdout).strip() or result.returncode})")
    return done


def uninstall(root: Path) -> list[str]:
    """Disable and remove the local hook (the packaged one goes with the package)."""
    profile = local_path(root, f"{PAM_CONFIGS}/{LOCAL_PROFILE}")
    if not profile.exists():
        return []
    done = []
    if root == Path("/") and shutil.which(PAM_AUTH_UPDATE):
        subprocess.run([PAM_AUTH_UPDATE, "--package", "--remove", LOCAL_PROFILE],
                       capture_output=True, timeout=60, check=False)
        done.append(f"disabled the login hook (pam-auth-update --remove {LOCAL_PROFILE})")
    profile.unlink()
    script = local_path(root, LOCAL_SCRIPT)
    if script.exists():
        script.unlink()
    done.append(f"removed {profile} and {script}")
    return done


if __name__ == "__main__":   # debian/rules: the packaged hook and profile, from this module
    out_script, out_profile = Path(sys.argv[1]), Path(sys.argv[2])
    out_script.parent.mkdir(parents=True, exist_ok=True)
    out_profile.parent.mkdir(parents=True, exist_ok=True)
    out_script.write_text(render_script("/var/lib/fwsafe"))
    out_script.chmod(0o755)
    out_profile.write_text(render_profile(PACKAGED_SCRIPT))
    out_profile.chmod(0o644)
