"""Does iptables-save show a table of iptables-nft exactly? (issue 22, case 5)

fwsafe reads and restores the tables iptables-nft owns (ip/ip6 filter, nat, mangle, raw,
security) through iptables-save and iptables-restore. That text is lossy when nft itself wrote
to such a table: iptables-nft-save 1.8.9 prints a native ``ip saddr @blk drop`` as
``-A INPUT -j DROP``, leaves out sets, and prints nothing of a base chain it calls
"incompatible". A revert that loads such text replaces the real rules by wrong ones (a host
that drops everything).

The test is a round trip: the family's iptables-save text is loaded by iptables-restore into a
scratch network namespace, and ``nft -s list table`` there must show each table as the kernel
shows it here (chains and sets compared by name, rules in order; empty built-in chains with an
accept policy, which iptables-nft creates only when they are used, left out). A table that
differs is lossy: the caller refuses a change that could touch it (exit 3, nothing changed).

A table whose live digest was proven exact before, with the same iptables-save and -restore
binaries (`tools_identity`), is not tried again: the caller passes what it remembers and keeps
what is proven now (FidelityProofs; fwsafe.core.fidelity_proofs keeps them on disk).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor

from fwsafe.backends import nflist
from fwsafe.backends.base import FidelityError, FidelityProofs
from fwsafe.backends.families import FAMILIES
from fwsafe.backends.iptsave import BUILTIN_CHAINS
from fwsafe.runner import find_binary, require_binary, run

# nf_tables' family of each iptables layer whose tables live in nf_tables (not the legacy ones)
NFT_FAMILY = {name: f.nft_family for name, f in FAMILIES.items() if not f.legacy}
SCRATCH_PREFIX = "fwrt"   # fwrt<pid>: the round trip's scratch namespace

Blocks = dict[str, tuple[str, ...]]


def blocks(listing: str) -> Blocks:
    """``nft list table`` output as {"chain NAME {" / "set NAME {" ...: its lines in order}, with
    whitespace collapsed; a base chain holding nothing but an accept policy is left out."""
    found: Blocks = {}
    current: list[str] | None = None
    header = ""
    for raw in listing.splitlines():
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        depth = len(raw) - len(raw.lstrip("\t"))
        if depth == 1 and line.endswith("{"):
            header, current = line, []
        elif depth == 1 and line == "}" and current is not None:
            trivial = (header.startswith("chain ") and len(current) == 1
                       and " hook " in f" {current[0]}" and current[0].endswith("policy accept;"))
            if not trivial:
                found[header] = tuple(current)
            current = None
        elif current is not None and depth >= 2:
            current.append(line)
    return found


def _list(argv_prefix: list[str], family: str, table: str) -> Blocks:
    result = run([*argv_prefix, require_binary("nft"), "-s", "list", "table", family, table],
                 timeout=60)
    if result.returncode != 0:
        if b"No such file or directory" in result.stderr:
            return {}
        raise FidelityError(f"nft list table {family} {table} failed: "
                            f"{result.stderr.decode(errors='replace').strip()}")
    return blocks(result.stdout.decode(errors="replace"))


def _save(name: str) -> bytes:
    saved = run([require_binary(FAMILIES[name].save)], timeout=120)
    if saved.returncode != 0:
        raise FidelityError(f"{FAMILIES[name].save} failed: "
                            f"{saved.stderr.decode(errors='replace').strip()}")
    return saved.stdout


def names_ipsets(text: bytes) -> bool:
    """Whether iptables-save text names ipsets (`-m set --match-set`, `-j SET --add-set` /
    `--del-set`): it prints a set by the name ipset's state gives its index."""
    return b"--match-set" in text or b"-set " in text


def _copy_ipsets(text: bytes, inside: list[str]) -> None:
    """The ipsets the rules name (`-m set`, `-j SET`) made, empty, in the scratch namespace
    (ipsets belong to a network namespace; the rules refer to them by name)."""
    ipset = find_binary("ipset")
    if ipset is None or not names_ipsets(text):
        return   # (without ipset no set exists; a text naming one does not load: lossy)
    saved = run([ipset, "save"], timeout=60)
    if saved.returncode != 0:
        raise FidelityError(f"ipset save failed: {saved.stderr.decode(errors='replace').strip()}")
    creates = b"".join(line + b"\n" for line in saved.stdout.splitlines()
                       if line.startswith(b"create "))
    made = run([*inside, ipset, "restore"], input=creates, timeout=60)
    if made.returncode != 0:
        raise FidelityError(f"ipset restore failed: {made.stderr.decode(errors='replace').strip()}")


def _live_digests(family: str) -> dict[str, str]:
    """nflist.digests of this namespace ({} when the kernel cannot be asked so)."""
    try:
        return nflist.digests(family)
    except nflist.DigestError:
        return {}


Ahead = Future[tuple[int | None, dict[str, str]]]


def digests_ahead(family: str) -> tuple[int | None, dict[str, str]]:
    """nflist.digests of `family`, read ahead (beside the reading of the layers, before the
    text the round trip needs is there), with nf_tables' generation they hold at (None: the
    ruleset changed during the dumps, or they could not be had)."""
    start = nflist.generation()
    found = _live_digests(family)
    return (start if found and start is not None and nflist.generation() == start
            else None), found


def _digests_now(family: str, ahead: Ahead | None, generation: int | None) -> dict[str, str]:
    """The live digests at `generation`: those read ahead when they hold at it, else now."""
    if ahead is not None and generation is not None:
        try:
            held, found = ahead.result()
        except Exception:  # noqa: BLE001 - read now instead
            held, found = None, {}
        if held == generation:
            return found
    return _live_digests(family)


def _scratch_digests(inside: list[str], family: str) -> dict[str, str]:
    """nflist.digests in the scratch namespace ({} when it cannot be had): its module run by
    this Python, isolated, with only fwsafe's own directory on its path."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {package!r}); "
            "from fwsafe.backends.nflist import digest_main; digest_main()")
    result = run([*inside, sys.executable, "-I", "-S", "-c", code, family], timeout=60)
    try:
        found = json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        found = None
    return found if isinstance(found, dict) else {}


def _round_trip(name: str, text: bytes, tables: list[str], sums: Future[dict[str, str]]
                ) -> dict[str, Blocks | None]:
    """`text` loaded by iptables-restore in a scratch namespace; nft's listing of `tables`
    (a text iptables-restore refuses matches no table), None for a table whose digest there
    (nflist.digests) is the live one (`sums`, read meanwhile): the same in the kernel."""
    # check.netns builds namespaces: needed only when a round trip is tried (fidelity stays a
    # backend, not a check)
    from fwsafe.check.netns import Namespaces, NetnsError, remove_orphans

    family = NFT_FAMILY[name]
    remove_orphans(SCRATCH_PREFIX)   # left by a round trip whose process was killed
    scratch = f"{SCRATCH_PREFIX}{os.getpid()}"
    try:
        with Namespaces(ip=require_binary("ip")) as namespaces:
            namespaces.create(scratch)
            inside = namespaces.exec_argv(scratch, [])
            _copy_ipsets(text, inside)
            loaded = run([*inside, require_binary(FAMILIES[name].restore)], input=text,
                         timeout=120)
            if loaded.returncode != 0:   # the text does not even load: no table round-trips
                return {t: {"(iptables-restore refused the text)": ()} for t in tables}
            live = sums.result()
            there = _scratch_digests(inside, family) if any(live.get(t) for t in tables) else {}
            return {t: None if live.get(t) and there.get(t) == live[t]
                    else _list(inside, family, t) for t in tables}
    except NetnsError as exc:
        raise FidelityError(f"cannot make a scratch network namespace: {exc}") from exc


def tools_identity(name: str) -> str | None:
    """Which iptables-save and iptables-restore of layer `name` make and load the text: each
    file's (resolved through its symlinks) device, inode, size and modification time, with
    those of the xtables extension directories (an upgrade replaces files there), libxtables
    and libnftnl, and the kernel's release (None: a tool is not there). A proof holds only
    for what made it."""
    found = []
    for tool in (FAMILIES[name].save, FAMILIES[name].restore):
        path = find_binary(tool)
        if path is None:
            return None
        try:
            st = os.stat(os.path.realpath(path))
        except OSError:
            return None
        found.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    # the matches' and targets' libraries and libnftnl print and parse the text, the kernel
    # stores it
    for pattern in ("xtables", "libxtables.so.*", "libnftnl.so.*"):
        for path in sorted(glob.glob(f"/usr/lib*/{pattern}") + glob.glob(f"/usr/lib/*/{pattern}")):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.realpath(path))
                found.append(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    found.append(os.uname().release)
    return " ".join(found)


def _compare(name: str, text: bytes, tables: list[str], ahead: Ahead | None,
             start: int | None, sums_now: dict[str, str] | None
             ) -> tuple[dict[str, Blocks | None], dict[str, Blocks], dict[str, str]]:
    """One reading of `tables`: the round trip's listings (None: the digests are equal), the
    live listings it needs, and the live digests (`sums_now`, or read at `start` meanwhile)."""
    family = NFT_FAMILY[name]
    # Each table's digest (nflist.digests) here and there first: equal, the kernel holds the
    # same (no listing); else, or where it cannot tell (sets...), nft's listings decide.
    with ThreadPoolExecutor(max_workers=1) as pool:
        sums: Future[dict[str, str]] = Future()
        trip = pool.submit(_round_trip, name, text, tables, sums)
        try:
            sums.set_result(sums_now if sums_now is not None
                            else _digests_now(family, ahead, start))
        finally:
            if not sums.done():
                sums.set_result({})
        live = {t: _list([], family, t) for t in tables if not sums.result().get(t)}
        scratch = trip.result()
    live.update({t: _list([], family, t) for t in tables
                 if t not in live and scratch[t] is not None})
    return scratch, live, sums.result()


def lossy_tables(name: str, tables: Collection[str] | None = None, *, saved: bytes | None = None,
                 generation: int | None = None, ahead: Ahead | None = None,
                 proofs: FidelityProofs | None = None) -> list[str]:
    """The tables of iptables layer `name` ("ipv4"/"ipv6"; `tables`: only those, None: all)
    that iptables-save does not show exactly, as "ip filter"; a table that restores to a
    different one counts too. `saved`: that layer's iptables-save text as read when nf_tables'
    generation was `generation` (used while it still is); `ahead`: the live digests read
    ahead (`digests_ahead`, used when they hold at the same generation). `proofs`: a table
    whose live digest (with these tools) is in `proofs.known` is exact without a round trip
    (`proofs.skipped`); one the round trip proves exact goes to `proofs.found`; never for a
    text that names ipsets (their names come from ipset's state, not the digest's). Raises
    FidelityError when the test cannot be made."""
    family = NFT_FAMILY[name]
    known = nflist.kernel_tables()
    if known is None:
        result = run([require_binary("nft"), "list", "tables"], timeout=60)
        if result.returncode != 0:
            raise FidelityError("nft list tables failed: "
                                f"{result.stderr.decode(errors='replace').strip()}")
        known = [(w[1], w[2]) for w in (line.split() for line in
                                        result.stdout.decode(errors="replace").splitlines())
                 if len(w) >= 3 and w[0] == "table"]
    present = [t for f, t in known if f == family and t in BUILTIN_CHAINS
               and (tables is None or t in tables)]
    if not present:
        return []
    tools = tools_identity(name) if proofs is not None else None
    for _ in range(5):
        # The text and nft's listing must show the same kernel state: nothing committed
        # between them (nf_tables' generation, per network namespace), else read again.
        start = nflist.generation()
        text = saved if saved is not None and start is not None and start == generation \
            else _save(name)
        provable = (proofs is not None and tools is not None and start is not None
                    and not names_ipsets(text))
        sums: dict[str, str] | None = None
        proven: list[str] = []
        if provable and proofs is not None and any(k[0] == family and k[3] == tools
                                                   for k in proofs.known):
            sums = _digests_now(family, ahead, start)
            proven = [t for t in present
                      if sums.get(t) and (family, t, sums[t], tools) in proofs.known]
        rest = [t for t in present if t not in proven]
        scratch, live, sums = _compare(name, text, rest, ahead, start, sums) if rest \
            else ({}, {}, sums or {})
        if start is None or nflist.generation() == start:
            break
        saved = None
    else:
        # Reads taken at different moments would tell a busy host's changes for losses.
        raise FidelityError("another program changed nf_tables during each of 5 readings; "
                            "the tables could not be compared (try again)")
    if provable and proofs is not None and tools is not None:
        proofs.skipped += [f"{family} {t}" for t in proven]
        proofs.found += [(family, t, sums[t], tools) for t in rest
                         if scratch[t] is None and sums.get(t)]
    return [f"{family} {t}" for t in rest if scratch[t] is not None and live[t] != scratch[t]]
