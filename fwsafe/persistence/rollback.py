"""The change that puts a known-good state back (`fwsafe rollback ID`): the entry's layers as
a Change for the guard, made complete against what is live now (iptables tables the entry does
not name are emptied, nft tables are deleted and re-created, sshd's files that differ are
written back against their content now, firewalld put back through firewalld), and notes on
what a rollback leaves alone."""

from __future__ import annotations

from fwsafe.backends import BASED_CHANGE, NFT_TABLES, ROLLBACK, RULES_FILE, layer_has, layers_with
from fwsafe.core.change import Change
from fwsafe.errors import UsageError
from fwsafe.ondisk.history_format import Entry
from fwsafe.persistence import known_good


def rollback_change(entry: Entry) -> tuple[Change, list[str]]:
    """The Change that puts `entry` back, and notes on the layers it leaves alone."""
    # loaded only when used (this module is imported by commands that never need it)
    from fwsafe.backends import layer_for

    change = Change()
    notes = []
    for name, content in entry.layers.items():
        if name not in layers_with(ROLLBACK):   # (a name as given: "sshd", not "sshd:<path>")
            continue
        try:
            layer_for(name)
        except UsageError:
            notes.append(f"layer {name}: this fwsafe cannot apply it; not rolled back")
            continue
        if layer_has(name, RULES_FILE):
            content = _with_emptied_tables(name, content)
        elif layer_has(name, NFT_TABLES):
            content = _nft_replacement(content)
            if not content.strip():
                continue  # no native tables then, none now
        elif layer_has(name, BASED_CHANGE):
            sshd, sshd_notes = _sshd_rollback(content)
            notes += sshd_notes
            if sshd is None:
                continue  # sshd's files are as they were
            content = sshd
        change.add(name, content, f"history:{entry.id}/{name}")
    return change, notes


def already_live(entry: Entry, change: Change) -> bool:
    """Whether the live layers already equal `entry` in every layer `change` (its rollback)
    would apply: then a rollback has nothing to do. A rollback that applies no layer at all
    is a usage error."""
    if not change.layers:
        raise UsageError(f"{entry.id} has no layer that a rollback can apply")
    live, _ = known_good.capture_layers()
    return all(live.get(name) == entry.layers.get(name) for name in change.layers)


def _sshd_rollback(content: bytes) -> tuple[bytes | None, list[str]]:
    """The sshd change that writes the entry's files that differ now (None: none differ),
    based on their content now (the guard refuses if one changes meanwhile)."""
    # loaded only when used (this module is imported by commands that never need it) (a rollback of
    # sshd's files)
    from fwsafe.ondisk.sshd_files import SshdFiles, dump, read_file
    from fwsafe.ondisk.sshd_files import load as load_sshd

    entry = load_sshd(content)
    now = {path: read_file(path) for path in entry.files}
    files = {path: state for path, state in entry.files.items() if now[path] != state}
    live, _ = known_good.capture_sshd()
    added = sorted(set(load_sshd(live).files) - set(entry.files)) if live else []
    notes = [f"sshd: {path} is read by sshd now but was not then; a rollback leaves it "
             "(move it aside by hand if it must go)" for path in added]
    if not files:
        return None, notes
    base = {path: (state.digest() if state is not None else None)
            for path, state in now.items() if path in files}
    return dump(SshdFiles(entry.config, files, base)), notes


def _nft_replacement(content: bytes) -> bytes:
    """`nft -f` merges a table definition into an existing table: delete and re-create each
    table of the entry, and delete the native tables that exist now but not in the entry."""
    # loaded only when used (this module is imported by commands that never need it) (a rollback of
    # nft's tables)
    from fwsafe.ondisk.history_format import nft_tables

    wanted = nft_tables(content.decode(errors="replace"))
    live, _ = known_good.capture_layers()
    now = nft_tables(live.get("nft", b"").decode(errors="replace"))
    script = "".join(f"add table {fam} {tab}\ndelete table {fam} {tab}\n"
                     for fam, tab in dict.fromkeys([*wanted, *now]))
    return (script.encode() + content) if script else b""


def _with_emptied_tables(name: str, content: bytes) -> bytes:
    """iptables-restore replaces only the tables a file names: name the ones that exist now but
    not in the entry too, empty, so that the rollback gives the entry's state."""
    # loaded only when used (this module is imported by commands that never need it) (a rollback of
    # iptables' tables)
    from fwsafe.backends import layer_for
    from fwsafe.backends.iptsave import BUILTIN_CHAINS, empty_table, render, table_names

    wanted = table_names(content.decode(errors="replace"))
    try:
        live = table_names(layer_for(name).capture().decode(errors="replace"))
    except Exception:  # noqa: BLE001 - without a capture, the entry's tables alone
        return content
    extra = [empty_table(t) for t in live if t not in wanted and t in BUILTIN_CHAINS]
    return content + render(extra).encode()
