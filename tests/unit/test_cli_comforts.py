"""The comforts of a serious CLI: --quiet and -v on every command, colour only where wanted,
completion of transaction and history ids, a --version that says how fwsafe was installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

import fwsafe.cli as cli
from fwsafe.cli import common
from fwsafe.cli.common import COMMAND_MODULES, COMMAND_TABLE, LazyGroup
from fwsafe.cli.version import install_kind


def fwsafe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fwsafe", *args], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def all_commands() -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    assert isinstance(cli.cli, LazyGroup)
    cli.cli.load_all()
    for name, command in cli.cli.commands.items():
        out.append((name, command))
        if isinstance(command, click.Group):
            out += [(f"{name} {sub}", c) for sub, c in command.commands.items()]
    return out


def test_every_command_has_quiet_and_verbose() -> None:
    for name, command in all_commands():
        opts = {o for p in command.params for o in getattr(p, "opts", [])}
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts, name


def test_version_says_the_install_kind_and_backends() -> None:
    result = fwsafe("--version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fwsafe, version ")
    assert lines[1].startswith("installed: checkout")     # the tests run from the checkout
    assert lines[2].startswith("backends: ") and "iptables" in lines[2] and "nft" in lines[2]


def test_install_kind() -> None:
    assert install_kind(Path("/usr/lib/python3/dist-packages/fwsafe")) == "deb"
    assert install_kind(Path("/nowhere/venv/lib/python3.11/site-packages/fwsafe")).startswith("pip")


def test_quiet_drops_progress_and_vv_traces_commands(tmp_path: Path) -> None:
    empty = tmp_path / "empty.rules"
    empty.write_text("")
    # exit 3 either way; the error line stays with --quiet (errors are never quiet)
    quiet = fwsafe("check", "-q", "--client", "192.0.2.1", str(empty))
    assert quiet.returncode == 3 and "the file is empty" in quiet.stderr
    traced = fwsafe("status", "-vv", "--layers")
    assert traced.returncode == 0, traced.stderr
    assert "fwsafe: run: " in traced.stderr and "save" in traced.stderr
    plain = fwsafe("status", "--layers")
    assert "fwsafe: run:" not in plain.stderr


def test_colour_only_on_terminals_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert common.use_colour(Tty()) is True
    assert common.use_colour(open(os.devnull)) is False      # noqa: SIM115 - not a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    assert common.use_colour(Tty()) is False
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert common.use_colour(Tty()) is False


def test_completion_offers_transaction_and_history_ids(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name in ("20261130T050000Z-aaaa", "20261130T060000Z-bbbb"):
        (state / "tx" / name).mkdir(parents=True)
    (state / "history" / "20261130T050000Z-cccc").mkdir(parents=True)
    (state / "history" / ".lock").touch()
    env = {"_FWSAFE_COMPLETE": "bash_complete", "COMP_WORDS": "fwsafe confirm 2026",
           "COMP_CWORD": "2", "FWSAFE_STATE_DIR": str(state)}
    result = fwsafe(env=env)
    assert "20261130T060000Z-bbbb" in result.stdout and "20261130T050000Z-aaaa" in result.stdout
    env["COMP_WORDS"] = "fwsafe show 2026"
    result = fwsafe(env=env)
    assert "20261130T050000Z-cccc" in result.stdout and ".lock" not in result.stdout


def test_the_lazy_command_table_is_true() -> None:
    """Every module's commands are in COMMAND_TABLE under that module, and nothing else is."""
    import importlib

    found = {}
    for module in COMMAND_MODULES:
        for command in importlib.import_module(f"fwsafe.cli.{module}").COMMANDS:
            found[command.name] = module
    assert found == COMMAND_TABLE


def test_a_command_imports_only_its_own_module() -> None:
    probe = ("import sys; from fwsafe.cli import main; sys.argv=['fwsafe','status','--help'];\n"
             "try: main()\nexcept SystemExit: pass\n"
             "print(sorted(m for m in sys.modules if m.startswith(('fwsafe.audit', 'fwsafe.cli.check'))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
