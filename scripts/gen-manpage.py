#!/usr/bin/env python3
"""Write the manual page fwsafe(8), in roff, from the click commands' own help.

    python3 scripts/gen-manpage.py [OUT]        (stdout without OUT)

The Debian package runs it at build time (debian/rules), against the fwsafe it just built (put
that first on PYTHONPATH). Nothing is fetched and nothing depends on the clock: the same
commands give the same page. Every command gets its usage, its help and its options; the exit
codes, files and environment come after.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import click

FILES = (
    ("/etc/fwsafe/fwsafe.toml", "The configuration (every key optional; see "
     "/usr/share/doc/fwsafe/operations.md.gz). --config or $FWSAFE_CONFIG name another."),
    ("/var/lib/fwsafe", "The state directory (0700, root's alone): the transaction records, "
     "snapshots, guard logs and the history of known-good states."),
    ("/lib/systemd/system/fwsafe-recover.service", "The boot recovery unit: early at boot it "
     "undoes a change that was still pending when the machine went down."),
    ("/usr/share/fwsafe/fwsafe.pyz", "The offline rescue tool as one file (standard library "
     "only). From a rescue system with the server's disk on /mnt: "
     "python3 /mnt/usr/share/fwsafe/fwsafe.pyz rescue --root /mnt --list"),
)
ENVIRONMENT = (
    ("FWSAFE_CONFIG", "The configuration file (default /etc/fwsafe/fwsafe.toml)."),
    ("FWSAFE_STATE_DIR", "The state directory (default: state_dir in the configuration, "
     "else /var/lib/fwsafe)."),
    ("NO_COLOR", "No colour in the output, even on a terminal."),
)
SEE_ALSO = ("iptables-save(8)", "iptables-restore(8)", "nft(8)", "ufw(8)", "systemd-run(1)",
            "ssh(1)")


def escape(text: str) -> str:
    """Text as roff shows it: backslashes escaped, option dashes as minus signs."""
    text = text.replace("\\", "\\e")
    return re.sub(r"(?<![\w.])-", r"\\-", text)


def line(text: str) -> str:
    """One input line that roff does not take for a request."""
    return "\\&" + text if text.startswith((".", "'")) else text


def paragraphs(help_text: str) -> list[str]:
    """click's help as roff: a paragraph per blank-line block, rewrapped by roff, except the
    blocks click marks with \\b, which keep their lines."""
    text = inspect.cleandoc(help_text).split("\f")[0]
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            out += [".PP", ".nf", *(line(escape(ln)) for ln in lines[1:] if ln.strip()), ".fi"]
        else:
            out += [".PP", line(escape(" ".join(ln.strip() for ln in lines)))]
    return out


def options(command: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        out += [".TP", line(f"\\fB{escape(names)}\\fR"), line(escape(" ".join(help_text.split())))]
    return out


def command_section(command: click.Command, ctx: click.Context, path: str,
                    group_epilog: str | None) -> list[str]:
    usage = " ".join(command.collect_usage_pieces(ctx))
    out = [f'.SS "{escape(path)} {escape(usage)}"']
    out += paragraphs(command.help or command.short_help or "")
    out += options(command, ctx)
    if command.epilog and command.epilog != group_epilog:
        out += paragraphs(command.epilog)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            out += command_section(sub, sub_ctx, f"{path} {name}", group_epilog)
    return out


def render(group: click.Group, version: str) -> str:
    ctx = click.Context(group, info_name="fwsafe", **group.context_settings)
    summary = inspect.cleandoc(group.help or "fwsafe").splitlines()[0].rstrip(".")
    out = [
        f'.TH FWSAFE 8 "" "fwsafe {escape(version)}" "System Administration"',
        ".SH NAME",
        f"fwsafe \\- {escape(summary[0].lower() + summary[1:])}",
        ".SH SYNOPSIS",
        ".B fwsafe",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *paragraphs("\n".join(inspect.cleandoc(group.help or "").splitlines()[1:])),
        ".SH OPTIONS",
        *options(group, ctx),
        ".SH COMMANDS",
    ]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub_ctx = click.Context(command, info_name=name, parent=ctx)
        out += command_section(command, sub_ctx, f"fwsafe {name}", group.epilog)
    out.append(".SH EXIT STATUS")
    if group.epilog:
        out += paragraphs(group.epilog)
    out.append(".SH FILES")
    for path, text in FILES:
        out += [".TP", f"\\fI{escape(path)}\\fR", line(escape(text))]
    out.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        out += [".TP", f"\\fB{name}\\fR", line(escape(text))]
    out += [".SH SEE ALSO", ", ".join(f"\\fB{escape(ref.split('(')[0])}\\fR({ref.split('(')[1]}"
                                      for ref in SEE_ALSO)]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    from fwsafe import __version__
    from fwsafe.cli import cli

    page = render(cli, __version__)
    if len(argv) > 1:
        print("usage: gen-manpage.py [OUT]", file=sys.stderr)
        return 2
    if argv:
        Path(argv[0]).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
