"""What `fwsafe apply --host` runs on the host: fixed ``sh -c`` programs, and the names of
what it leaves there.

The programs are fixed text without quotes or backslashes (they survive any login shell's
quoting); every variable part is a positional parameter (`sh`).
"""

from __future__ import annotations

import re
import shlex

#: The private upload directory that `MKTEMP_SCRIPT` makes.
TMPDIR_RE = re.compile(r"^/[A-Za-z0-9._/-]*fwsafe-upload\.[A-Za-z0-9]+$")
#: A transaction ID as the host's fwsafe reports it.
TX_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
#: The uploaded rules files, by layer, inside the upload directory.
REMOTE_NAMES = {"ipv4": "rules.v4", "ipv6": "rules.v6"}

MKTEMP_SCRIPT = 'umask 077 && mktemp -d "${TMPDIR:-/tmp}/fwsafe-upload.XXXXXXXXXX"'
UPLOAD_SCRIPT = 'umask 077 && cat >"$1"'
#: Run the apply immune to SIGHUP (a dropped session must not stop it half-way) and leave its
#: result in the upload directory: a later login can read it if this connection is lost.
#: It first claims the directory (`mkdir DIR/started`, atomic): a later login that claims it
#: first has called the apply off (`READ_RESULT_SCRIPT`), and the apply then never runs.
APPLY_SCRIPT = (
    'trap "" HUP; umask 077; d=$1; shift; mkdir "$d/started" 2>/dev/null || exit 125; '
    '"$@" >"$d/out.json" 2>"$d/err.txt"; rc=$?; '
    'echo "$rc" >"$d/rc.tmp" && mv "$d/rc.tmp" "$d/rc"; rm -f "$d/rules.v4" "$d/rules.v6"; '
    'cat "$d/out.json"; cat "$d/err.txt" >&2; exit "$rc"'
)
#: `APPLY_SCRIPT`'s exit status when a later login had called it off before it started.
CALLED_OFF = 125
#: The result `APPLY_SCRIPT` left behind: the exit status on the first line, then the output.
#: With a second argument `call-off`, an apply that has not started yet is called off for good
#: (the upload directory is removed): it can never run after this answered `CALLED_OFF_NOW`.
READ_RESULT_SCRIPT = (
    'umask 077; d=$1; test -d "$d" || exit 97; '
    'if test -f "$d/rc"; then cat "$d/rc"; cat "$d/out.json"; cat "$d/err.txt" >&2; exit 0; fi; '
    'if test "$2" = call-off && mkdir "$d/started" 2>/dev/null; then rm -rf "$d"; exit 98; fi; '
    'exit 99'
)
#: `READ_RESULT_SCRIPT`'s exit status while the apply runs (or, without call-off, has not
#: started yet).
NOT_YET = 99
#: `READ_RESULT_SCRIPT` called the apply off: it never ran, nothing was changed.
CALLED_OFF_NOW = 98
#: `READ_RESULT_SCRIPT` found no upload directory (removed meanwhile): nothing to learn there.
NO_UPLOAD_DIR = 97
#: Run a command, then remove the upload directory.
RUN_AND_CLEAN_SCRIPT = 'd=$1; shift; "$@"; rc=$?; test -n "$d" && rm -rf "$d"; exit "$rc"'


def sh(script: str, *args: str) -> str:
    """A remote command line: ``sh -c SCRIPT NAME ARGS...`` (no shell syntax from the args)."""
    return shlex.join(["sh", "-c", script, "fwsafe-remote", *args])
