"""sshd_config read as sshd reads it, and changed so that the new values win (fwsafe.sshd.sshd_config,
fwsafe.sshd.edit): Includes, Match blocks, the drop-in, the lines commented out."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwsafe.errors import UsageError
from fwsafe.sshd.edit import DROPIN_STEM, Plan, dropin_path, parse_settings, plan_settings
from fwsafe.sshd.sshd_config import Tree, pattern_matches, read_tree


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _debian(tmp_path: Path, main_rest: str = "", **dropins: str) -> Path:
    """A Debian-like layout: the Include of the drop-in directory at the top."""
    for name, text in dropins.items():
        _write(tmp_path / "sshd_config.d" / f"{name}.conf", text)
    (tmp_path / "sshd_config.d").mkdir(exist_ok=True)
    return _write(tmp_path / "sshd_config",
                  f"# the top\nInclude {tmp_path}/sshd_config.d/*.conf\n{main_rest}")


def _after(main: Path, plan: Plan) -> Tree:
    """The configuration as sshd would read it once the plan is written."""
    return read_tree(str(main), dict(plan.files))


def _plan(main: Path, *items: str) -> Plan:
    return plan_settings(read_tree(str(main)), parse_settings(items))


# -- reading ---------------------------------------------------------------------------------
def test_includes_are_read_in_place_sorted_and_first_value_wins(tmp_path: Path) -> None:
    main = _debian(tmp_path, "PasswordAuthentication yes\nPort 22\n",
                   **{"50-cloud-init": "PasswordAuthentication no\n", "10-a": "Port 2200\n"})
    tree = read_tree(str(main))
    assert [d.text() for d in tree.global_directives()] == [
        "Port 2200", "PasswordAuthentication no", "PasswordAuthentication yes", "Port 22"]
    assert tree.value("passwordauthentication") == "no"
    assert list(tree.files) == [str(main), f"{tmp_path}/sshd_config.d/10-a.conf",
                                f"{tmp_path}/sshd_config.d/50-cloud-init.conf"]


def test_a_match_in_an_included_file_ends_with_that_file(tmp_path: Path) -> None:
    inc = _write(tmp_path / "inc.conf", "Match User bob\n  PasswordAuthentication yes\n")
    main = _write(tmp_path / "main", f"Include {inc}\nPermitRootLogin no\nMatch Address 10.0.0.0/8\n"
                                     "  X11Forwarding yes\n")
    tree = read_tree(str(main))
    assert [d.text() for d in tree.global_directives()] == ["PermitRootLogin no"]
    assert sorted(tree.matches.values()) == ["Address 10.0.0.0/8", "User bob"]
    flat = tree.flatten()
    assert flat.text.splitlines() == ["PermitRootLogin no", "Match User bob",
                                      "PasswordAuthentication yes", "Match Address 10.0.0.0/8",
                                      "X11Forwarding yes"]
    assert flat.origins[0] == (str(main), 2)
    assert flat.explain("/tmp/x/flat line 3: Bad configuration option", "/tmp/x/flat") == \
        f"{inc} line 2: Bad configuration option"


def test_relative_include_is_under_the_ssh_directory_and_overlay_counts(tmp_path: Path) -> None:
    _write(tmp_path / "etc-ssh" / "conf.d" / "a.conf", "Port 1\n")
    main = _write(tmp_path / "main", "Include conf.d/*.conf\n")
    tree = read_tree(str(main), sshdir=str(tmp_path / "etc-ssh"))
    assert tree.value("port") == "1"
    new = f"{tmp_path}/etc-ssh/conf.d/0.conf"
    gone = f"{tmp_path}/etc-ssh/conf.d/a.conf"
    tree = read_tree(str(main), {new: b"Port 2\n", gone: None}, sshdir=str(tmp_path / "etc-ssh"))
    assert [d.value for d in tree.global_directives("port")] == ["2"]


def test_glob_matching_as_sshd_does() -> None:
    assert pattern_matches("/etc/ssh/sshd_config.d/*.conf", "/etc/ssh/sshd_config.d/00-x.conf")
    assert not pattern_matches("/etc/ssh/sshd_config.d/*.conf", "/etc/ssh/sshd_config.d/.x.conf")
    assert not pattern_matches("/etc/ssh/sshd_config.d/*.conf", "/etc/ssh/sshd_config.d/a/b.conf")
    assert not pattern_matches("/etc/ssh/*.conf", "/etc/ssh/x.cfg")


def test_a_missing_main_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_tree(str(tmp_path / "nope"))


# -- settings -------------------------------------------------------------------------------
def test_settings_parse_and_refuse_what_sshd_would_not_take() -> None:
    settings = parse_settings(["PasswordAuthentication=no", "Port=22", "Port=2222",
                               "AllowUsers=alice bob"])
    assert [(s.name, s.values) for s in settings] == [
        ("PasswordAuthentication", ("no",)), ("Port", ("22", "2222")),
        ("AllowUsers", ("alice bob",))]
    for bad in (["PermitRootLogin=no", "PermitRootLogin=yes"], ["Include=/x"],
                ["Match=User x"], ["=no"], ["Port="], ["Bad Key=1"]):
        with pytest.raises(UsageError):
            parse_settings(bad)


# -- the drop-in ------------------------------------------------------------------------------
def test_debian_layout_gets_a_drop_in_read_first(tmp_path: Path) -> None:
    main = _debian(tmp_path, "KbdInteractiveAuthentication yes\nUsePAM yes\n",
                   **{"50-cloud-init": "PasswordAuthentication yes\n"})
    before = main.read_bytes()
    plan = _plan(main, "PasswordAuthentication=no", "KbdInteractiveAuthentication=no")
    dropin = f"{tmp_path}/sshd_config.d/{DROPIN_STEM}.conf"
    assert dropin_path(read_tree(str(main))) == dropin
    assert plan.target == dropin and plan.created == [dropin]
    assert list(plan.files) == [dropin]          # nothing else needs to change
    assert main.read_bytes() == before           # a plan writes nothing
    after = _after(main, plan)
    assert after.value("passwordauthentication") == "no"
    assert after.value("kbdinteractiveauthentication") == "no"
    assert b"PasswordAuthentication no\nKbdInteractiveAuthentication no\n" in plan.files[dropin]


def test_a_value_read_before_the_drop_in_is_commented_out(tmp_path: Path) -> None:
    main = _write(tmp_path / "sshd_config", f"PermitRootLogin yes\nInclude {tmp_path}/d/*.conf\n")
    _write(tmp_path / "d" / "0-early.conf", "PermitRootLogin yes\nX11Forwarding no\n")
    plan = _plan(main, "PermitRootLogin=prohibit-password")
    after = _after(main, plan)
    assert after.value("permitrootlogin") == "prohibit-password"
    assert set(plan.files) == {str(main), f"{tmp_path}/d/0-early.conf",
                               f"{tmp_path}/d/00-fwsafe.conf"}
    assert plan.files[str(main)].startswith(b"# PermitRootLogin yes  # fwsafe: superseded by ")
    assert b"X11Forwarding no" in plan.files[f"{tmp_path}/d/0-early.conf"]
    assert plan.notes


def test_lines_that_add_up_are_replaced_everywhere(tmp_path: Path) -> None:
    main = _debian(tmp_path, "Port 22\nSubsystem sftp /usr/lib/sftp-server\nSubsystem x /bin/x\n",
                   **{"10-more": "Port 2200\n"})
    plan = _plan(main, "Port=2222", "Port=2223", "Subsystem=sftp internal-sftp")
    after = _after(main, plan)
    assert [d.value for d in after.global_directives("port")] == ["2222", "2223"]
    assert [d.value for d in after.global_directives("subsystem")] == [
        "sftp internal-sftp", "x /bin/x"]


def test_an_existing_drop_in_is_updated_in_place(tmp_path: Path) -> None:
    main = _debian(tmp_path, **{DROPIN_STEM: "# ours\nPasswordAuthentication no\nPort 2222\n"})
    plan = _plan(main, "Port=22")
    assert plan.created == []
    assert list(plan.files.values()) == [b"# ours\nPasswordAuthentication no\nPort 22\n"]


def test_without_an_include_the_main_file_is_edited(tmp_path: Path) -> None:
    main = _write(tmp_path / "sshd_config",
                  "# comment\nPort 22\nPasswordAuthentication yes\nUsePAM yes\r\n")
    plan = _plan(main, "PasswordAuthentication=no", "MaxAuthTries=3", "Port=2222")
    assert list(plan.files) == [str(main)] and plan.target == str(main)
    assert plan.files[str(main)] == (b"# comment\nMaxAuthTries 3\nPort 2222\n"
                                     b"PasswordAuthentication no\nUsePAM yes\r\n")


def test_main_file_edit_goes_on_top_when_an_include_is_read_first(tmp_path: Path) -> None:
    inc = _write(tmp_path / "inc.conf", "PasswordAuthentication yes\n")
    main = _write(tmp_path / "sshd_config", f"Include {inc}\nPasswordAuthentication yes\n")
    plan = _plan(main, "PasswordAuthentication=no")  # the Include is of a file, not a directory
    assert plan.target == str(main)
    assert _after(main, plan).value("passwordauthentication") == "no"
    assert plan.files[str(main)].startswith(b"PasswordAuthentication no\nInclude ")


def test_settings_already_in_force_change_nothing(tmp_path: Path) -> None:
    main = _debian(tmp_path, "PasswordAuthentication no\nPort 22\n")
    plan = _plan(main, "PasswordAuthentication=no", "Port=22")
    assert plan.files == {} and plan.unchanged == ["PasswordAuthentication=no", "Port=22"]


def test_match_blocks_are_left_alone(tmp_path: Path) -> None:
    main = _write(tmp_path / "sshd_config", "Port 22\nMatch User bob\n  PasswordAuthentication yes\n")
    plan = _plan(main, "PasswordAuthentication=no")
    after = _after(main, plan)
    assert after.value("passwordauthentication") == "no"
    assert [d.text() for d in after.directives if d.block] == ["PasswordAuthentication yes"]


def test_bytes_of_other_lines_are_kept(tmp_path: Path) -> None:
    main = tmp_path / "sshd_config"
    main.write_bytes(b"Banner /etc/b\xe9\nPort 22\nPermitRootLogin yes")  # no final newline
    _write(tmp_path / "inc.conf", "X11Forwarding no")
    plan = _plan(main, "Port=2222")
    assert plan.files[str(main)] == b"Banner /etc/b\xe9\nPort 2222\nPermitRootLogin yes\n"
    main.write_bytes(b"Port 22\nInclude " + str(tmp_path).encode() + b"/*.conf\nBanner \xe9\n"
                     b"Port 23")
    plan = _plan(main, "Port=2222")   # a drop-in: the main file's lines are commented out
    assert plan.files[str(main)].endswith(b"Banner \xe9\n# Port 23  # fwsafe: superseded by "
                                          + str(tmp_path).encode() + b"/00-fwsafe.conf\n")
    assert f"{tmp_path}/inc.conf" not in plan.files   # untouched, newline or not
