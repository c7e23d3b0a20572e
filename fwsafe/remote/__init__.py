"""Driving a host over SSH from a workstation: `fwsafe apply --host`.

`apply` (the entry point `apply_remote` and the flow, phase by phase) uses:

* `session`: the SSH plumbing (new logins, remote commands); `hostkeys`: known_hosts checks;
* `upload`, `arm`, `confirm`, `outcome`: the phases (upload the rules; arm the host's guard;
  confirm through new logins only; after the deadline, learn what the guard did);
* `verdict`: the host's answers as a result or a typed error;
* `job`: the request and the state the phases share; `scripts`: what runs on the host;
  `timing`: every time limit.
"""
