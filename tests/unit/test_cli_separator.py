"""`fwsafe apply|check|diff -- COMMAND` run a command; without `--` their arguments are rules
files. The command's own click parse says whether a `--` ended the options
(fwsafe.cli.common.SeparatorCommand), not a second look at argv: a `--` that is an option's
value (a file named `--`) is no separator, and nothing else of the command line is read."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fwsafe.cli import cli
from fwsafe.cli.apply import apply
from fwsafe.cli.check import check
from fwsafe.cli.common import AFTER_SEPARATOR, after_separator
from fwsafe.cli.diff import diff


def _parsed(command: click.Command, args: list[str]) -> tuple[click.Context, tuple[str, ...]]:
    """The real command's own parse (no callback runs), and its positional arguments."""
    ctx = command.make_context(command.name or "", list(args))
    return ctx, ctx.params["rules" if command is check else "args"]


@pytest.mark.parametrize(("command", "args", "before", "values"), [
    (apply, ["--", "ufw", "deny", "22/tcp"], 0, ("ufw", "deny", "22/tcp")),
    (apply, ["--timeout", "30", "--", "ufw", "--force", "enable"], 0, ("ufw", "--force", "enable")),
    (check, ["--", "ufw", "deny", "22/tcp"], 0, ("ufw", "deny", "22/tcp")),
    (diff, ["--json", "--", "ufw", "deny", "22/tcp"], 0, ("ufw", "deny", "22/tcp")),
    (diff, ["new.rules", "--", "--json"], 1, ("new.rules", "--json")),
    (apply, ["--rules6", "--", "--", "ufw"], 0, ("ufw",)),      # a value, then the separator
    (apply, ["--"], 0, ()),
])
def test_a_separator_is_seen_by_the_parse(command: click.Command, args: list[str], before: int,
                                           values: tuple[str, ...]) -> None:
    ctx, positional = _parsed(command, args)
    assert after_separator(ctx) and ctx.meta[AFTER_SEPARATOR] == before
    assert positional == values


@pytest.mark.parametrize(("command", "args", "values"), [
    (apply, ["new.rules"], ("new.rules",)),
    (apply, ["--rules6", "--", "new.rules"], ("new.rules",)),   # the IPv6 file is named `--`
    (apply, ["new.rules", "--rules6", "--"], ("new.rules",)),   # ... and comes last
    (check, ["--rules6=--", "new.rules"], ("new.rules",)),
    (diff, ["./--", "--partial"], ("./--",)),
    (check, [], ()),
])
def test_no_separator_means_files(command: click.Command, args: list[str],
                                  values: tuple[str, ...]) -> None:
    ctx, positional = _parsed(command, args)
    assert not after_separator(ctx)
    assert positional == values


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    config = tmp_path / "fwsafe.toml"
    config.write_text("")
    monkeypatch.setenv("FWSAFE_CONFIG", str(config))
    monkeypatch.setenv("FWSAFE_STATE_DIR", str(tmp_path / "state"))
    return CliRunner()


# Each command line below stops at a usage error (exit 2) that only one reading of its
# arguments reaches: nothing is applied.
@pytest.mark.parametrize(("args", "message"), [
    (["apply", "--host", "web1", "--", "ufw", "deny", "22/tcp"],
     "--host takes rules files, not a command"),
    (["apply", "--partial", "--", "ufw", "deny", "22/tcp"],
     "--partial takes rules files, not a command"),
    (["apply", "--sshd-set", "Port=2222", "--", "ufw", "deny", "22/tcp"],
     "--sshd-set takes rules files on this host, not a command or --host"),
    (["apply", "a.rules", "b.rules"], "give one RULES file (IPv4)"),
    # `--` as the value of --rules6: two rules files, not the command `a.rules b.rules`
    (["apply", "--rules6", "--", "a.rules", "b.rules"], "give one RULES file (IPv4)"),
])
def test_apply_reads_its_arguments_as_its_parse_says(runner: CliRunner, args: list[str],
                                                      message: str) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
