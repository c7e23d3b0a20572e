"""The recovery by power cycle: the rules of `decide`, the boot record, the login hook's
detection and a recovery on a fake root (the files, the history entry that undoes it, the
record `fwsafe status` shows). The real boots, PAM and loaders: tests/lab/test_power_cycle.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from fwsafe.core import transaction
from fwsafe.core.statedir import StateDir
from fwsafe.ondisk.history_format import BEFORE_RECOVERY, find_entry, list_history
from fwsafe.ondisk.sshd_files import FileState, SshdFiles, dump
from fwsafe.ondisk.ufw_files import capture_ufw_files, load_ufw_files
from fwsafe.persistence import known_good, loginhook, powercycle
from fwsafe.persistence.powercycle import Boot, decide
from fwsafe.persistence.rollback import rollback_change
from fwsafe.rescue import rescue_plan, rescue_write

W = 600.0


def boot(boot_id: str, t: float, digest: str = "d", marked: bool = True) -> Boot:
    return Boot(boot_id, t, digest, marked)


@pytest.mark.parametrize(("previous", "now", "login", "enabled", "recover", "why"), [
    (boot("a", 1000), boot("b", 1300), None, True, True, "no SSH login"),
    (boot("a", 1000), boot("b", 1300), "a", True, False, "login succeeded"),
    (boot("a", 1000), boot("b", 1300), "older", True, True, "no SSH login"),
    (boot("a", 1000), boot("b", 1000 + W + 1), None, True, False, "outside the window"),
    (boot("a", 1000), boot("b", 999), None, True, False, "outside the window"),
    (boot("a", 1000, "d1"), boot("b", 1300, "d2"), None, True, False, "files changed"),
    (boot("a", 1000, marked=False), boot("b", 1300), None, True, False, "not marked during"),
    (boot("a", 1000), boot("b", 1300, marked=False), None, True, False, "not marked here"),
    (None, boot("b", 1300), None, True, False, "no earlier boot"),
    (boot("b", 1000), boot("b", 1300), None, True, False, "same boot"),
    (boot("a", 1000), boot("b", 1300), None, False, False, "reboot_recovery = false"),
])
def test_decide(previous: Boot | None, now: Boot, login: str | None, enabled: bool,
                recover: bool, why: str) -> None:
    decision = decide(previous, now, login, W, enabled=enabled)
    assert decision.recover is recover
    assert why in decision.why


def test_boot_record_round_trip_and_damage() -> None:
    b = boot("x", 12.5, "dd", True)
    assert Boot.from_json(json.loads(json.dumps(b.to_json()))) == b
    assert Boot.from_json({"boot_id": "x"}) is None
    assert Boot.from_json([1]) is None


# --------------------------------------------------------------------------------------------
STATE = "/var/lib/fwsafe"


def _hook(root: Path, state_dir: str = STATE, where: str = "/etc/pam.d/common-session") -> None:
    script = root / loginhook.LOCAL_SCRIPT.lstrip("/")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(loginhook.render_script(state_dir))
    script.chmod(0o755)
    pam = root / where.lstrip("/")
    pam.parent.mkdir(parents=True, exist_ok=True)
    pam.write_text("session\trequired\tpam_unix.so\n"
                   f"session\toptional\tpam_exec.so quiet {loginhook.LOCAL_SCRIPT}\n")
    sshd = root / "etc/ssh/sshd_config"
    sshd.parent.mkdir(parents=True, exist_ok=True)
    sshd.write_text("Include /etc/ssh/sshd_config.d/*.conf\nUsePAM yes\n")


def test_login_hook_detection(tmp_path: Path) -> None:
    assert not loginhook.active(tmp_path, STATE)[0]
    _hook(tmp_path)
    assert loginhook.active(tmp_path, STATE)[0]
    assert not loginhook.active(tmp_path, "/srv/other")[0]   # marks another state dir
    (tmp_path / "etc/pam.d/common-session").write_text(
        f"# session optional pam_exec.so quiet {loginhook.LOCAL_SCRIPT}\n")
    assert not loginhook.active(tmp_path, STATE)[0]           # commented out
    _hook(tmp_path)
    sshd = tmp_path / "etc/ssh/sshd_config"
    sshd.write_text("UsePAM no\n")
    assert not loginhook.active(tmp_path, STATE)[0]           # sshd passes no PAM session
    assert "UsePAM no" in loginhook.active(tmp_path, STATE)[1]
    sshd.write_text("# UsePAM yes\n")
    assert not loginhook.active(tmp_path, STATE)[0]           # sshd's own default: no
    sshd.unlink()
    assert not loginhook.active(tmp_path, STATE)[0]           # no sshd (dropbear)
    sshd.write_text("usepam YES\nUsePAM no\n")
    assert loginhook.active(tmp_path, STATE)[0]               # the first value wins
    sshd.write_text('UsePAM "yes" # quoted, as sshd accepts it\n')
    assert loginhook.active(tmp_path, STATE)[0]
    with pytest.raises(ValueError):
        loginhook.render_script("/var/lib/it's")


def _run_hook(script: Path, state: Path, service: str, kind: str = "open_session") -> None:
    subprocess.run(["sh", str(script)], env={"PATH": os.environ["PATH"], "PAM_TYPE": kind,
                                             "PAM_SERVICE": service}, check=True, timeout=30)


def test_the_hook_marks_ssh_logins_only_once_a_boot(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    script = tmp_path / "login-mark"
    script.write_text(loginhook.render_script(str(state)))
    for service in ("cron", "sudo", "login"):
        _run_hook(script, state, service)
    _run_hook(script, state, "sshd", "close_session")
    assert loginhook.read_mark(state) is None
    _run_hook(script, state, "sshd")
    mark = loginhook.read_mark(state)
    assert mark is not None and mark[0] == transaction.current_boot_id()
    first = (state / loginhook.MARK).stat().st_mtime_ns
    _run_hook(script, state, "sshd")      # the same boot: nothing written
    assert (state / loginhook.MARK).stat().st_mtime_ns == first
    assert sorted(p.name for p in state.iterdir()) == [loginhook.MARK]


# --------------------------------------------------------------------------------------------
def _ufw(root: Path, rules: str) -> None:
    (root / "etc/ufw").mkdir(parents=True, exist_ok=True)
    (root / "etc/ufw/user.rules").write_text(rules)
    (root / "etc/ufw/ufw.conf").write_text("ENABLED=yes\n")


def _previous_boot(state: StateDir) -> None:
    """Make the boot record another boot's (the next boot is the same kernel here)."""
    record = json.loads((state.root / powercycle.BOOTS).read_text())
    record["boot_id"] = "a-previous-boot"
    (state.root / powercycle.BOOTS).write_text(json.dumps(record))


def _host(tmp_path: Path) -> tuple[Path, StateDir]:
    """A fake root with a state directory and the login hook enabled for it."""
    root = tmp_path / "root"
    state = StateDir(root / STATE.lstrip("/"))
    state.ensure()
    _hook(root, str(state.root))
    return root, state


def test_recovery_on_a_fake_root(tmp_path: Path) -> None:
    root, state = _host(tmp_path)
    _ufw(root, "good: allow 22\n")
    good, _ = known_good.add_entry(state, {"ufw": capture_ufw_files(root)}, {"tx": "t1"})
    _ufw(root, "bad: 22 deleted\n")       # unguarded, saved to ufw's files

    # Boot A: the first boot after the change only records it.
    first, done = powercycle.at_boot(state, root=root, now=1000.0)
    assert not first.recover and done is None
    assert "no earlier boot" in first.why
    _previous_boot(state)

    # Boot B, 5 minutes later, no login mark of boot A: the files of `good` come back.
    second, done = powercycle.at_boot(state, root=root, now=1300.0)
    assert second.recover, second.why
    assert done is not None and done["entry"] == good.id
    assert (root / "etc/ufw/user.rules").read_text() == "good: allow 22\n"
    assert (root / "etc/ufw/user.rules.fwsafe-bak").read_text() == "bad: 22 deleted\n"
    found, damaged = list_history(state.root)
    undo = find_entry(found, damaged, done["undo"])
    assert undo.kind == BEFORE_RECOVERY
    assert load_ufw_files(undo.layers["ufw"])["/etc/ufw/user.rules"][1] == b"bad: 22 deleted\n"
    assert find_entry(found, damaged, "last").id == good.id   # never the last good one
    info = powercycle.status_info(state)
    assert info is not None and info["this_boot"] and info["undo"] == undo.id
    assert f"fwsafe rollback {undo.id}" in powercycle.describe(info)
    assert "power-cycle recovery" in (root / powercycle.MOTD.lstrip("/")).read_text()


def test_a_login_between_the_boots_changes_nothing(tmp_path: Path) -> None:
    root, state = _host(tmp_path)
    _ufw(root, "good\n")
    known_good.add_entry(state, {"ufw": capture_ufw_files(root)}, {"tx": "t1"})
    _ufw(root, "unguarded\n")
    powercycle.at_boot(state, root=root, now=1000.0)
    _previous_boot(state)   # and a login during that boot:
    (state.root / loginhook.MARK).write_text("a-previous-boot 1001\n")
    decision, done = powercycle.at_boot(state, root=root, now=1100.0)
    assert not decision.recover and done is None
    assert "login succeeded" in decision.why
    assert (root / "etc/ufw/user.rules").read_text() == "unguarded\n"
    assert powercycle.status_info(state) is None


# --------------------------------------------------------------------------------------------
# sshd's files in the history: kept with the firewall, put back by the rescue's plan (which the
# power-cycle recovery uses too).
def _sshd_layer(files: dict[str, str]) -> bytes:
    return dump(SshdFiles("/etc/ssh/sshd_config", {
        path: FileState(0o644, 0, 0, text.encode()) for path, text in files.items()}))


def test_the_rescue_plan_puts_sshd_files_back_and_moves_new_drop_ins_aside(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = StateDir(root / STATE.lstrip("/"))
    state.ensure()
    main = "Include /etc/ssh/sshd_config.d/*.conf\nPasswordAuthentication no\n"
    good, _ = known_good.add_entry(state, {"sshd": _sshd_layer({
        "/etc/ssh/sshd_config": main,
        "/etc/ssh/sshd_config.d/10-keep.conf": "MaxAuthTries 5\n"})}, {"tx": "t1"})
    drop_ins = root / "etc/ssh/sshd_config.d"
    drop_ins.mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text(main.replace("no", "yes"))
    (drop_ins / "10-keep.conf").write_text("MaxAuthTries 5\n")
    (drop_ins / "00-bad.conf").write_text("PermitRootLogin no\n")   # added since, unguarded
    (drop_ins / "README").write_text("not included\n")

    found, damaged = list_history(state.root)
    entry = find_entry(found, damaged, "last")
    assert entry.id == good.id and "sshd" in entry.layers
    plan = rescue_plan.plan_restore(entry, root)
    assert sorted((c.server_path, c.action) for c in plan.changes) == [
        ("/etc/ssh/sshd_config", "replace"), ("/etc/ssh/sshd_config.d/00-bad.conf", "remove")]
    rescue_write.write_plan(plan, root)
    assert (root / "etc/ssh/sshd_config").read_text() == main
    assert not (drop_ins / "00-bad.conf").exists()
    assert (drop_ins / "00-bad.conf.fwsafe-bak").read_text() == "PermitRootLogin no\n"
    assert (drop_ins / "README").exists() and (drop_ins / "10-keep.conf").exists()
    assert rescue_plan.plan_restore(entry, root).changes == []


def test_the_rescue_plan_moves_fwsafes_socket_dropin_aside_when_the_entry_had_none(
        tmp_path: Path) -> None:
    """sshd started by ssh.socket: fwsafe's drop-in moved the socket with sshd_config's Port;
    an entry from before it goes back to port 22 for both."""
    root = tmp_path / "root"
    state = StateDir(root / STATE.lstrip("/"))
    state.ensure()
    admin = "/etc/systemd/system/ssh.socket.d/00-admin.conf"
    good, _ = known_good.add_entry(state, {"sshd": _sshd_layer({
        "/etc/ssh/sshd_config": "Port 22\n", admin: "[Socket]\nBacklog=128\n"})}, {"tx": "t1"})
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/sshd_config").write_text("Port 2222\n")
    sockd = root / "etc/systemd/system/ssh.socket.d"
    sockd.mkdir(parents=True)
    (sockd / "00-admin.conf").write_text("[Socket]\nBacklog=128\n")
    (sockd / "zz-fwsafe-listen.conf").write_text("[Socket]\nListenStream=\nListenStream=2222\n")
    found, damaged = list_history(state.root)
    plan = rescue_plan.plan_restore(find_entry(found, damaged, "last"), root)
    assert sorted((c.server_path, c.action) for c in plan.changes) == [
        ("/etc/ssh/sshd_config", "replace"),
        ("/etc/systemd/system/ssh.socket.d/zz-fwsafe-listen.conf", "remove")]
    rescue_write.write_plan(plan, root)
    assert not (sockd / "zz-fwsafe-listen.conf").exists()
    assert (sockd / "00-admin.conf").read_text() == "[Socket]\nBacklog=128\n"
    assert good.id


def test_a_damaged_sshd_layer_makes_the_entry_damaged(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    entry, _ = known_good.add_entry(state, {"sshd": _sshd_layer({"/etc/ssh/sshd_config": "x\n"})},
                                 {"tx": "t1"})
    assert entry.path is not None
    layer = entry.path / "sshd.json"
    data = json.loads(layer.read_text())
    data["files"]["relative/path"] = data["files"].pop("/etc/ssh/sshd_config")
    raw = json.dumps(data).encode()
    layer.write_bytes(raw)
    meta = json.loads((entry.path / "meta.json").read_text())
    meta["layers"]["sshd"]["sha256"] = hashlib.sha256(raw).hexdigest()
    (entry.path / "meta.json").write_text(json.dumps(meta))
    found, damaged = list_history(state.root)
    assert [d.id for d in damaged] == [entry.id] and "sshd" in damaged[0].why
    text = known_good.layer_text("sshd", _sshd_layer({"/etc/ssh/sshd_config": "Port 22\n"}))
    assert text == {"sshd /etc/ssh/sshd_config": "Port 22\n"}


def test_a_recovery_that_cannot_write_says_so_and_still_counts_the_boot(tmp_path: Path) -> None:
    root, state = _host(tmp_path)
    _ufw(root, "good\n")
    known_good.add_entry(state, {"ufw": capture_ufw_files(root)}, {"tx": "t1"})
    (root / "etc/ufw/user.rules").unlink()
    (root / "etc/ufw/user.rules").mkdir()      # not a file: the plan refuses it
    powercycle.at_boot(state, root=root, now=1000.0)
    _previous_boot(state)
    decision, done = powercycle.at_boot(state, root=root, now=1100.0)
    assert not decision.recover and done is None
    assert "recovery FAILED" in decision.why and "not a regular file" in decision.why
    record = json.loads((state.root / powercycle.BOOTS).read_text())
    assert record["boot_id"] == transaction.current_boot_id()


def test_the_hook_is_wanted_until_installed_or_tried(tmp_path: Path) -> None:
    (tmp_path / "usr/share/pam-configs").mkdir(parents=True)     # pam-auth-update's profiles
    assert loginhook.wanted(tmp_path, STATE)
    done = loginhook.install(tmp_path, STATE)                      # a fake root: not enabled
    assert (tmp_path / "usr/share/pam-configs/fwsafe-local").exists(), done
    assert not loginhook.wanted(tmp_path, STATE)                   # tried: not every apply
    assert not loginhook.active(tmp_path, STATE)[0]
    _hook(tmp_path)
    assert loginhook.active(tmp_path, STATE)[0]
    assert loginhook.uninstall(tmp_path)
    assert not (tmp_path / "usr/share/pam-configs/fwsafe-local").exists()


# --------------------------------------------------------------------------------------------
# firewalld: its files only (the runtime model is not on the disk), put back exactly.
def _firewalld(root: Path, zone: str) -> None:
    zones = root / "etc/firewalld/zones"
    zones.mkdir(parents=True, exist_ok=True)
    (root / "etc/firewalld/firewalld.conf").write_text("DefaultZone=public\n")
    (zones / "public.xml").write_text(zone)
    os.chmod(zones / "public.xml", 0o600)


def test_firewalld_files_are_put_back_exactly_and_the_runtime_is_left_to_firewalld(
        tmp_path: Path) -> None:
    from fwsafe.backends.firewalld_layer import FirewalldLayer
    from fwsafe.ondisk.firewalld_files import FILES_ONLY, read_tree, tree_json

    root, state = _host(tmp_path)
    _firewalld(root, "<zone><service name='ssh'/></zone>\n")
    good_tree = read_tree(root)
    # A confirmed state's firewalld layer has the runtime model and the kernel's tables too.
    full = json.dumps({"running": True, "runtime": {"default-zone": "public"},
                       "kernel": {"inet firewalld": "table inet firewalld {\n}\n"},
                       **tree_json(*good_tree)}, sort_keys=True).encode()
    good, _ = known_good.add_entry(state, {"firewalld": full}, {"tx": "t1"})
    layers = powercycle.disk_layers(root)
    assert json.loads(layers["firewalld"])[FILES_ONLY] is True
    assert "runtime" not in json.loads(layers["firewalld"])

    # Unguarded: ssh removed from the zone (firewall-cmd keeps the old file as .old), its mode
    # and owner changed, a new directory with a file.
    _firewalld(root, "<zone/>\n")
    (root / "etc/firewalld/zones/public.xml.old").write_text("<zone><service name='ssh'/>\n")
    os.chown(root / "etc/firewalld/zones/public.xml", 1000, 1000)
    (root / "etc/firewalld/policies").mkdir()
    (root / "etc/firewalld/policies/p.xml").write_text("<policy/>\n")
    found = read_tree(root)
    powercycle.at_boot(state, root=root, now=1000.0)
    _previous_boot(state)
    decision, done = powercycle.at_boot(state, root=root, now=1100.0)
    assert decision.recover, decision.why
    assert done is not None and done["entry"] == good.id
    assert read_tree(root) == good_tree          # byte-identical, modes, owners; no backups
    assert "/etc/firewalld/zones/public.xml" in done["written"]
    assert "/etc/firewalld/policies" in done["written"]

    # The state found is kept, files only: undone by a rollback that leaves the runtime to
    # firewalld (no "running" unit: a rollback never stops or starts it for this layer).
    undo = find_entry(*list_history(state.root), done["undo"])
    assert json.loads(undo.layers["firewalld"])[FILES_ONLY] is True
    units = FirewalldLayer(root).units(undo.layers["firewalld"])
    assert units and all(u.startswith(("file ", "dir ")) for u in units), units
    assert {u.split(" ", 1)[1] for u in units} == set(found[0]) | set(found[1])
    change, _notes = rollback_change(undo)
    assert change.layers["firewalld"] == undo.layers["firewalld"]
