"""firewalld's runtime model as data: its listings parsed, merged three ways, compared, and the
firewall-cmd runtime commands that turn one model into another (pure: nothing run here).

A model is what fwsafe.backends.firewalld_client reads: {"default-zone", "zones", "policies",
"direct", "ipsets", "panic"}; the kernel's tables of a capture are compared line by line
(kernel_delta_left). Used by the firewalld layer (fwsafe.backends.firewalld_layer).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

# `--list-all-zones` / `--list-all-policies` keys -> the firewall-cmd option that sets them
# at runtime (--add-X / --remove-X), lists of values ...
_LISTS = {"services": "service", "ports": "port", "protocols": "protocol",
          "source-ports": "source-port", "icmp-blocks": "icmp-block",
          "forward-ports": "forward-port", "rich rules": "rich-rule",
          "sources": "source", "interfaces": "interface",
          "ingress-zones": "ingress-zone", "egress-zones": "egress-zone"}
# ... and yes/no switches
_SWITCHES = {"masquerade": "masquerade", "icmp-block-inversion": "icmp-block-inversion",
             "forward": "forward"}
# Bound to one zone at a time: added with --change-X (moved from another zone).
_MOVED = frozenset({"sources", "interfaces"})


def parse_listing(text: str) -> dict[str, dict[str, list[str]]]:
    """`firewall-cmd --list-all-zones` (or `--list-all-policies`) output ->
    {name: {key: [values]}}. A header line is the name (with "(active)"/"(default, active)"
    left out: those follow from the rest); "  key: a b c" gives words; lines starting with a
    tab under a key (forward-ports, rich rules) give one value each."""
    found: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    key = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t"):
            if current is not None and key:
                current.setdefault(key, []).append(line.strip())
            continue
        if not line.startswith(" "):
            name = line.split(" (", 1)[0].strip()
            current = found.setdefault(name, {})
            key = ""
            continue
        if current is None:
            continue
        key, _, value = line.strip().partition(":")
        current[key] = value.split() if key not in ("forward-ports", "rich rules") else (
            [value.strip()] if value.strip() else [])
    for entries in found.values():
        for name in entries:
            if name in _LISTS:
                entries[name] = sorted(entries[name])
    return found


def parse_ipsets(text: str) -> dict[str, list[str]]:
    """The ipsets listing (a line per ipset: its name, then its entries) -> {name: entries}."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if words:
            found[words[0]] = sorted(words[1:])
    return found


def _kernel_lines(state: Mapping[str, Any]) -> set[str]:
    """firewalld's tables in a capture as "table / chain / rule" lines (set elements and
    declarations included), for a three-way comparison."""
    lines: set[str] = set()
    for table, text in (state.get("kernel") or {}).items():
        where, elements = "", ""
        for raw in text.splitlines():
            line = " ".join(raw.split())
            if not line or line.startswith("#"):
                continue
            if elements or line.startswith("elements = {"):
                # a set's elements, one by one (others add theirs to the same line)
                elements += " " + line.removeprefix("elements = {")
                if not line.endswith("}"):
                    continue
                for element in elements.rstrip("}").split(","):
                    if element.strip():
                        lines.add(f"{table} / {where} / element {element.strip()}")
                elements = ""
                continue
            if line.startswith(("chain ", "set ", "map ")) and line.endswith("{"):
                where = line[:-1].strip()
            lines.add(f"{table} / {where} / {line}")
    return lines


def kernel_delta_left(before: Mapping[str, Any], after: Mapping[str, Any],
                      now: Mapping[str, Any]) -> list[str]:
    """The change's own delta in firewalld's tables (before -> after) that is still live in
    `now`: lines it added still there, lines it removed still missing."""
    old, changed, live = _kernel_lines(before), _kernel_lines(after), _kernel_lines(now)
    return sorted({f"added {line}" for line in changed - old if line in live}
                  | {f"removed {line}" for line in old - changed if line not in live})


def same_shape(now: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    """Runtime commands alone can turn `now` into `want`: the same zones, policies and
    default zone (those change with the permanent configuration and a reload)."""
    return (now.get("default-zone") == want.get("default-zone")
            and set(now.get("zones") or {}) == set(want.get("zones") or {})
            and set(now.get("policies") or {}) == set(want.get("policies") or {})
            and set(now.get("ipsets") or {}) == set(want.get("ipsets") or {}))


def merge_models(before: Mapping[str, Any], after: Mapping[str, Any], live: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], list[str]]:
    """The three-way merge of firewalld's runtime model: `before` (the snapshot) with what
    others changed between `after` (right after the change) and `live` (now), value by
    value: a value others added stays, one they removed stays removed, a switch they turned
    keeps their setting. Returns the merged model and a note per change kept."""
    merged: dict[str, Any] = json.loads(json.dumps(before))
    kept: list[str] = []
    for kind, key in (("zone", "zones"), ("policy", "policies")):
        b_all, a_all, l_all = (m.get(key) or {} for m in (before, after, live))
        for name in sorted(set(b_all) & set(a_all) & set(l_all)):
            b, a, lv = b_all[name], a_all[name], l_all[name]
            target = merged[key][name]
            for field in set(_LISTS) & (set(a) | set(lv)):
                old, new = set(a.get(field, [])), set(lv.get(field, []))
                if old == new:
                    continue
                values = (set(b.get(field, [])) | (new - old)) - (old - new)
                target[field] = sorted(values)
                kept += [f"{kind} {name} {field} +{v}" for v in sorted(new - old)]
                kept += [f"{kind} {name} {field} -{v}" for v in sorted(old - new)]
            for field in _SWITCHES:
                if a.get(field) != lv.get(field) and field in lv:
                    target[field] = lv[field]
                    kept.append(f"{kind} {name} {field} {' '.join(lv[field])}")
    b_sets, a_sets, l_sets = (m.get("ipsets") or {} for m in (before, after, live))
    for name in sorted(set(b_sets) & set(a_sets) & set(l_sets)):
        old, new = set(a_sets[name]), set(l_sets[name])
        if old != new:
            merged["ipsets"][name] = sorted((set(b_sets[name]) | (new - old)) - (old - new))
            kept += [f"ipset {name} +{v}" for v in sorted(new - old)]
            kept += [f"ipset {name} -{v}" for v in sorted(old - new)]
    b_direct, a_direct, l_direct = (m.get("direct") or {} for m in (before, after, live))
    direct = dict(merged.get("direct") or {})
    for field in ("chains", "rules", "passthroughs"):
        old, new = set(a_direct.get(field, [])), set(l_direct.get(field, []))
        if old != new:
            direct[field] = sorted((set(b_direct.get(field, [])) | (new - old)) - (old - new))
            kept += [f"direct {v} (+)" for v in sorted(new - old)]
            kept += [f"direct {v} (-)" for v in sorted(old - new)]
    merged["direct"] = direct
    if after.get("panic") != live.get("panic") and live.get("panic") in ("yes", "no"):
        merged["panic"] = live["panic"]
        kept.append(f"panic mode {live['panic']}")
    if after.get("default-zone") != live.get("default-zone") and live.get("default-zone"):
        merged["default-zone"] = live["default-zone"]
        kept.append(f"default zone {live['default-zone']}")
    return merged, kept


def runtime_commands(now: Mapping[str, Any], want: Mapping[str, Any]) -> list[list[list[str]]]:
    """The firewall-cmd runtime commands that turn the model `now` into `want`, in two phases
    whose commands may run at once: the removals (a source or interface may move between
    zones; a direct chain's rules go before it) and the direct chains to add, then the
    additions (direct rules after the chains they use) and the direct chains to remove. One
    command per zone or policy and kind of value (firewall-cmd takes several values of one
    kind, not two kinds)."""
    removals: list[list[str]] = []
    additions: list[list[str]] = []
    for kind, key in (("zone", "zones"), ("policy", "policies")):
        have_all, want_all = now.get(key) or {}, want.get(key) or {}
        for name in sorted(set(have_all) & set(want_all)):
            scope = f"--{kind}={name}"
            have, wanted = have_all[name], want_all[name]
            for field, option in _LISTS.items():
                old, new = set(have.get(field, [])), set(wanted.get(field, []))
                gone, added = sorted(old - new), sorted(new - old)
                verb = "change" if field in _MOVED else "add"
                if gone:
                    removals.append([scope, *(f"--remove-{option}={v}" for v in gone)])
                if added:
                    additions.append([scope, *(f"--{verb}-{option}={v}" for v in added)])
            for field, option in _SWITCHES.items():
                old_on, new_on = have.get(field), wanted.get(field)
                if old_on != new_on and new_on in (["yes"], ["no"]):
                    verb = "add" if new_on == ["yes"] else "remove"
                    (additions if verb == "add" else removals).append(
                        [scope, f"--{verb}-{option}"])
    have_sets, want_sets = now.get("ipsets") or {}, want.get("ipsets") or {}
    for name in sorted(set(have_sets) & set(want_sets)):
        old, new = set(have_sets[name]), set(want_sets[name])
        if old - new:
            removals.append([f"--ipset={name}", *(f"--remove-entry={v}" for v in sorted(old - new))])
        if new - old:
            additions.append([f"--ipset={name}", *(f"--add-entry={v}" for v in sorted(new - old))])
    have_direct, want_direct = now.get("direct") or {}, want.get("direct") or {}

    def direct(verb: str, fields: tuple[tuple[str, str], ...]) -> list[list[str]]:
        found = []
        for field, option in fields:
            old, new = set(have_direct.get(field, [])), set(want_direct.get(field, []))
            values = old - new if verb == "remove" else new - old
            found += [["--direct", f"--{verb}-{option}", *shlex.split(v)]
                      for v in sorted(values)]
        return found

    rules = (("rules", "rule"), ("passthroughs", "passthrough"))
    chains = (("chains", "chain"),)
    phases = [removals + direct("remove", rules) + direct("add", chains),
              additions + direct("add", rules) + direct("remove", chains)]
    # panic mode (every packet dropped; firewalld refuses most changes in it, and a reload
    # keeps it): turned off before anything else, on after everything
    panic_off = [["--panic-off"]] if now.get("panic") == "yes" and want.get("panic") == "no" else []
    panic_on = [["--panic-on"]] if now.get("panic") == "no" and want.get("panic") == "yes" else []
    return [phase for phase in (panic_off, *phases, panic_on) if phase]
