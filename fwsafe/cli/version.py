"""`fwsafe --version`: the version, how this copy was installed, and the backends found."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from fwsafe import __version__
from fwsafe.runner import find_binary, run

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # .../fwsafe
TOOLS = (("iptables", ["--version"]), ("nft", ["--version"]), ("ufw", ["--version"]))


def install_kind(package_dir: Path = PACKAGE_DIR) -> str:
    """deb (Debian's python3 dist-packages), checkout (a source tree: pyproject.toml beside
    the package) or pip (a virtualenv, pipx, site-packages)."""
    text = str(package_dir)
    if text.startswith(("/usr/lib/python3/dist-packages/", "/usr/share/fwsafe/")):
        return "deb"
    if (package_dir.parent / "pyproject.toml").is_file():
        return f"checkout ({package_dir.parent})"
    return f"pip ({sys.prefix})"


def backend_versions() -> list[str]:
    found = []
    for tool, args in TOOLS:
        path = find_binary(tool)
        if path is None:
            found.append(f"{tool}: not found")
            continue
        try:
            result = run([path, *args], timeout=5)
        except OSError as exc:
            found.append(f"{tool}: {exc.strerror}")
            continue
        first = (result.stdout or result.stderr).decode(errors="replace").strip().splitlines()
        line = first[0] if first else "?"
        match = re.search(r"v?(\d+(?:\.\d+)+)(.*)", line)
        found.append(f"{tool} {match.group(1)}{match.group(2).rstrip()}" if match else
                     f"{tool}: {line}")
    return found


def show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"fwsafe, version {__version__}")
    click.echo(f"installed: {install_kind()}")
    click.echo("backends: " + "; ".join(backend_versions()))
    ctx.exit()
