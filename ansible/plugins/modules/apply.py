#!/usr/bin/python
# Copyright: fwsafe contributors
# MIT License (see the fwsafe repository)
"""Documentation of fwsafe.firewall.apply. The work is done by the action plugin of the same
name on the controller (plugins/action/apply.py), which runs the fwsafe CLI on the host; this
file only fails if it is ever run on a host by itself."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: apply
short_description: Change a firewall under fwsafe's dead-man's switch, confirmed through a new SSH connection
version_added: "0.1.0"
description:
  - Applies iptables-save or nftables rules files, or runs a command such as C(ufw allow 80/tcp),
    on the host under C(fwsafe apply). The host's guard puts the old rules back unless the change
    is confirmed before O(timeout) seconds have passed.
  - After the change, every connection to the host is closed, the ssh ControlPersist master
    included (C(ssh -O exit)), and C(fwsafe confirm) is run through a brand-new SSH connection
    that may not use any control socket. A change that lets established connections live but
    drops new ones is therefore never confirmed; the guard reverts it and the task fails, saying
    so and why.
  - Idempotent. C(fwsafe diff) runs first; when the live firewall already equals the request
    nothing is applied (RV(state=unchanged)).
  - In check mode C(fwsafe check) (and the diff) run on the host; a predicted lockout fails the
    task, naming the rule. Nothing changes.
  - Needs the ssh connection plugin with key-based login (and become without a password, if
    become is used), and fwsafe on the host (role M(fwsafe.firewall.install) installs it).
options:
  rules:
    description:
      - Rules file on the controller (looked up like C(src) of M(ansible.builtin.copy)), an
        iptables-save file (IPv4) or an nftables file (recognised by content).
    type: str
  rules6:
    description:
      - An ip6tables-save file on the controller (IPv6); applied together with O(rules), under
        the same guard.
    type: str
  partial:
    description:
      - Replace only the chains (nft, the tables) the files name (C(fwsafe apply --partial)).
    type: bool
    default: false
  command:
    description:
      - A command to run under the guard instead of rules files, one list item per argument,
        for example C([ufw, allow, 80/tcp]) (C(fwsafe apply -- ufw allow 80/tcp)).
    type: list
    elements: str
  timeout:
    description:
      - Seconds until the host's guard reverts the change unless it is confirmed.
    type: int
    default: 60
  probes:
    description:
      - Probe URLs the guard runs during the window (C(fwsafe apply --probe)); N failures in a row
        revert early. C(tcp://HOST:PORT), C(ssh://), C(ssh-auth://), C(http(s)://), C(cmd:).
    type: list
    elements: str
    default: []
  force:
    description:
      - Apply even when fwsafe predicts a lockout (the guard still reverts it unless a new
        connection confirms it). Without it a predicted lockout fails the task, nothing changed.
    type: bool
    default: false
  state_dir:
    description:
      - fwsafe's state directory on the host (C(--state-dir)); default fwsafe's own.
    type: str
  executable:
    description:
      - The fwsafe program on the host.
    type: str
    default: fwsafe
  connect_timeout:
    description:
      - Seconds each new SSH connection attempt may take to connect while confirming, at the
        least. Before the change one new SSH login measures the link, and on a slow link this
        grows as C(fwsafe apply --host) scales its own budgets (2 s + 3 times that login,
        at most 60 s).
    type: int
    default: 5
  revert_grace:
    description:
      - After a missed deadline, how many seconds beyond O(timeout) to wait for the host to
        answer a new connection again and tell why it reverted (C(fwsafe apply --host) waits
        120 s).
    type: int
    default: 120
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
notes:
  - Confirmation through a new connection is the point of this module, so a host that accepts
    new SSH logins only through a ProxyJump or bastion needs those options in
    C(ansible_ssh_common_args); the new connection uses the inventory's host, port, user, key,
    C(ansible_ssh_common_args) and host key checking, but never a control socket.
  - Use C(serial) and C(max_fail_percentage=0) to roll out host by host; a host that reverted
    fails its task, so the hosts after it are never touched.
author:
  - fwsafe contributors
"""

EXAMPLES = r"""
- name: New iptables rules, confirmed through a new SSH login
  fwsafe.firewall.apply:
    rules: files/web.rules
    rules6: files/web.rules6
    timeout: 60

- name: A ufw command under the guard
  fwsafe.firewall.apply:
    command: [ufw, allow, 80/tcp]

- name: Only the chains the file names, with a probe of the app port
  fwsafe.firewall.apply:
    rules: files/input-only.rules
    partial: true
    probes:
      - tcp://127.0.0.1:8080
"""

RETURN = r"""
state:
  description:
    - V(confirmed) (applied, then confirmed through a new SSH connection), V(reverted) (the
      host's guard put the old rules back), V(refused) (fwsafe refused before anything changed,
      e.g. a predicted lockout), V(unchanged) (nothing to do; and in check mode, always, as
      nothing is applied).
  returned: always
  type: str
  sample: confirmed
transaction:
  description: The fwsafe transaction id on the host (C(fwsafe status), C(fwsafe show)).
  returned: when a change was applied
  type: str
  sample: 20261130T050749Z-9db1
reason:
  description: Why the transaction ended as it did, as the host recorded it.
  returned: always
  type: str
  sample: "deadline passed without confirmation"
confirmed_via:
  description: The client address and port of the new SSH connection that confirmed.
  returned: when confirmed
  type: str
  sample: 10.0.0.5 53106
connections_closed:
  description: What was closed before confirming (the ControlPersist master, the connection).
  returned: when a change was applied
  type: list
  elements: str
confirm_attempts:
  description: How many new SSH connections were tried.
  returned: when a change was applied
  type: int
link:
  description:
    - The link as measured before the change (C(rtt_s), C(login_s)) and the limits scaled from
      it (C(attempt) for a new login, C(query) for a remote command), as C(fwsafe apply --host)
      scales them.
  returned: when a change was applied
  type: dict
diff_units:
  description: C(fwsafe diff --json) units (layer, unit, change, unified diff).
  returned: always
  type: list
  elements: dict
check:
  description: In check mode, the lockout prediction (lockout, culprits, not_checked).
  returned: in check mode, when there is a change
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

ARGUMENT_SPEC = {
    "rules": {"type": "str"},
    "rules6": {"type": "str"},
    "partial": {"type": "bool", "default": False},
    "command": {"type": "list", "elements": "str"},
    "timeout": {"type": "int", "default": 60},
    "probes": {"type": "list", "elements": "str", "default": []},
    "force": {"type": "bool", "default": False},
    "state_dir": {"type": "str"},
    "executable": {"type": "str", "default": "fwsafe"},
    "connect_timeout": {"type": "int", "default": 5},
    "revert_grace": {"type": "int", "default": 120},
}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True,
                           mutually_exclusive=[("rules", "command"), ("rules6", "command"),
                                               ("partial", "command")],
                           required_one_of=[("rules", "rules6", "command")])
    module.fail_json(msg="fwsafe.firewall.apply runs through its action plugin on the controller; "
                         "it cannot run on the host by itself")


if __name__ == "__main__":
    main()
