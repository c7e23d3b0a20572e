"""fwsafe's prerm asks this before the package goes: which transactions are still open?

Prints "ID STATE STATE_DIR" for each transaction whose state is applying, pending or reverting
(the firewall may hold a change nobody has confirmed, that only fwsafe puts back), in the state
directories /var/lib/fwsafe and state_dir of /etc/fwsafe/fwsafe.toml. Exit 2 (after saying why
on stderr) when a record cannot be read. Standard library only, nothing imported from fwsafe:
a broken fwsafe must not make the answer wrong.

    python3 open-transactions.py [CONFIG [STATE_DIR...]]     (the defaults above; for tests)
"""

from __future__ import annotations

import json
import os
import re
import sys

OPEN = ("applying", "pending", "reverting")
STATE_DIR_KEY = re.compile(r'^\s*state_dir\s*=\s*"([^"]+)"\s*(?:#.*)?$')


def state_dirs(config: str, defaults: list[str]) -> list[str]:
    dirs = list(defaults)
    try:
        with open(config, encoding="utf-8") as handle:
            for raw in handle:
                match = STATE_DIR_KEY.match(raw)
                if match:
                    dirs.append(os.path.expanduser(match.group(1)))
    except OSError:
        pass
    return list(dict.fromkeys(dirs))


def main(argv: list[str]) -> int:
    config = argv[0] if argv else "/etc/fwsafe/fwsafe.toml"
    unreadable = False
    for state in state_dirs(config, argv[1:] or ["/var/lib/fwsafe"]):
        try:
            with open(os.path.join(state, "current"), encoding="utf-8") as handle:
                tx_id = handle.read().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            print(f"cannot read {state}/current: {exc}", file=sys.stderr)
            unreadable = True
            continue
        if not tx_id:
            continue
        record = os.path.join(state, "tx", tx_id, "record.json")
        try:
            with open(record, encoding="utf-8") as handle:
                data = json.load(handle)
            state_name = data["state"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"cannot read the transaction record {record}: {exc!r}", file=sys.stderr)
            unreadable = True
            continue
        if state_name in OPEN:
            print(tx_id, state_name, state)
    return 2 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
