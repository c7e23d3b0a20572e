"""Tests for fwsafe.core.config: loading, validation errors, resolution order, resolve_host."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwsafe.core import config as config_module  # noqa: E402
from fwsafe.core.config import (  # noqa: E402
    Config,
    HostTarget,
    load_config,
)
from fwsafe.core.config_checks import HostConfig  # noqa: E402
from fwsafe.errors import ConfigError, ExitCode, UsageError  # noqa: E402

EXAMPLE = ROOT / "examples" / "fwsafe.toml"


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read the real /etc/fwsafe/fwsafe.toml from a test."""
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))


def write(tmp_path: Path, text: str, name: str = "fwsafe.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text), env={})


def config_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message.startswith(path)  # every message names the file
    assert info.value.exit_code == ExitCode.USAGE
    return info.value


# --------------------------------------------------------------------------------------------
# The example and the defaults
# --------------------------------------------------------------------------------------------


def test_example_loads() -> None:
    config = load_config(str(EXAMPLE), env={})
    assert config.source == str(EXAMPLE)
    assert config.timeout == 60
    assert config.state_dir == "/var/lib/fwsafe"
    assert config.probe_interval == 2.0
    assert config.probe_failures == 3
    assert config.probe_timeout == 3.0
    assert config.probes == ("tcp://127.0.0.1:22", "ssh://127.0.0.1:22")
    assert [p.kind for p in config.parsed_probes()] == ["tcp", "ssh"]
    assert config.history_keep == 50
    assert config.persist == "auto"
    assert config.hosts["web1"] == HostConfig(
        name="web1",
        host="203.0.113.10",
        user="root",
        port=22,
        key="~/.ssh/id_ed25519",
        known_hosts="~/.ssh/known_hosts",
    )
    assert config.hosts["db1"].host == "2001:db8::10"
    assert config.hosts["db1"].port == 2222


def test_example_covers_every_key() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    data = tomllib.loads(EXAMPLE.read_text())
    top = {
        "timeout",
        "state_dir",
        "probe_interval",
        "probe_failures",
        "probe_timeout",
        "probes",
        "history_keep",
        "persist",
        "max_timeout",
        "max_rules_bytes",
        "boot_hook",
        "reboot_recovery",
        "reboot_recovery_window",
        "expected_open",
        "stuck_grace",
        "hatch",
        "hatch_grace",
        "admin_sources",
        "hosts",
    }
    assert set(data) == top
    assert set(data["hosts"]["web1"]) == {"host", "user", "port", "key", "known_hosts"}


def test_defaults_match_example_values() -> None:
    config = Config()
    example = load_config(str(EXAMPLE), env={})
    for name in (
        "timeout",
        "state_dir",
        "probe_interval",
        "probe_failures",
        "probe_timeout",
        "history_keep",
        "persist",
        "max_timeout",
        "max_rules_bytes",
        "expected_open",
        "stuck_grace",
        "hatch",
        "hatch_grace",
        "reboot_recovery",
        "reboot_recovery_window",
    ):
        assert getattr(config, name) == getattr(example, name), name
    assert config.admin_sources == () and example.admin_sources != ()
    assert config.probes == ()
    assert config.hosts == {}
    assert config.source is None


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "# nothing\n")
    assert config == Config(source=config.source)


def test_values_are_read(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
timeout = 120
state_dir = "/tmp/fwsafe-state/"
probe_interval = 1          # an int is fine where a number is expected
probe_failures = 1
probe_timeout = 0.5
probes = ["tcp://[fd00::1]:22", "cmd:true"]
history_keep = 5
persist = "none"
""",
    )
    assert config.timeout == 120
    assert config.state_dir == "/tmp/fwsafe-state"
    assert config.probe_interval == 1.0 and isinstance(config.probe_interval, float)
    assert config.probe_failures == 1
    assert config.probe_timeout == 0.5
    assert config.probes == ("tcp://[fd00::1]:22", "cmd:true")
    assert config.history_keep == 5
    assert config.persist == "none"


def test_state_dir_tilde_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/op")
    config = load_text(tmp_path, 'state_dir = "~/fwsafe"\n')
    assert config.state_dir == "/home/op/fwsafe"


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.timeout = 5  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    error = config_error(tmp_path, "probe_intervall = 2.0\n")
    assert "unknown key 'probe_intervall'" in error.message
    assert "did you mean 'probe_interval'?" in error.message
    assert error.hint is not None and "probe_interval" in error.hint


def test_unknown_host_key_suggests(tmp_path: Path) -> None:
    error = config_error(tmp_path, '[hosts.web1]\nhost = "10.0.0.1"\nprot = 22\n')
    assert "unknown key 'hosts.web1.prot'" in error.message
    assert "did you mean 'port'?" in error.message


def test_unknown_table_suggests(tmp_path: Path) -> None:
    error = config_error(tmp_path, '[host.web1]\nhost = "10.0.0.1"\n')
    assert "unknown key 'host'" in error.message
    assert "did you mean 'hosts'?" in error.message


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    error = config_error(tmp_path, "zzzzzz = 1\n")
    assert "unknown key 'zzzzzz'" in error.message
    assert "did you mean" not in error.message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('timeout = "60"\n', ["timeout", "expected an integer", "a string ('60')"]),
        ("timeout = 60.5\n", ["timeout", "expected an integer", "a float (60.5)"]),
        ("timeout = true\n", ["timeout", "expected an integer", "a boolean (true)"]),
        ("timeout = 0\n", ["timeout", "must be >= 1"]),
        ("timeout = -5\n", ["timeout", "must be >= 1"]),
        ("probe_interval = 0\n", ["probe_interval", "positive"]),
        ("probe_interval = false\n", ["probe_interval", "expected a number"]),
        ("probe_timeout = nan\n", ["probe_timeout", "positive"]),
        ("probe_timeout = inf\n", ["probe_timeout", "positive"]),
        ("probe_failures = 0\n", ["probe_failures", ">= 1"]),
        ("probe_failures = 2.0\n", ["probe_failures", "expected an integer"]),
        ("history_keep = true\n", ["history_keep", "expected an integer"]),
        ("state_dir = 5\n", ["state_dir", "expected a string"]),
        ('state_dir = "relative/dir"\n', ["state_dir", "absolute path"]),
        ('state_dir = ""\n', ["state_dir", "must not be empty"]),
        ('probes = "tcp://127.0.0.1:22"\n', ["probes", "expected an array"]),
        ("probes = [22]\n", ["probes[0]", "expected a probe URL string"]),
        ('probes = ["cmd:true", "tcp://127.0.0.1"]\n', ["probes[1]", "port is required"]),
        ('persist = "iptables"\n', ["persist", "unknown value 'iptables'"]),
        ('persist = "nftable"\n', ["persist", "did you mean 'nftables'?"]),
        ("hosts = 5\n", ["hosts", "expected a table"]),
        ('[hosts]\nweb1 = "10.0.0.1"\n', ["hosts.web1", "expected a table"]),
        ('[hosts.web1]\nuser = "root"\n', ["hosts.web1.host", "missing"]),
        ('[hosts.web1]\nhost = "10.0.0.1"\nport = "22"\n', ["hosts.web1.port", "integer"]),
        ('[hosts.web1]\nhost = "10.0.0.1"\nport = true\n', ["hosts.web1.port", "integer"]),
        ('[hosts.web1]\nhost = "10.0.0.1"\nport = 70000\n', ["hosts.web1.port", "range"]),
        ('[hosts.web1]\nhost = "10.0.0.1:22"\n', ["hosts.web1.host", "host name"]),
        ('[hosts.web1]\nhost = "root@10.0.0.1"\n', ["hosts.web1.host", "host name"]),
        ('[hosts.web1]\nhost = "fd00::zz"\n', ["hosts.web1.host", "IPv6"]),
        ('[hosts.web1]\nhost = "10.0.0.1"\nuser = "a b"\n', ["hosts.web1.user", "user name"]),
        ('[hosts.web1]\nhost = "10.0.0.1"\nkey = 1\n', ["hosts.web1.key", "a string"]),
        ('[hosts."we b"]\nhost = "10.0.0.1"\n', ["hosts.we b", "invalid host name"]),
    ],
)
def test_wrong_values(tmp_path: Path, text: str, fragments: list[str]) -> None:
    error = config_error(tmp_path, text)
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)


def test_probe_error_keeps_the_hint(tmp_path: Path) -> None:
    error = config_error(tmp_path, 'probes = ["tcp://10.0.0.1"]\n')
    assert error.hint == "write tcp://HOST:PORT"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'timeout = 60\nstate_dir = "/var/lib/fwsafe"\nprobes = [\n  oops\n]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message.startswith(f"{path}:4: invalid TOML: ")
    assert "column" in info.value.message


def test_toml_duplicate_key_error(tmp_path: Path) -> None:
    path = write(tmp_path, "timeout = 1\ntimeout = 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message.startswith(f"{path}:2: invalid TOML")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "fwsafe.toml"
    path.write_bytes(b'state_dir = "/var/\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert str(path) in info.value.message


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path), env={})


# --------------------------------------------------------------------------------------------
# Which file is read
# --------------------------------------------------------------------------------------------


def test_explicit_path_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert missing in info.value.message and "not found" in info.value.message


def test_explicit_path_beats_env(tmp_path: Path) -> None:
    explicit = write(tmp_path, "timeout = 11\n", "a.toml")
    from_env = write(tmp_path, "timeout = 22\n", "b.toml")
    config = load_config(explicit, env={"FWSAFE_CONFIG": from_env})
    assert config.timeout == 11 and config.source == explicit


def test_env_var_used(tmp_path: Path) -> None:
    from_env = write(tmp_path, "timeout = 22\n", "b.toml")
    config = load_config(None, env={"FWSAFE_CONFIG": from_env})
    assert config.timeout == 22 and config.source == from_env


def test_env_var_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"FWSAFE_CONFIG": missing})
    assert missing in info.value.message and "FWSAFE_CONFIG" in info.value.message


def test_env_var_beats_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path, "timeout = 33\n", "default.toml")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    from_env = write(tmp_path, "timeout = 22\n", "b.toml")
    assert load_config(None, env={"FWSAFE_CONFIG": from_env}).timeout == 22
    # An empty variable counts as unset.
    assert load_config(None, env={"FWSAFE_CONFIG": ""}).timeout == 33


def test_default_file_used_if_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path, "timeout = 33\n", "default.toml")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    config = load_config(None, env={})
    assert config.timeout == 33 and config.source == default


def test_defaults_when_nothing_exists() -> None:
    assert load_config(None, env={}) == Config()


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = write(tmp_path, "timeout = 44\n")
    monkeypatch.setenv("FWSAFE_CONFIG", from_env)
    assert load_config(None).timeout == 44


# --------------------------------------------------------------------------------------------
# resolve_host
# --------------------------------------------------------------------------------------------


@pytest.fixture
def hosts_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("HOME", "/home/op")
    return load_text(
        tmp_path,
        """
[hosts.web1]
host = "203.0.113.10"
user = "admin"
port = 2222
key = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"

[hosts.v6]
host = "[fd00::5]"

[hosts.plain]
host = "plain.example"
""",
    )


def test_resolve_named_host(hosts_config: Config) -> None:
    target = hosts_config.resolve_host("web1")
    assert target == HostTarget(
        host="203.0.113.10",
        port=2222,
        user="admin",
        key="/home/op/.ssh/id_ed25519",
        known_hosts="/home/op/.ssh/known_hosts",
        name="web1",
    )
    assert str(target) == "admin@203.0.113.10:2222"
    assert target.probe_url() == "ssh-auth://admin@203.0.113.10:2222"
    assert target.probe_url("tcp") == "tcp://203.0.113.10:2222"


def test_resolve_named_host_defaults(hosts_config: Config) -> None:
    target = hosts_config.resolve_host("plain")
    assert (target.user, target.host, target.port, target.key, target.known_hosts) == (
        "root",
        "plain.example",
        22,
        None,
        None,
    )
    v6 = hosts_config.resolve_host("v6")
    assert v6.host == "fd00::5"
    assert v6.hostport == "[fd00::5]:22"
    assert v6.probe_url("ssh") == "ssh://root@[fd00::5]:22"


@pytest.mark.parametrize(
    ("spec", "user", "host", "port"),
    [
        ("10.0.0.1", "root", "10.0.0.1", 22),
        ("admin@10.0.0.1", "admin", "10.0.0.1", 22),
        ("10.0.0.1:2222", "root", "10.0.0.1", 2222),
        ("admin@server.example:2222", "admin", "server.example", 2222),
        ("[fd00::1]", "root", "fd00::1", 22),
        ("root@[fd00::1]:2222", "root", "fd00::1", 2222),
        ("other-host", "root", "other-host", 22),
    ],
)
def test_resolve_adhoc(hosts_config: Config, spec: str, user: str, host: str, port: int) -> None:
    target = hosts_config.resolve_host(spec)
    assert (target.user, target.host, target.port) == (user, host, port)
    assert target.key is None and target.known_hosts is None and target.name is None


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("fd00::1", "brackets"),
        ("root@", "empty host"),
        ("@host", "empty user"),
        ("host:0", "out of range"),
        ("host:ssh", "invalid port"),
        ("[fd00::1", "missing ']'"),
        ("", "empty host"),
    ],
)
def test_resolve_bad_specs(hosts_config: Config, spec: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        hosts_config.resolve_host(spec)
    assert not isinstance(info.value, ConfigError)
    assert why in info.value.message
    assert repr(spec) in info.value.message


def test_resolve_bad_spec_suggests_configured_host(hosts_config: Config) -> None:
    with pytest.raises(UsageError) as info:
        hosts_config.resolve_host("web1:")
    assert info.value.hint == "did you mean the configured host 'web1'?"


def test_resolve_without_config() -> None:
    target = Config().resolve_host("root@[::1]:22")
    assert (target.user, target.host, target.port) == ("root", "::1", 22)


def test_load_config_does_not_touch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file called fwsafe.toml in the current directory is not picked up implicitly.
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "timeout = 99\n")
    assert load_config(None, env={}).timeout == 60
    assert os.getcwd() == str(tmp_path)


def test_guard_and_hatch_settings(tmp_path: Path) -> None:
    config = load_text(tmp_path, 'stuck_grace = 1.5\nhatch = false\nhatch_grace = 4\n'
                                 'admin_sources = ["10.0.0.7", "2001:db8::/64", "10.1.2.3/24"]\n')
    assert (config.stuck_grace, config.hatch, config.hatch_grace) == (1.5, False, 4.0)
    assert config.admin_sources == ("10.0.0.7/32", "2001:db8::/64", "10.1.2.0/24")
    assert Config().hatch is True and Config().stuck_grace == 5 and Config().hatch_grace == 30


@pytest.mark.parametrize("text,error", [
    ('admin_sources = ["not-an-address"]', "admin_sources[0]: 'not-an-address' is not an IP"),
    ('admin_sources = "10.0.0.1"', "admin_sources: expected an array"),
    ("stuck_grace = 0", "stuck_grace: must be a positive number"),
    ("hatch_grace = -1", "hatch_grace: must be a positive number"),
    ('hatch = "yes"', "hatch: expected a boolean"),
])
def test_guard_and_hatch_settings_are_checked(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_text(tmp_path, text + "\n")
