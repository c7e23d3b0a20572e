"""The command line: a thin layer over `fwsafe.control.manager`. Results go to stdout, progress and
prompts to stderr; every error becomes one exit code, in `main()` alone."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from fwsafe.cli.common import EXIT_CODES_EPILOG, LazyGroup
from fwsafe.cli.failure import fail, internal_error, interrupted, wants_json
from fwsafe.cli.version import show_version
from fwsafe.context import RUN
from fwsafe.errors import ExitCode, FwsafeError


@click.group(cls=LazyGroup, epilog=EXIT_CODES_EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=show_version,
              help="Show the version, how fwsafe was installed and the backends found.")
def cli() -> None:
    """Change a firewall over SSH without locking yourself out.

    `fwsafe apply` changes the firewall under a dead-man's switch: a guard process, started
    before the change, puts the old rules back unless the change is confirmed in time. The
    guard outlives your SSH session, the CLI and (where the kernel allows) the OOM killer.

    \b
    Typical use, on the server:
      fwsafe apply new.rules                # countdown; type 'yes' to keep
      fwsafe apply --detach new.rules       # returns at once; then, from a NEW ssh session:
      fwsafe confirm                        # proves new SSH logins still work
    """



def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    RUN.reset()
    as_json = wants_json(args)
    try:
        returned = cli.main(args=args, prog_name="fwsafe", standalone_mode=False)
    except FwsafeError as exc:
        fail(exc, as_json)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort: an interruption is never a usage error.
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            interrupted(args)
        click.echo("fwsafe: aborted", err=True)
        sys.exit(int(ExitCode.USAGE))
    except KeyboardInterrupt:
        interrupted(args)
    except Exception as exc:  # noqa: BLE001 - never a traceback: one line, and the file
        fail(internal_error(exc, args), as_json)
    # With standalone_mode=False, click returns the code of a ctx.exit(N) instead of exiting.
    sys.exit(returned if isinstance(returned, int) else int(ExitCode.OK))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
