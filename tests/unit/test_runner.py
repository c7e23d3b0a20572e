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
