"""Every command that changes the firewall under the guard takes what the config decides from
it (fwsafe.cli.common.apply_options): `fwsafe sshd set` and `fwsafe rollback` once built their
options by hand and ignored `hatch`, `hatch_grace`, `admin_sources`, `stuck_grace` (and
rollback `boot_hook`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fwsafe.cli.common import apply_options
from fwsafe.core.config import load_config

CLI = Path(__file__).resolve().parents[2] / "fwsafe" / "cli"


def test_the_config_reaches_the_options(tmp_path: Path) -> None:
    path = tmp_path / "fwsafe.toml"
    path.write_text('timeout = 90\nboot_hook = false\nhatch = false\nhatch_grace = 7\n'
                    'stuck_grace = 11\nadmin_sources = ["192.0.2.7", "2001:db8::7"]\n'
                    'max_timeout = 7200\nprobes = ["tcp://192.0.2.9:443"]\nprobe_failures = 5\n')
    config = load_config(str(path), env={})
    options = apply_options(config, None, force=True)
    assert options.timeout_s == 90 and options.max_timeout == 7200
    assert options.boot_hook is False and options.hatch is False
    assert options.hatch_grace == 7 and options.stuck_grace == 11
    assert list(options.admin_sources) == ["192.0.2.7/32", "2001:db8::7/128"]
    assert options.config_path == str(path) and options.force is True
    assert options.probes == ["tcp://192.0.2.9:443"] and options.probe_failures == 5
    assert apply_options(config, "30").timeout_s == 30
    assert apply_options(config, None, probes=["tcp://192.0.2.1:80"]).probes == \
        ["tcp://192.0.2.1:80"]                       # the command's own option wins


@pytest.mark.parametrize("module", sorted(p.name for p in CLI.glob("*.py")))
def test_no_command_builds_its_options_by_hand(module: str) -> None:
    if module == "common.py":
        return
    tree = ast.parse((CLI / module).read_text())
    built = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == "ApplyOptions"]
    assert built == [], f"fwsafe/cli/{module} builds ApplyOptions at lines {built}: " \
                        "use fwsafe.cli.common.apply_options"
