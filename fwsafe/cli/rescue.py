"""`fwsafe rescue` (the rescue tool, also a zipapp) and `fwsafe install-boot-hook`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fwsafe.core.statedir import resolve_state_dir
from fwsafe.errors import EnvironmentProblem
from fwsafe.persistence import boothook


@click.command(
    "rescue", add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def rescue(args: tuple[str, ...]) -> None:
    """Offline, from a rescue system: put the firewall files on a server's mounted disk back to
    a known-good state (--to ID, --last-good) or turn the firewall off at boot
    (--disable-firewall). `fwsafe rescue --help` lists the options. The same tool runs with
    nothing but python3 as `python3 fwsafe.pyz rescue ...` (see docs/rescue.md)."""
    # loaded by the command that uses it only: every other command (and --help) starts faster
    from fwsafe.rescue.tool import main

    sys.exit(main(["rescue", *args]))


@click.command("install-boot-hook")
@click.option("--root", "root_dir", default="/", show_default=True, metavar="DIR",
              help="Install into this root file system (for images and tests).")
@click.option("--uninstall", is_flag=True, help="Disable and remove the unit again.")
@click.option("--state-dir", help="State directory that `fwsafe recover` uses at boot "
                                  "(default: $FWSAFE_STATE_DIR, else /var/lib/fwsafe).")
@click.option("--no-zipapp", is_flag=True, help="Do not put the rescue zipapp on the disk.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def install_boot_hook(root_dir: str, uninstall: bool, state_dir: str | None,
                      no_zipapp: bool, as_json: bool) -> None:
    """Run `fwsafe recover` early at every boot (systemd unit fwsafe-recover.service, before
    the network and before netfilter-persistent, ufw and nftables load their files), so that a
    reboot during a pending change comes back with the old rules.

    Writes /etc/systemd/system/fwsafe-recover.service, enables it with the
    sysinit.target.wants symlink (no systemctl needed), and keeps the rescue tool as
    STATE_DIR/fwsafe.pyz on this disk for a rescue system (docs/rescue.md). The unit also
    recovers by power cycle (two boots within reboot_recovery_window, no SSH login in
    between); the login hook it needs (a PAM session module) is enabled with
    pam-auth-update where there is one."""
    root = Path(root_dir)
    if not root.is_dir():
        raise click.UsageError(f"--root {root_dir}: no such directory")
    resolved = str(resolve_state_dir(state_dir))
    if not resolved.startswith("/"):
        raise click.UsageError("the state directory must be an absolute path")
    try:
        if uninstall:
            done = boothook.uninstall(root, resolved)
        else:
            done = boothook.install(root, resolved, with_zipapp=not no_zipapp)
    except PermissionError as exc:
        raise EnvironmentProblem(f"cannot write {exc.filename}: permission denied",
                                 hint="run it as root (sudo)") from exc
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"ok": True, "installed": not uninstall, "done": done}))
        return
    for line in done:
        click.echo(line)


COMMANDS = [rescue, install_boot_hook]
