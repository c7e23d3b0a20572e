"""The lockout rules for sshd changes (fwsafe.sshd.access, fwsafe.sshd.lockout): who may log in,
with which method, and which setting to name when nobody could."""

from __future__ import annotations

import os
from pathlib import Path

from fwsafe.sshd.access import (
    Account,
    KeyReport,
    access_problem,
    authorized_keys,
    login_problem,
    method_blockers,
    password_set,
    user_matches,
    wildcard,
)
from fwsafe.sshd.daemon import Effective, listen_ports, parse_effective
from fwsafe.sshd.lockout import blame, confirming_user, served_ports

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxLqS2hzMqWbDSI8o3fzDT0Xxsyf9dsZhuNUUEJ7Y2z a@b"
RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 r@b"
DSA = "ssh-dss AAAAB3NzaC1kc3MAAACBAP d@b"


def _who(tmp_path: Path, name: str = "alice", uid: int = 1000, *, groups: tuple[str, ...] = (),
         password: bool | None = True) -> Account:
    return Account(name, uid, uid, str(tmp_path), frozenset(groups or (name,)), password)


def _values(**values: str) -> Effective:
    base = {"authorizedkeysfile": ".ssh/authorized_keys", "strictmodes": "no",
            "pubkeyauthentication": "yes", "passwordauthentication": "yes",
            "kbdinteractiveauthentication": "no", "usepam": "no",
            "permitrootlogin": "without-password", "authenticationmethods": "any",
            "authorizedkeyscommand": "none"}
    base.update(values)
    return {k: v.split("\n") for k, v in base.items()}


def _keys(tmp_path: Path, *lines: str) -> None:
    (tmp_path / ".ssh").mkdir(exist_ok=True)
    (tmp_path / ".ssh" / "authorized_keys").write_text("\n".join(lines) + "\n")


# -- AllowUsers and friends ------------------------------------------------------------------
def test_patterns_as_sshd_matches_them() -> None:
    assert wildcard("alice", "a*") and wildcard("alice", "al?ce") and not wildcard("alice", "b*")
    assert wildcard("a.b", "a.b") and not wildcard("axb", "a.b")
    assert user_matches("alice@10.0.0.0/8", "alice", "10.1.2.3", None)
    assert not user_matches("alice@10.0.0.0/8", "alice", "192.0.2.1", None)
    assert user_matches("alice@192.0.2.*", "alice", "192.0.2.7", None)
    assert not user_matches("alice@*", "alice", None, None)
    assert user_matches("*", "root", None, None)


def test_allow_and_deny_lists_name_the_setting(tmp_path: Path) -> None:
    root = _who(tmp_path, "root", 0, groups=("root", "adm"))
    assert access_problem(_values(), root, "10.0.0.2", None) is None
    problem = access_problem(_values(allowusers="nobody"), root, "10.0.0.2", None)
    assert problem is not None and problem.message() == \
        "AllowUsers nobody: root is not among them"
    assert access_problem(_values(allowusers="alice\nroot@10.0.0.0/8"), root, "10.0.0.2",
                          None) is None
    denied = access_problem(_values(denyusers="ro*"), root, "10.0.0.2", None)
    assert denied is not None and denied.settings == ("DenyUsers ro*",)
    assert access_problem(_values(denygroups="adm"), root, None, None) is not None
    assert access_problem(_values(allowgroups="wheel sudo"), root, None, None) is not None
    assert access_problem(_values(allowgroups="a*"), root, None, None) is None


# -- keys -----------------------------------------------------------------------------------
def test_authorized_keys_with_options_comments_and_refused_algorithms(tmp_path: Path) -> None:
    who = _who(tmp_path)
    _keys(tmp_path, "# " + ED25519, 'command="echo hi there",no-pty ' + RSA, DSA)
    report = authorized_keys(_values(), who)
    assert [k.family for k in report.keys] == ["RSA"]            # DSA: refused by default
    assert report.refused and "ssh-dss" in report.refused[0]
    listed = _values(pubkeyacceptedalgorithms="ssh-ed25519,rsa-sha2-256,ssh-dss")
    assert [k.family for k in authorized_keys(listed, who).keys] == ["RSA", "DSA"]
    assert authorized_keys(_values(authorizedkeysfile="none"), who).keys == []
    absolute = _values(authorizedkeysfile=f"{tmp_path}/keys/%u")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "alice").write_text(ED25519 + "\n")
    assert [k.family for k in authorized_keys(absolute, who).keys] == ["Ed25519"]


def test_strict_modes_ignores_keys_others_could_write(tmp_path: Path) -> None:
    who = _who(tmp_path, uid=os.getuid())
    _keys(tmp_path, ED25519)
    os.chmod(tmp_path / ".ssh" / "authorized_keys", 0o666)
    report = authorized_keys(_values(strictmodes="yes"), who)
    assert report.keys == [] and report.blocked_by == "StrictModes yes"
    os.chmod(tmp_path / ".ssh" / "authorized_keys", 0o600)
    os.chmod(tmp_path, 0o755)
    assert len(authorized_keys(_values(strictmodes="yes"), who).keys) == 1


# -- methods --------------------------------------------------------------------------------
def test_password_off_without_a_key_is_a_lockout(tmp_path: Path) -> None:
    who = _who(tmp_path)
    values = _values(passwordauthentication="no")
    problem = login_problem(values, who, authorized_keys(values, who))
    assert problem is not None and problem.kind == "methods"
    assert "PasswordAuthentication no" in problem.settings
    assert "no authorized key" in problem.text
    _keys(tmp_path, ED25519)
    assert login_problem(values, who, authorized_keys(values, who)) is None


def test_root_and_permit_root_login(tmp_path: Path) -> None:
    root = _who(tmp_path, "root", 0)
    _keys(tmp_path, ED25519)
    keys = authorized_keys(_values(), root)
    problem = login_problem(_values(permitrootlogin="no"), root, keys)
    assert problem is not None and problem.message() == \
        "PermitRootLogin no: root may not log in at all"
    assert login_problem(_values(permitrootlogin="without-password"), root, keys) is None
    blockers = method_blockers(_values(permitrootlogin="without-password"), root, keys)
    assert blockers["publickey"] is None and blockers["password"] is not None


def test_authentication_methods_one_list_must_work(tmp_path: Path) -> None:
    who = _who(tmp_path)
    _keys(tmp_path, ED25519)
    keys = authorized_keys(_values(), who)
    both = _values(authenticationmethods="publickey,password")
    assert login_problem(both, who, keys) is None
    problem = login_problem(_values(authenticationmethods="publickey,password",
                                    passwordauthentication="no"), who, keys)
    assert problem is not None and problem.settings[0] == \
        "AuthenticationMethods publickey,password"
    two_keys = _values(authenticationmethods="publickey,publickey")
    assert login_problem(two_keys, who, keys) is not None
    assert login_problem(_values(authenticationmethods="gssapi-with-mic publickey"), who,
                         keys) is None
    assert login_problem(_values(authenticationmethods="hostbased"), who, keys) is not None


def test_keys_from_a_command_are_not_taken_for_missing(tmp_path: Path) -> None:
    who = _who(tmp_path, password=False)
    values = _values(passwordauthentication="no", authorizedkeyscommand="/usr/bin/getkeys %u")
    assert login_problem(values, who, authorized_keys(values, who)) is None
    assert login_problem(_values(), who, KeyReport()) is not None  # no password, no key


def test_the_setting_the_change_alters_is_named_first(tmp_path: Path) -> None:
    who = _who(tmp_path, password=True)
    before = _values(passwordauthentication="no")
    after = _values(pubkeyauthentication="no", passwordauthentication="no")
    problem = login_problem(after, who, authorized_keys(after, who))
    assert problem is not None
    assert blame(problem, before, after).settings == ("PubkeyAuthentication no",)


def test_password_from_shadow(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:1:0:99999:7:::\nalice:$6$salt$hash:1::::::\nbob:!$6$x:1::::::\n"
                      "eve::1::::::\n")
    assert password_set("alice", str(shadow)) is True
    assert password_set("root", str(shadow)) is False
    assert password_set("bob", str(shadow)) is False
    assert password_set("eve", str(shadow)) is False
    assert password_set("mallory", str(shadow)) is None
    assert password_set("alice", str(tmp_path / "none")) is None


# -- who, where -----------------------------------------------------------------------------
def test_the_confirming_user() -> None:
    assert confirming_user("carol", {"USER": "root"}) == "carol"
    assert confirming_user(None, {"SUDO_USER": "alice", "USER": "root"}) == "alice"
    assert confirming_user(None, {"USER": "bob"}) == "bob"


def test_where_sshd_listens() -> None:
    values = parse_effective("port 2222\nlistenaddress 10.0.0.1:2222\nlistenaddress [::]:2200\n"
                             "listenaddress 0.0.0.0:2201\n")
    assert listen_ports(values) == {2222, 2200, 2201}
    assert served_ports(values, "10.0.0.1") == [2201, 2222]
    assert served_ports(values, "10.0.0.9") == [2201]
    assert served_ports(values, "fd00::1") == [2200]
