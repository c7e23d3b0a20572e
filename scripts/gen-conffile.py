#!/usr/bin/env python3
"""Write the packaged /etc/fwsafe/fwsafe.toml: examples/fwsafe.toml with every key commented out.

    python3 scripts/gen-conffile.py EXAMPLE OUT

The Debian package ships the result as a conffile (debian/rules). With every line a comment the
file sets nothing, so fwsafe runs with its built-in defaults until the admin uncomments a key;
the explanations stay next to each key.
"""

from __future__ import annotations

import sys
from pathlib import Path

HEADER = """\
# /etc/fwsafe/fwsafe.toml: the configuration of fwsafe (a conffile of the fwsafe package).
#
# Every key below is commented out, so fwsafe uses its built-in defaults: the values shown,
# except `probes` and the [hosts.*] tables, which are examples (by default there are none).
# Uncomment a key to change it. More: fwsafe(8), /usr/share/doc/fwsafe/operations.md.gz.
#
"""


def commented(example: str) -> str:
    """Every line that is not a comment or blank becomes one (`# ` in front)."""
    out = []
    for raw in example.splitlines():
        stripped = raw.strip()
        out.append(raw if not stripped or stripped.startswith("#") else f"# {raw}")
    return HEADER + "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gen-conffile.py EXAMPLE OUT", file=sys.stderr)
        return 2
    Path(argv[1]).write_text(commented(Path(argv[0]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
