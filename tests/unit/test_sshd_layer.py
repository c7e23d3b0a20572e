"""The sshd layer without a daemon: its name, its serialised form, capture and revert of files
byte for byte, the change fwsafe plans, and the small parsers of fwsafe.sshd.daemon/ports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fwsafe.backends import compose_partial, layer_for, layer_kind, revert_order
from fwsafe.backends.base import ApplyError
from fwsafe.backends.sshd_layer import SshdLayer, config_path, layer_name
from fwsafe.core.change import Change
from fwsafe.core.neighbours import deleted_neighbours
from fwsafe.errors import InvalidRulesError, UsageError
from fwsafe.ondisk.sshd_files import FileState, SshdFiles, SshdFilesError, dump, load, write_file
from fwsafe.sshd.daemon import config_of
from fwsafe.sshd.ports import listeners, port_conflicts
from fwsafe.sshd.sshd_change import add_to_change, plan_change


def _layout(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-cloud-init.conf").write_text("PasswordAuthentication yes\n")
    main = tmp_path / "sshd_config"
    main.write_text(f"Include {tmp_path}/conf.d/*.conf\nPort 22\n")
    main.chmod(0o600)
    return main


def test_the_name_carries_the_config_file() -> None:
    assert layer_name("/etc/ssh/sshd_config") == "sshd"
    name = layer_name("/tmp/lab x/sshd_config")
    assert name == "sshd:%2Ftmp%2Flab%20x%2Fsshd_config" and "/" not in name
    assert config_path(name) == "/tmp/lab x/sshd_config" and config_path("sshd") == \
        "/etc/ssh/sshd_config"
    for bad in ("sshd:relative", "sshd:%2Fa%2F..%2Fb", "sshdx"):
        with pytest.raises(UsageError):
            config_path(bad)
    layer = layer_for(name)
    assert isinstance(layer, SshdLayer) and layer.config == "/tmp/lab x/sshd_config"
    assert not layer.available()  # never in every firewall snapshot
    assert layer_kind(name) == "sshd" and layer_kind("ipv4") == "ipv4"
    assert revert_order(["ipv4", name, "ufw", "nft"]) == [name, "ufw", "nft", "ipv4"]
    assert compose_partial(name, b"{}", b"x") == b"{}"


def test_serialised_form_round_trips_and_refuses_damage() -> None:
    layer = SshdFiles("/etc/ssh/sshd_config",
                      {"/etc/ssh/sshd_config": FileState(0o600, 0, 0, b"Port 22\n")},
                      {"/etc/ssh/sshd_config.d/00-fwsafe.conf": None})
    assert load(dump(layer)) == layer
    data = json.loads(dump(layer))
    for damage in ({"config": "relative"}, {"files": {"/a/../b": data["files"][
            "/etc/ssh/sshd_config"]}}, {"files": {"/x": {"mode": -1, "uid": 0, "gid": 0,
                                                         "data": ""}}}):
        with pytest.raises(SshdFilesError):
            load(json.dumps({**data, **damage}).encode())
    with pytest.raises(SshdFilesError):
        load(b"not json")


def test_capture_and_revert_put_the_files_back_byte_for_byte(tmp_path: Path) -> None:
    main = _layout(tmp_path)
    layer = SshdLayer(str(main))
    before = layer.capture()
    assert set(layer.units(before)) == {str(main), f"{tmp_path}/conf.d/50-cloud-init.conf"}
    original = main.read_bytes()
    # what an apply does: a new drop-in, the main file changed (mode too)
    write_file(f"{tmp_path}/conf.d/00-fwsafe.conf", FileState(0o644, os.geteuid(),
                                                              os.getegid(), b"Port 2222\n"))
    write_file(str(main), FileState(0o644, os.geteuid(), os.getegid(),
                                    original.replace(b"Port 22", b"# Port 22")))
    after = layer.capture()
    touched = layer.touched(before, after)
    assert touched == sorted([str(main), f"{tmp_path}/conf.d/00-fwsafe.conf"])
    log: list[str] = []
    assert layer.revert(before, after, touched, on_retry=log.append) == []
    assert main.read_bytes() == original and (main.stat().st_mode & 0o777) == 0o600
    assert not (tmp_path / "conf.d" / "00-fwsafe.conf").exists()
    assert any("no running sshd reads" in line for line in log)  # nothing to reload here
    with pytest.raises(ApplyError):
        layer.revert(before, after, ["/etc/passwd"])


def test_the_planned_change_and_a_file_edited_meanwhile(tmp_path: Path) -> None:
    main = _layout(tmp_path)
    sshd = plan_change(str(main), ["PasswordAuthentication=no"])
    dropin = f"{tmp_path}/conf.d/00-fwsafe.conf"
    assert sshd.plan.target == dropin and sshd.content is not None
    assert sshd.describe()[0] == f"sshd: {dropin} (new file, read before the other drop-ins: " \
                                 "its values win)"
    assert "+PasswordAuthentication no" in sshd.diff()
    change = Change(layers={"ipv4": b"*filter\nCOMMIT\n"})
    add_to_change(change, sshd)
    assert list(change.layers) == ["ipv4", layer_name(str(main))]  # sshd last: applied last
    assert change.sources[sshd.layer] == dropin
    blob = load(sshd.content)
    assert blob.base == {dropin: None} and blob.files[dropin].mode == 0o644
    # the file appears before the guard writes: nothing is overwritten
    Path(dropin).write_text("PasswordAuthentication yes\n")
    with pytest.raises(ApplyError, match="changed since fwsafe read it"):
        SshdLayer(str(main)).apply(sshd.content, dropin)
    assert Path(dropin).read_text() == "PasswordAuthentication yes\n"
    assert deleted_neighbours(change.layers, {sshd.layer: sshd.content}, False) == []


def test_symlinks_are_not_written_through(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text("Port 22\n")
    link = tmp_path / "sshd_config"
    link.symlink_to(real)
    with pytest.raises(InvalidRulesError, match="symbolic link"):
        plan_change(str(link), ["Port=2222"])
    with pytest.raises(UsageError):
        plan_change(str(tmp_path / "missing"), ["Port=2222"])


def test_sshd_command_lines() -> None:
    title = "sshd: /usr/sbin/sshd -D -e -f /srv/x/sshd_config [listener] 0 of 10-100 startups"
    assert config_of(title.split(" ")) == "/srv/x/sshd_config"
    assert config_of(["/usr/sbin/sshd", "-D"]) == "/etc/ssh/sshd_config"
    assert config_of(["sshd", "-Df/a"]) == "/a"
    assert config_of(["sshd", "-o", "f=1", "-p", "-f", "-f", "/b"]) == "/b"


def test_ports_taken_by_other_programs(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  " \
             "timeout inode\n"
    (tmp_path / "tcp").write_text(
        header + "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
                 "     0        0 4242 1 0000000000000000 100 0 0 10 0\n"
                 "   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000"
                 "     0        0 4243 1 0000000000000000 100 0 0 10 0\n")
    assert listeners(str(tmp_path)) == [("0.0.0.0", 8080, 4242), ("127.0.0.1", 22, 4243)]
    wanted = {"listenaddress": ["10.0.0.1:8080", "[::]:8080"]}
    assert port_conflicts(wanted, None, str(tmp_path)) == [
        "Port 8080: 0.0.0.0:8080 is already in use by another program, so sshd could not "
        "listen there"]
    assert port_conflicts({"listenaddress": ["10.0.0.1:22"]}, None, str(tmp_path)) == []
