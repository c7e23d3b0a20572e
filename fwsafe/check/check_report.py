"""The lockout check's report as a person reads it.

By default one screen: the verdict first; then each management path, a lost one with the rule
that cut it (file:line); the rules NOT checked that could matter (a packet of the management
path met them and they could decide its fate, fwsafe.check.relevance); then at most one line
saying what was left out and that ``-v`` shows it. ``-v`` shows everything: each path's
detail, every rule the sandbox cannot reproduce, the notes. No section repeats another's
lines. ``--json`` carries every detail (docs/json.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotations: fwsafe.check.predict imports this module
    from fwsafe.check.predict import CheckReport, Verdict

__all__ = ["check_lines", "check_text", "left_out_line", "no_client", "plural",
           "precheck_summary", "refusal_hint", "sources_label", "verdict_line"]

#: ufw verbs after which SSH is cut by ufw's defaults, not by a rule the command itself adds:
#: the fix is to allow SSH first.
_UFW_DEFAULTS_VERBS = ("enable", "default", "reload", "reset")

_LABEL = {True: "ok", False: "LOCKOUT", None: "not checked"}
_INDENT = " " * 17


def plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else (words or word + 's')}"


def left_out_line(parts: Iterable[str]) -> str | None:
    """The one line that says what a default report left out, or None when nothing was."""
    kept = [p for p in parts if p]
    if not kept:
        return None
    return f"Left out (-v): {'; '.join(kept)}"


def sources_label(layers: dict[str, str]) -> str:
    """`ufw allow 80/tcp` (ipv4, ipv6), or "a.rules (ipv4), b.rules6 (ipv6)": each layer's
    source once, its family once (a command's copies carry the family already)."""
    by_source: dict[str, list[str]] = {}
    for layer, source in layers.items():
        suffix = f" ({layer})"
        base = source[:-len(suffix)] if source.endswith(suffix) else source
        by_source.setdefault(base, []).append(layer)
    return ", ".join(f"{base} ({', '.join(names)})" for base, names in by_source.items())


def no_client(verdict: Verdict) -> bool:
    """The path of a family no client is known in (fwsafe.check.predict: "tcp ? -> :PORT")."""
    return verdict.ok is None and verdict.path.startswith("tcp ? ")


def verdict_line(report: CheckReport) -> str:
    if report.lockout:
        return "Result: LOCKOUT predicted: do not apply this as it is."
    unknown = [v for v in report.verdicts if v.ok is None and not no_client(v)]
    if unknown:
        return (f"Result: no lockout found, but {plural(len(unknown), 'path')} could NOT be "
                "checked (see below).")
    if any(v.ok for v in report.verdicts):
        missing = [v.path.rsplit("(", 1)[-1].rstrip(")").replace("ipv", "IPv")
                   for v in report.verdicts if no_client(v)]
        if missing:
            return (f"Result: the management path stays open for the clients checked; "
                    f"{' and '.join(missing)}: no client known (below).")
        return "Result: the management path stays open."
    return "Result: no management path could be checked (see below)."


def check_lines(report: CheckReport, verbose: bool) -> tuple[list[str], list[str]]:
    """The report's lines, and (by default) the parts of what it left out for the one
    "Left out" line (fwsafe check adds the exposure's to them)."""
    lines = [verdict_line(report),
             f"  checked: {sources_label(report.layers)}; management port {report.port}; "
             f"clients {', '.join(report.clients) or '-'}"]
    order = {False: 0, None: 1, True: 2}
    verdicts = report.verdicts if verbose else sorted(report.verdicts,
                                                      key=lambda v: order[v.ok])
    for verdict in verdicts:
        lines.append(f"  {_LABEL[verdict.ok]:<12} {verdict.path}")
        lines += _verdict_detail(verdict, verbose)
    left_out: list[str] = []
    matters = report.matters
    if matters:
        lines.append("NOT checked, and it could matter (a packet of the management path meets "
                     "these rules, and the sandbox cannot reproduce whether they match):")
        lines += [f"  {item}" for item in matters]
    rest = [item for item in report.not_checked if item not in matters]
    if verbose:
        if rest:
            lines.append("Not checked, and it cannot change these verdicts (the sandbox cannot "
                         "reproduce these rules, but no packet of the management path meets them, "
                         "or matched or not they leave its fate as it is):")
            lines += [f"  {item}" for item in rest]
        lines += [f"Note: {note}" for note in report.notes]
        lines += sandbox_lines(report)
    else:
        if rest:
            left_out.append(f"{plural(len(rest), 'unreproducible rule')}, none able to change "
                            "the verdict")
        if report.notes:
            left_out.append(plural(len(report.notes), "note"))
    return lines, left_out


def sandbox_lines(report: CheckReport) -> list[str]:
    """What the sandbox loaded (`-v`): the rules it left out, and what it loaded whole, why."""
    if not report.left_out and not report.pruning:
        return []
    if report.left_out:
        rules = "rule" if report.left_out == 1 else "rules"
        head = (f"Sandbox: {report.left_out:,} {rules} left out (no packet of the sandbox "
                "can match them: addresses or interfaces outside its own, or chains only such "
                "rules reach; one rule of each shape is loaded all the same)")
    else:
        head = "Sandbox: every rule loaded"
    return [head, *(f"  {why}" for why in report.pruning)]


def _verdict_detail(verdict: Verdict, verbose: bool) -> list[str]:
    if verbose:
        out = [f"{_INDENT}{verdict.detail}"] if verdict.detail else []
        if verdict.culprit:
            out.append(f"{_INDENT}culprit: {verdict.culprit}")
        return out
    if verdict.ok is True:
        return []
    if verdict.ok is False:
        if verdict.culprit:
            return [f"{_INDENT}culprit: {verdict.culprit}"]
        return [f"{_INDENT}{verdict.detail}"]
    if verdict.unverified:
        return [f"{_INDENT}it met {plural(len(verdict.unverified), 'rule')} the sandbox cannot "
                "reproduce that could decide it (below)"]
    return [f"{_INDENT}{verdict.detail.removeprefix('not checked: ')}"] if verdict.detail else []


def check_text(report: CheckReport, verbose: bool = False) -> str:
    lines, left_out = check_lines(report, verbose)
    line = left_out_line(left_out)
    return "\n".join(lines + ([line] if line else []))


def precheck_summary(report: CheckReport) -> str:
    """apply's one line on the lockout check that passed (fwsafe.control.flow.lockout_check)."""
    if report.lockout:
        return "LOCKOUT PREDICTED (applied with --force): " + report.lockout_message()
    passed = [v for v in report.verdicts if v.ok]
    if not passed:
        return "no SSH path could be tested"
    text = (f"the SSH path stays open for {', '.join(report.clients)} (port {report.port}; "
            f"{plural(len(passed), 'path')} tested)")
    missing = [v.path.rsplit("(", 1)[-1].rstrip(")").replace("ipv", "IPv")
               for v in report.verdicts if no_client(v)]
    unknown = [v for v in report.verdicts if v.ok is None and not no_client(v)]
    if unknown:
        first = unknown[0]
        why = (f"it met {first.unverified[0]}" if first.unverified
               else first.detail.removeprefix("not checked: "))
        text += f"; NOT checked: {plural(len(unknown), 'path')}, e.g. {first.path}: {why}"
    if missing:
        text += f"; {' and '.join(missing)}: no client known"
    return text


def refusal_hint(run: list[str] | None, port: int) -> str:
    """What to do when apply refuses a predicted lockout: for a ufw command, the exact command
    that fixes it (with the port the SSH session really uses)."""
    if run and run[0].rsplit("/", 1)[-1] == "ufw":
        words = [w for w in run[1:] if not w.startswith("-")]
        shown = " ".join(run[1:])
        if words and words[0] in _UFW_DEFAULTS_VERBS:
            return (f"nothing was changed; allow SSH first: `fwsafe ufw allow {port}/tcp`, "
                    f"then `fwsafe ufw {shown}` again")
        return (f"nothing was changed; the rule that `ufw {shown}` adds cuts SSH on port {port}: "
                "leave it out, or narrow it so that it spares your SSH clients")
    return ("nothing was changed; fix the rule, or apply anyway with --force (the guard still "
            "reverts it unless confirmed)")
