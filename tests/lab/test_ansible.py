"""The Ansible collection fwsafe.firewall (ansible/) end to end, in a fleet of namespaces.

A controller namespace runs ansible-playbook (this venv's ansible-core) against three iptables
hosts and one ufw host, each with its own sshd, state directory and firewall (tests/fleetlab.py).
Ansible runs with its DEFAULT ssh_args, so ControlPersist is on and a master connection to each
host exists when the change goes live: the module must close it and confirm through a brand-new
connection, which the lockout test would catch (the old connection survives rules that drop
new ones, a new one does not). Everything Ansible writes goes to a temporary directory
(ANSIBLE_CONFIG, collections, control sockets, remote and local temp), never to ~/.ansible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fwsafe.lab import require_lab_capable
from tests.bins import VENV_BIN
from tests.fleetlab import Fleet, Host, create_fleet, normalize_save
from tests.rulesets import BASELINE_V4, BASELINE_V6, DROP_ALL

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible"
EXAMPLES = REPO / "examples"
ROLLOUT = EXAMPLES / "ansible" / "rollout.yml"
INSTALL = EXAMPLES / "ansible" / "install.yml"
GOOD_V4 = EXAMPLES / "rules" / "web-server.rules"
GOOD_V6 = EXAMPLES / "rules" / "web-server.rules6"
LOCKOUT = EXAMPLES / "rules" / "lockout-new-ssh.rules"
WINDOW_S = 8  # the guard's window in these tests

# A callback plugin that records every task result as one JSON line (FLEET_RECORD).
RECORDER = '''
import json, os
from ansible.plugins.callback import CallbackBase

class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "fleet_record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, status, result):
        res = getattr(result, "result", None)
        if res is None:
            res = result._result
        host = getattr(result, "host", None) or result._host
        task = getattr(result, "task", None) or result._task
        line = {"host": host.get_name(), "task": task.get_name(), "status": status,
                "result": res}
        with open(os.environ["FLEET_RECORD"], "a") as out:
            out.write(json.dumps(line, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._record("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record("failed", result)

    def v2_runner_on_unreachable(self, result):
        self._record("unreachable", result)

    def v2_runner_on_skipped(self, result):
        self._record("skipped", result)
'''


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    elapsed_s: float
    events: list[dict[str, Any]] = field(default_factory=list)

    def results(self, task_prefix: str) -> dict[str, dict[str, Any]]:
        """{host: event} of the last result of the task whose name starts with task_prefix."""
        found: dict[str, dict[str, Any]] = {}
        for event in self.events:
            if event["task"].startswith(task_prefix):
                found[event["host"]] = event
        return found

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP: {host: {ok: N, changed: N, failed: N, ...}}."""
        out: dict[str, dict[str, int]] = {}
        lines = self.stdout.split("PLAY RECAP", 1)[-1].splitlines()[1:]
        for line in lines:
            if ":" not in line or "=" not in line:
                continue
            host, _, rest = line.partition(":")
            out[host.strip()] = {k: int(v) for k, v in
                                 (item.split("=") for item in rest.split())}
        return out

    def show(self) -> str:
        return f"exit {self.rc} after {self.elapsed_s:.1f} s\n{self.stdout}\n{self.stderr}"


class Controller:
    """ansible-playbook in the fleet's controller namespace, with a private Ansible home."""

    def __init__(self, fleet: Fleet, root: Path) -> None:
        self.fleet = fleet
        self.root = root
        self.record = root / "record.jsonl"
        (root / "callbacks").mkdir()
        (root / "callbacks" / "fleet_record.py").write_text(RECORDER)
        for sub in ("home", "collections", "cp", "remote-tmp", "local-tmp"):
            (root / sub).mkdir()
        self.cfg = root / "ansible.cfg"
        self.cfg.write_text(
            "[defaults]\n"
            f"home = {root / 'home'}\n"
            f"collections_path = {root / 'collections'}\n"
            f"remote_tmp = {root / 'remote-tmp'}\n"
            f"local_tmp = {root / 'local-tmp'}\n"
            f"callback_plugins = {root / 'callbacks'}\n"
            "callbacks_enabled = fleet_record\n"
            "interpreter_python = /usr/bin/python3\n"
            "host_key_checking = True\n"
            "retry_files_enabled = False\n"
            "forks = 10\n"
            "timeout = 10\n"
            "[ssh_connection]\n"
            # ssh_args is NOT set: Ansible's default (-C -o ControlMaster=auto
            # -o ControlPersist=60s) keeps a master connection open to every host.
            f"control_path_dir = {root / 'cp'}\n"
        )
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(root / "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ANSIBLE_CONFIG": str(self.cfg),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "FLEET_RECORD": str(self.record),
        }

    def inventory(self, name: str, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
        """An inventory of the fleet: group web (the iptables hosts), group ufw."""
        fleet = self.fleet
        web: dict[str, Any] = {}
        ufw: dict[str, Any] = {}
        for host in fleet.hosts:
            hv: dict[str, Any] = {"ansible_host": host.ip}
            if not host.ufw:
                hv |= {"fwsafe_rules": str(GOOD_V4), "fwsafe_rules6": str(GOOD_V6)}
            hv |= (overrides or {}).get(host.name, {})
            (ufw if host.ufw else web)[host.name] = {k: v for k, v in hv.items() if v is not None}
        inv = {"all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(fleet.key),
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={fleet.known_hosts} "
                                           "-o StrictHostKeyChecking=yes",
                "ansible_python_interpreter": "/usr/bin/python3",
            },
            "children": {"web": {"hosts": web}, "ufw": {"hosts": ufw}},
        }}
        path = self.root / f"{name}.json"  # JSON is YAML
        path.write_text(json.dumps(inv, indent=1))
        return path

    def run(self, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float = 600) -> Run:
        self.record.unlink(missing_ok=True)
        start = time.monotonic()
        res = self.fleet.ctl(argv, env={**self.env, **(env or {})}, timeout=timeout)
        elapsed = time.monotonic() - start
        events = ([json.loads(ln) for ln in self.record.read_text().splitlines() if ln.strip()]
                  if self.record.exists() else [])
        return Run(res.returncode, res.stdout, res.stderr, elapsed, events)

    def playbook(self, playbook: Path, inventory: Path, *args: str, **kw: Any) -> Run:
        return self.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), *args,
                         str(playbook)], **kw)


def _capable() -> None:
    reason = require_lab_capable()
    if reason:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"the Ansible fleet tests must run in CI, but: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    _capable()
    built = create_fleet(BASELINE_V4, BASELINE_V6, hosts=3, ufw_hosts=1)
    names = built.namespaces()
    try:
        yield built
    finally:
        built.close()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left = [ns for ns in names if ns in listed.split()]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture(scope="module")
def ctl(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Controller:
    """The controller, with the collection installed (from ./ansible) into its private path."""
    controller = Controller(fleet, tmp_path_factory.mktemp("ansible"))
    res = controller.run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", "--force",
                          str(COLLECTION)])
    assert res.rc == 0, res.show()
    assert (controller.root / "collections" / "ansible_collections" / "fwsafe" / "firewall"
            / "plugins" / "action" / "apply.py").is_file()
    return controller


def _web(fleet: Fleet) -> list[Host]:
    return [h for h in fleet.hosts if not h.ufw]


def _reset(fleet: Fleet) -> None:
    """Every iptables host back to the baseline, nothing pending."""
    for host in _web(fleet):
        if host.status()["state"] == "pending":
            host.fw("revert")
        host.exec(["iptables-restore"], input=BASELINE_V4)
        host.exec(["ip6tables-restore"], input=BASELINE_V6)


def _baseline() -> str:
    return normalize_save(BASELINE_V4) + "==\n" + normalize_save(BASELINE_V6)


def _wait_past_deadline(hosts: list[Host]) -> None:
    deadline = max(h.status()["deadline"] or 0 for h in hosts)
    time.sleep(max(0.0, deadline - time.time()) + 1.5)


def _assert_confirmed_fresh(host: Host, event: dict[str, Any]) -> None:
    """Confirmed, by a connection other than the one that applied, after the master closed."""
    res = event["result"]
    assert event["status"] == "ok", event
    assert res["changed"] is True and res["state"] == "confirmed", res
    assert "ssh ControlPersist master: closed (ssh -O exit)" in res["connections_closed"], res
    status = host.status()
    assert status["id"] == res["transaction"] and status["state"] == "confirmed", status
    applied_by = status["who"]["SSH_CONNECTION"]
    confirmed_by = status["confirmed_by"]["SSH_CONNECTION"]
    assert applied_by != confirmed_by, status
    assert "from a new SSH connection" in status["reason"], status


def test_collection_builds_and_documents(ctl: Controller, tmp_path: Path) -> None:
    res = ctl.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION),
                   "--output-path", str(tmp_path)])
    assert res.rc == 0, res.show()
    assert (tmp_path / "fwsafe-firewall-0.1.0.tar.gz").is_file()
    doc = ctl.run([str(VENV_BIN / "ansible-doc"), "--json", "fwsafe.firewall.apply"])
    assert doc.rc == 0, doc.show()
    options = json.loads(doc.stdout)["fwsafe.firewall.apply"]["doc"]["options"]
    assert {"rules", "rules6", "partial", "command", "timeout", "probes", "force", "state_dir",
            "executable"} <= set(options)
    role = ctl.run([str(VENV_BIN / "ansible-doc"), "-t", "role", "--json",
                    "fwsafe.firewall.install"])
    assert role.rc == 0, role.show()


def test_good_change_serial_confirmed_through_new_connection_then_idempotent(
        fleet: Fleet, ctl: Controller) -> None:
    _reset(fleet)
    inv = ctl.inventory("good")
    run = ctl.playbook(ROLLOUT, inv, "-e", f"fwsafe_timeout={WINDOW_S}")
    print(f"\n[timing] 3-host rollout of a good change, serial [1, 25%]: {run.elapsed_s:.1f} s")
    assert run.rc == 0, run.show()
    results = run.results("Apply under fwsafe")
    web = _web(fleet)
    assert set(results) == {h.name for h in web}
    changed = {h.name: h.ruleset() for h in web}
    for host in web:
        _assert_confirmed_fresh(host, results[host.name])
        assert changed[host.name] != _baseline()
    assert "-P INPUT DROP" in fleet.host("h1").exec(["iptables", "-S"]).stdout

    _wait_past_deadline(web)  # the change stays after the guard's deadline
    for host in web:
        assert host.status()["state"] == "confirmed"
        assert host.ruleset() == changed[host.name]
        assert fleet.new_connection_ok(host)

    again = ctl.playbook(ROLLOUT, inv, "-e", f"fwsafe_timeout={WINDOW_S}")
    print(f"[timing] the same rollout again (nothing to change): {again.elapsed_s:.1f} s")
    assert again.rc == 0, again.show()
    recap = again.recap()
    assert all(recap[h.name]["changed"] == 0 for h in web), again.stdout
    for event in again.results("Apply under fwsafe").values():
        assert event["result"]["state"] == "unchanged", event


def test_good_change_all_at_once(fleet: Fleet, ctl: Controller) -> None:
    _reset(fleet)
    run = ctl.playbook(ROLLOUT, ctl.inventory("good"), "-e", f"fwsafe_timeout={WINDOW_S}",
                       "-e", "fwsafe_serial=100%")
    print(f"\n[timing] 3-host rollout of a good change, all at once: {run.elapsed_s:.1f} s")
    assert run.rc == 0, run.show()
    results = run.results("Apply under fwsafe")
    for host in _web(fleet):
        _assert_confirmed_fresh(host, results[host.name])


def test_lockout_on_one_host_is_reverted_and_stops_the_rollout(
        fleet: Fleet, ctl: Controller) -> None:
    _reset(fleet)
    h1, h2, h3 = _web(fleet)
    inv = ctl.inventory("lockout", {"h2": {"fwsafe_rules": str(LOCKOUT), "fwsafe_rules6": None}})
    h3_logins, h3_status = h3.accepted_logins(), h3.status()
    run = ctl.playbook(ROLLOUT, inv, "-e", f"fwsafe_timeout={WINDOW_S}",
                       "-e", "fwsafe_force=true")
    print(f"\n[timing] serial rollout stopped by a lockout on the 2nd host: {run.elapsed_s:.1f} s")
    assert run.rc != 0, run.show()
    results = run.results("Apply under fwsafe")
    _assert_confirmed_fresh(h1, results["h1"])

    bad = results["h2"]
    print("[h2] " + str(bad["result"].get("msg")))
    assert bad["status"] == "failed", bad
    res = bad["result"]
    assert res["state"] == "reverted", res
    assert "REVERTED" in res["msg"] and res["transaction"] in res["msg"], res["msg"]
    assert res["reason"], res
    # The module did close the master that existed before the change: a confirmation through
    # it would have kept the lockout (established connections survive these rules).
    assert "ssh ControlPersist master: closed (ssh -O exit)" in res["connections_closed"], res
    assert res["confirm_attempts"] >= 1, res
    assert "REVERTED" in run.stdout
    status = h2.status()
    assert status["state"] == "reverted" and status["id"] == res["transaction"], status
    assert status["confirmed_by"] is None
    assert h2.ruleset() == _baseline()
    assert fleet.wait_reachable(h2, 10), "h2 does not answer new SSH connections"
    login = fleet.ctl(["ssh", "-i", str(fleet.key), "-o", f"UserKnownHostsFile={fleet.known_hosts}",
                       "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                       "-o", "ControlPath=none", f"root@{h2.ip}", "true"],
                      env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert login.returncode == 0, login.stderr

    # serial 1 + max_fail_percentage 0: the host after the failing one is never touched.
    assert "h3" not in results and not any(e["host"] == "h3" for e in run.events)
    assert h3.accepted_logins() == h3_logins
    assert h3.status() == h3_status
    assert h3.ruleset() == _baseline()


def test_change_that_drops_established_connections_too_is_reverted(
        fleet: Fleet, ctl: Controller, tmp_path: Path) -> None:
    """Everything dropped, the connection that applies included: still reverted, and said so."""
    _reset(fleet)
    h3 = fleet.host("h3")
    drop_all = tmp_path / "drop-all.rules"
    drop_all.write_text(DROP_ALL)
    inv = ctl.inventory("dropall", {"h3": {"fwsafe_rules": str(drop_all), "fwsafe_rules6": None}})
    run = ctl.playbook(ROLLOUT, inv, "-e", f"fwsafe_timeout={WINDOW_S}", "-e", "fwsafe_force=true",
                       "-e", "fwsafe_hosts=h3")
    print(f"\n[timing] a change that drops everything, reverted: {run.elapsed_s:.1f} s")
    assert run.rc != 0, run.show()
    res = run.results("Apply under fwsafe")["h3"]["result"]
    print("[h3] " + str(res.get("msg")))
    assert res["state"] == "reverted", res
    assert h3.status()["state"] == "reverted"
    assert h3.ruleset() == _baseline()
    assert fleet.wait_reachable(h3, 10)


def test_check_mode_predicts_lockout_and_diff_shows_change(fleet: Fleet, ctl: Controller) -> None:
    _reset(fleet)
    h1 = fleet.host("h1")
    before, status_before = h1.ruleset(), h1.status()
    inv = ctl.inventory("check", {"h1": {"fwsafe_rules": str(LOCKOUT), "fwsafe_rules6": None}})
    run = ctl.playbook(ROLLOUT, inv, "--check", "-e", "fwsafe_hosts=h1")
    assert run.rc != 0, run.show()
    res = run.results("Apply under fwsafe")["h1"]["result"]
    assert res["state"] == "refused", res
    assert "lockout predicted" in res["msg"], res
    assert "--ctstate NEW -j DROP" in res["msg"], res  # the culprit rule, named
    assert h1.ruleset() == before and h1.status() == status_before

    good = ctl.playbook(ROLLOUT, ctl.inventory("good"), "--check", "--diff",
                        "-e", "fwsafe_hosts=h1")
    assert good.rc == 0, good.show()
    assert "-A INPUT -p tcp -m multiport --dports 80,443 -j ACCEPT" in good.stdout, good.stdout
    assert "-A LOGDROP -j DROP" in good.stdout  # a removed chain, shown as removed
    res = good.results("Apply under fwsafe")["h1"]["result"]
    assert res["changed"] is True and res["state"] == "unchanged", res
    assert h1.ruleset() == before and h1.status() == status_before


def test_ufw_command_on_ufw_host(fleet: Fleet, ctl: Controller) -> None:
    h4 = next(h for h in fleet.hosts if h.ufw)
    assert "80/tcp" not in h4.exec(["ufw", "status"]).stdout
    inv = ctl.inventory("ufw")
    extra = json.dumps({"fwsafe_hosts": "ufw", "fwsafe_command": ["ufw", "allow", "80/tcp"],
                        "fwsafe_timeout": WINDOW_S})
    run = ctl.playbook(ROLLOUT, inv, "-e", extra)
    assert run.rc == 0, run.show()
    _assert_confirmed_fresh(h4, run.results("Apply under fwsafe")["h4"])
    assert "80/tcp" in h4.exec(["ufw", "status"]).stdout
    assert "--dport 80 -j ACCEPT" in h4.exec(["iptables-save"]).stdout
    _wait_past_deadline([h4])
    assert h4.status()["state"] == "confirmed"
    assert "80/tcp" in h4.exec(["ufw", "status"]).stdout

    again = ctl.playbook(ROLLOUT, inv, "-e", extra)
    assert again.rc == 0, again.show()
    assert again.recap()["h4"]["changed"] == 0, again.stdout


def test_install_role_from_wheel_is_idempotent(fleet: Fleet, ctl: Controller,
                                              tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    # The controller and the hosts have no package index (their namespaces reach only each
    # other): the build requirement and fwsafe's dependencies come as wheels, fetched here.
    got = subprocess.run([str(VENV_BIN / "python"), "-m", "pip", "download", "-q",
                          "--disable-pip-version-check", "--dest", str(wheelhouse),
                          "setuptools>=61", "click>=8.0", "paramiko>=3.0"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    web = _web(fleet)
    root = tmp_path / "hosts"
    for host in web:  # each host's boot hook goes into a root file system of its own
        (root / host.name / "root").mkdir(parents=True)
    extra = json.dumps({
        "fwsafe_source": str(REPO),
        "fwsafe_python": "/usr/bin/python3",
        "fwsafe_venv": f"{root}/{{{{ inventory_hostname }}}}/venv",
        "fwsafe_link": f"{root}/{{{{ inventory_hostname }}}}/fwsafe",
        "fwsafe_boot_hook_root": f"{root}/{{{{ inventory_hostname }}}}/root",
        "fwsafe_wheelhouse": str(wheelhouse),
    })
    # The controller's temporary directory, where the role builds the wheel: empty again after
    # each run (it was left there, a copy of the sources per run, until 2026-12-08).
    controller_tmp = tmp_path / "controller-tmp"
    controller_tmp.mkdir()
    pip_env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse),
               "TMPDIR": str(controller_tmp)}
    inv = ctl.inventory("install")
    build_existed = (REPO / "build").exists()
    first = ctl.playbook(INSTALL, inv, "-e", extra, env=pip_env)
    print(f"\n[timing] install role on 3 hosts: {first.elapsed_s:.1f} s")
    assert first.rc == 0, first.show()
    made = [e["result"].get("path", "") for e in first.events
            if e["task"].endswith("Make a build directory on the controller")]
    assert made and all(path.startswith(f"{controller_tmp}/") for path in made), made
    assert list(controller_tmp.iterdir()) == [], "the role left its build directory"
    recap = first.recap()
    for host in web:
        assert recap[host.name]["changed"] > 0
        base = root / host.name
        version = host.exec([str(base / "fwsafe"), "--version"]).stdout
        assert "fwsafe" in version
        unit = base / "root" / "etc/systemd/system/fwsafe-recover.service"
        assert f"{base}/venv/bin/python" in unit.read_text()
        assert (base / "root" / "etc/systemd/system/sysinit.target.wants"
                / "fwsafe-recover.service").is_symlink()
        assert (base / "root" / "var/lib/fwsafe/fwsafe.pyz").is_file()
    assert (REPO / "build").exists() == build_existed  # built from a copy of the sources

    again = ctl.playbook(INSTALL, inv, "-e", extra, env=pip_env)
    assert again.rc == 0, again.show()
    recap = again.recap()
    assert all(recap[h.name]["changed"] == 0 for h in web), again.stdout
    assert list(controller_tmp.iterdir()) == [], "the role left its build directory"


# The ansible-test sanity tests that run offline. The others (ansible-doc, import, pep8, pylint,
# runtime-metadata, validate-modules, yamllint) each build a venv and bootstrap pip into it from
# ci-files.testing.ansible.com, which this machine cannot reach; ansible-doc is run above by the
# test of the collection's documentation, ruff checks the Python.
OFFLINE_SANITY = ("action-plugin-docs", "compile", "empty-init", "ignores", "line-endings",
                  "no-assert", "no-get-exception", "no-illegal-filenames", "no-smart-quotes",
                  "replace-urlopen", "shebang", "symlinks", "use-argspec-type-path",
                  "use-compat-six")


def test_sanity_offline(tmp_path: Path) -> None:
    """ansible-test sanity on the collection, with the tests that need no network."""
    tree = tmp_path / "ansible_collections" / "fwsafe" / "firewall"
    shutil.copytree(COLLECTION, tree,
                    ignore=shutil.ignore_patterns("__pycache__", ".ruff_cache", "ruff.toml"))
    tests = [arg for name in OFFLINE_SANITY for arg in ("--test", name)]
    res = subprocess.run(
        [str(VENV_BIN / "ansible-test"), "sanity", "--python", "3.11", "--color", "no", *tests],
        cwd=tree, capture_output=True, text=True, timeout=600,
        env={"HOME": str(tmp_path / "home"), "PATH": f"{VENV_BIN}:/usr/bin:/bin",
             "LANG": "C.UTF-8"})
    print(res.stdout[-2000:])
    assert res.returncode == 0, res.stdout + res.stderr
    ran = res.stdout.count("Running sanity test")
    assert ran == len(OFFLINE_SANITY), res.stdout
