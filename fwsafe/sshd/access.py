"""Could this user log in again? The rules sshd applies, on the values it would use for that
user's connection (`sshd -T -C user=..,addr=..`: Match blocks already applied).

* AllowUsers / DenyUsers / AllowGroups / DenyGroups (patterns with `*` and `?`, `USER@HOST`
  with a host pattern or an address/CIDR) let the user in or not;
* PermitRootLogin `no` keeps root out whatever the method;
* a method works: publickey (PubkeyAuthentication, an authorized key sshd accepts: the
  AuthorizedKeysFile read with StrictModes' checks, the key's algorithm in
  PubkeyAcceptedAlgorithms), password (PasswordAuthentication, a password set),
  keyboard-interactive (KbdInteractiveAuthentication with UsePAM, a password set);
* AuthenticationMethods: one of its lists made of working methods only.

Each problem names the settings behind it. What cannot be seen from here (keys from an
AuthorizedKeysCommand, PAM modules other than a password, GSSAPI, host-based) is never taken for
a way in.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from fwsafe.errors import UsageError
from fwsafe.sshd.daemon import Effective

SHADOW = "/etc/shadow"
_KEY = re.compile(r"(?:^|\s)((?:sk-)?(?:ssh|ecdsa)-[a-z0-9-]+(?:@openssh\.com)?)\s+"
                  r"(AAAA[A-Za-z0-9+/]+=*)")
# The algorithms a key of a type is offered with (RSA keys sign with SHA-2 since 7.2).
_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
ROOT_KEY_OK = ("yes", "prohibit-password", "without-password", "forced-commands-only")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    groups: frozenset[str]
    password: bool | None        # a usable password is set; None: cannot tell


@dataclass(frozen=True)
class Key:
    type: str
    path: str
    line: int

    @property
    def family(self) -> str:
        base = self.type.replace("sk-", "").split("@")[0]
        for name, family in (("ed25519", "Ed25519"), ("ssh-rsa", "RSA"), ("ssh-dss", "DSA"),
                             ("ecdsa", "ECDSA")):
            if name in base:
                return family
        return self.type

    @property
    def plain_type(self) -> str:
        """The key's type without a certificate suffix."""
        return self.type.replace("-cert-v01@openssh.com", "")


@dataclass(frozen=True)
class Problem:
    """Why a user could not log in again; `settings` are the lines responsible."""

    kind: str                    # access, root, methods
    settings: tuple[str, ...]
    text: str

    def message(self) -> str:
        named = ", ".join(self.settings)
        return f"{named}: {self.text}" if named else self.text


@dataclass
class KeyReport:
    keys: list[Key] = field(default_factory=list)        # authorized keys sshd would accept
    refused: list[str] = field(default_factory=list)     # keys or files sshd would not take
    files: list[str] = field(default_factory=list)       # the files looked at
    from_command: bool = False   # an AuthorizedKeysCommand may supply keys (not checked)
    blocked_by: str | None = None    # the setting that ignores them all (StrictModes yes)

    def describe_files(self) -> str:
        return ", ".join(self.files) or "none (AuthorizedKeysFile none)"


def account(name: str) -> Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError as exc:
        raise UsageError(f"no such user: {name}") from exc
    groups = {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
    try:
        groups.add(grp.getgrgid(entry.pw_gid).gr_name)
    except KeyError:
        pass
    return Account(name, entry.pw_uid, entry.pw_gid, entry.pw_dir, frozenset(groups),
                   password_set(name))


def password_set(name: str, shadow: str = SHADOW) -> bool | None:
    """Does the account have a password one could log in with? None: cannot tell."""
    try:
        with open(shadow, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.rstrip("\n").split(":")
                if fields[0] == name and len(fields) > 1:
                    value = fields[1]
                    return bool(value) and not value.startswith(("!", "*"))
    except OSError:
        return None
    return None


# -- patterns -----------------------------------------------------------------------------------
def wildcard(text: str, pattern: str) -> bool:
    """sshd's match_pattern: `*` any run, `?` one character, nothing else special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, flags=re.DOTALL) is not None


def host_matches(pattern: str, addr: str | None, host: str | None) -> bool:
    for part in pattern.split(","):
        negate = part.startswith("!")
        part = part[1:] if negate else part
        hit = False
        try:
            if addr is not None:
                hit = ipaddress.ip_address(addr) in ipaddress.ip_network(part, strict=False)
        except ValueError:
            hit = any(value is not None and wildcard(value, part) for value in (addr, host))
        if hit:
            return not negate
    return False


def user_matches(pattern: str, user: str, addr: str | None, host: str | None) -> bool:
    name, at, hostpat = pattern.partition("@")
    if not wildcard(user, name):
        return False
    return not at or host_matches(hostpat, addr, host)


def access_problem(values: Effective, who: Account, addr: str | None,
                   host: str | None) -> Problem | None:
    """AllowUsers, DenyUsers, AllowGroups, DenyGroups, as sshd checks them."""
    def lists(key: str) -> list[str]:
        return [w for v in values.get(key, []) for w in v.split()]

    deny, allow = lists("denyusers"), lists("allowusers")
    hit = [p for p in deny if user_matches(p, who.name, addr, host)]
    if hit:
        return Problem("access", (f"DenyUsers {' '.join(deny)}",),
                       f"{who.name} matches {hit[0]}")
    if allow and not any(user_matches(p, who.name, addr, host) for p in allow):
        return Problem("access", (f"AllowUsers {' '.join(allow)}",),
                       f"{who.name} is not among them")
    deny_groups, allow_groups = lists("denygroups"), lists("allowgroups")
    bad = sorted(g for g in who.groups if any(wildcard(g, p) for p in deny_groups))
    if bad:
        return Problem("access", (f"DenyGroups {' '.join(deny_groups)}",),
                       f"{who.name} is in group {bad[0]}")
    if allow_groups and not any(wildcard(g, p) for g in who.groups for p in allow_groups):
        return Problem("access", (f"AllowGroups {' '.join(allow_groups)}",),
                       f"{who.name} is in none of these groups "
                       f"({', '.join(sorted(who.groups)) or 'no group'})")
    return None


# -- authorized keys ------------------------------------------------------------------------------
def expand_tokens(path: str, who: Account) -> str:
    tokens = {"%": "%", "h": who.home, "u": who.name, "U": str(who.uid)}
    out = re.sub(r"%(.)", lambda m: tokens.get(m.group(1), m.group(0)), path)
    return out if os.path.isabs(out) else os.path.join(who.home, out)


def strict_modes_problem(path: str, who: Account) -> str | None:
    """What StrictModes would object to: the file or a directory above it (up to the home
    directory, or the file's own directory) owned by someone else or writable by others."""
    places = [path]
    parent = os.path.dirname(path)
    home = os.path.realpath(who.home)
    while True:
        places.append(parent)
        if os.path.realpath(parent) in (home, "/") or not parent.startswith(who.home):
            break
        parent = os.path.dirname(parent)
    for place in places:
        try:
            st = os.stat(place)
        except OSError:
            continue
        if st.st_uid not in (0, who.uid):
            return f"{place} is owned by uid {st.st_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
                stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return f"{place} is writable by group or others"
    return None


def accepted(key: Key, values: Effective) -> bool:
    """Is the key's algorithm among PubkeyAcceptedAlgorithms (DSA: refused by default)?"""
    listed = ",".join(values.get("pubkeyacceptedalgorithms", values.get("pubkeyacceptedkeytypes",
                                                                         [])))
    if not listed:
        return key.family != "DSA"
    allowed = set(listed.split(","))
    algorithms = _ALGORITHMS.get(key.plain_type, (key.plain_type,))
    names = {key.type, *algorithms}
    if key.type != key.plain_type:
        names |= {f"{a}-cert-v01@openssh.com" for a in algorithms}
    return any(name in allowed for name in names)


def authorized_keys(values: Effective, who: Account) -> KeyReport:
    """The user's authorized keys that sshd would accept, under `values`."""
    report = KeyReport()
    command = (values.get("authorizedkeyscommand") or ["none"])[0]
    report.from_command = command.lower() != "none"
    words = " ".join(values.get("authorizedkeysfile", [])).split()
    if [w.lower() for w in words] == ["none"]:
        words = []
    strict = (values.get("strictmodes") or ["yes"])[0].lower() == "yes"
    for word in words:
        path = expand_tokens(word, who)
        report.files.append(path)
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        problem = strict_modes_problem(path, who) if strict else None
        for number, line in enumerate(text.splitlines(), 1):
            found = _KEY.search(line)
            if line.lstrip().startswith("#") or not found:
                continue
            key = Key(found.group(1), path, number)
            if problem is not None:
                report.refused.append(f"{path}:{number} ({problem})")
                report.blocked_by = "StrictModes yes"
            elif not accepted(key, values):
                report.refused.append(f"{path}:{number}: {key.type} is not among "
                                      "PubkeyAcceptedAlgorithms")
            else:
                report.keys.append(key)
    return report


# -- methods ------------------------------------------------------------------------------------
def _value(values: Effective, key: str, default: str) -> str:
    found = values.get(key)
    return found[0].lower() if found else default


def method_blockers(values: Effective, who: Account,
                    keys: KeyReport) -> dict[str, tuple[str | None, str] | None]:
    """{method: None if it works, else (the setting behind it or None, why)}."""
    root = who.uid == 0
    permit = _value(values, "permitrootlogin", "prohibit-password")
    out: dict[str, tuple[str | None, str] | None] = {}
    if _value(values, "pubkeyauthentication", "yes") != "yes":
        out["publickey"] = ("PubkeyAuthentication no", "public keys are off")
    elif root and permit not in ROOT_KEY_OK:
        out["publickey"] = (f"PermitRootLogin {permit}", "root may not log in")
    elif keys.keys or keys.from_command:
        out["publickey"] = None
    elif keys.blocked_by:
        out["publickey"] = (keys.blocked_by, "sshd ignores " + "; ".join(keys.refused[:2]))
    else:
        out["publickey"] = (None, f"{who.name} has no authorized key sshd accepts (read "
                                  f"{keys.describe_files()})")
    no_password = (None, f"{who.name} has no password") if who.password is False else None
    if _value(values, "passwordauthentication", "yes") != "yes":
        out["password"] = ("PasswordAuthentication no", "passwords are off")
    elif root and permit != "yes":
        out["password"] = (f"PermitRootLogin {permit}", "root may not use a password")
    else:
        out["password"] = no_password
    if _value(values, "kbdinteractiveauthentication", "yes") != "yes":
        out["keyboard-interactive"] = ("KbdInteractiveAuthentication no", "it is off")
    elif _value(values, "usepam", "no") != "yes":
        out["keyboard-interactive"] = ("UsePAM no", "nothing answers it without PAM")
    elif root and permit != "yes":
        out["keyboard-interactive"] = (f"PermitRootLogin {permit}", "root may not use it")
    else:
        out["keyboard-interactive"] = no_password
    return out


def _satisfiable(chain: str, blockers: dict[str, tuple[str | None, str] | None],
                 keys: KeyReport) -> tuple[str | None, str] | None:
    """None when every method of a comma-separated AuthenticationMethods list works."""
    wanted = chain.split(",")
    for method in wanted:
        base = method.split(":")[0]
        if base not in blockers:
            return (None, f"{method} is not something fwsafe can check")
        if blockers[base] is not None:
            return blockers[base]
    if wanted.count("publickey") > max(1, len(keys.keys)) and not keys.from_command:
        return (None, f"it needs {wanted.count('publickey')} different keys")
    return None


def login_problem(values: Effective, who: Account, keys: KeyReport) -> Problem | None:
    """Could `who` authenticate under `values`? (PermitRootLogin, the methods,
    AuthenticationMethods.)"""
    permit = _value(values, "permitrootlogin", "prohibit-password")
    if who.uid == 0 and permit == "no":
        return Problem("root", ("PermitRootLogin no",), "root may not log in at all")
    blockers = method_blockers(values, who, keys)
    methods = " ".join(values.get("authenticationmethods", ["any"])).split()
    if not methods or methods == ["any"]:
        if any(blocker is None for blocker in blockers.values()):
            return None
        reasons: Sequence[tuple[str, tuple[str | None, str] | None]] = list(blockers.items())
        return _problem((), reasons, f"{who.name} could not log in again")
    chains = [(chain, _satisfiable(chain, blockers, keys)) for chain in methods]
    if any(why is None for _, why in chains):
        return None
    return _problem((f"AuthenticationMethods {' '.join(methods)}",), chains,
                    f"{who.name} could satisfy none of its lists")


def _problem(named: tuple[str, ...], reasons: Sequence[tuple[str, tuple[str | None, str] | None]],
             text: str) -> Problem:
    settings = list(named)
    parts = []
    for what, why in reasons:
        if why is None:
            continue
        setting, detail = why
        if setting and setting not in settings:
            settings.append(setting)
        parts.append(f"{what}: {setting + ' (' + detail + ')' if setting else detail}")
    return Problem("methods", tuple(settings), f"{text}: " + "; ".join(parts))
