"""The audit asks the routes to its sources (up to 64) in one `ip -batch` (check.host.routes_to)
instead of one `ip route get` each: in the lab's server namespace, with the real `ip`, each
address gets what `ip route get` alone gives it: the routes where there is one, the same
error where there is none (the batch goes on past it), and client_path says the same either
way."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import FwLab

pytestmark = pytest.mark.lab

SCRIPT = textwrap.dedent("""
    import json, subprocess
    from fwsafe.check.host import client_path, host_interfaces, ip_json, routes_to

    addresses = ["203.0.113.77", "127.0.0.1", "2001:db8:77::1", "192.0.2.200"]
    batch = routes_to(addresses)
    alone = {}
    for a in addresses:
        r = subprocess.run(["ip", "-j", "route", "get", a], capture_output=True, text=True)
        alone[a] = json.loads(r.stdout) if r.returncode == 0 else r.stderr.strip()
    ifaces = host_interfaces()
    paths = {a: [vars(client_path(a, None, ifaces, batch)), vars(client_path(a, None, ifaces))]
             for a in addresses}
    print(json.dumps({"batch": batch, "alone": alone, "paths": paths}))
""")


def test_one_batch_gives_each_address_what_ip_gives_it_alone(fwlab: FwLab) -> None:
    out = fwlab.srv_python(SCRIPT)
    batch, alone = out["batch"], out["alone"]
    assert set(batch) == set(alone)
    for address, answer in alone.items():
        assert batch[address] == answer, address
    assert any(isinstance(v, str) for v in alone.values()), "no address without a route"
    assert any(isinstance(v, list) for v in alone.values()), "no address with a route"
    for address, (batched, single) in out["paths"].items():
        assert batched == single, address
