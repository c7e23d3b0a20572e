"""fwsafe.runner: finding the firewall tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from fwsafe import runner


def test_a_found_tool_is_remembered_while_it_is_there(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "bin" / "fwsafe-test-tool"
    tool.parent.mkdir()
    monkeypatch.setenv("PATH", str(tool.parent))
    assert runner.find_binary(tool.name) is None
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert runner.find_binary(tool.name) == str(tool)   # not found before: looked for again
    tool.unlink()
    assert runner.find_binary(tool.name) is None        # gone: not remembered any more


def test_a_tool_killed_by_a_signal_is_said_so() -> None:
    crashed = runner.run(["sh", "-c", "kill -SEGV $$"])
    said, hint = runner.failure_said(crashed)
    assert said == "killed by SIGSEGV"
    assert hint is not None and "ulimit -Hs" in hint
    spoke = runner.run(["sh", "-c", "echo refused >&2; kill -TERM $$"])
    assert runner.failure_said(spoke) == ("refused (killed by SIGTERM)", None)
    failed = runner.run(["sh", "-c", "echo no such table >&2; exit 1"])
    assert runner.failure_said(failed) == ("no such table", None)
