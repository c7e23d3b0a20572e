"""The package's shape: no import cycles, no module reaching into another's private names, the
core free of the CLI, the rescue tool and the sandbox agent free of everything but the standard
library, and no class so large that a newcomer cannot read it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fwsafe"
MAX_CLASS_LINES = 250
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if MODULES[importer].name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only)."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports(name: str, *, top_level_only: bool) -> set[str]:
    """The fwsafe modules `name` imports (a `from pkg import mod` counts as mod): at the top
    level, or anywhere at run time (function-local imports too; not `if TYPE_CHECKING:`)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else _runtime_nodes(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fwsafe")}
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, node)
            if not target.startswith("fwsafe"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle() -> None:
    """Function-local imports count: a cycle hidden in a function is still a circle a reader
    must hold in mind (and a late ImportError waiting for the path that takes it)."""
    graph = {name: imports(name, top_level_only=False) for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_every_module_imports_on_its_own() -> None:
    """Each module imported first, in a fresh interpreter: what a cycle would break."""
    code = ("import importlib, sys\nfailed = []\nfor name in sys.argv[1:]:\n"
            "    for loaded in [m for m in sys.modules if m.startswith('fwsafe')]:\n"
            "        del sys.modules[loaded]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as exc:\n        failed.append(f'{name}: {exc!r}')\n"
            "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    names = [n for n in MODULES if not n.endswith("__main__")]
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_reaches_into_another_modules_private_names() -> None:
    offenders = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, node)
                if not target.startswith("fwsafe"):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        offenders.append(f"{name}: from {target} import {alias.name}")
                    if f"{target}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("fwsafe") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert offenders == []


@pytest.mark.parametrize("package", ["fwsafe.core", "fwsafe.control", "fwsafe.backends",
                                     "fwsafe.guard", "fwsafe.check", "fwsafe.persistence",
                                     "fwsafe.remote",
                                     "fwsafe.rescue", "fwsafe.ondisk", "fwsafe.lab",
                                     "fwsafe.audit", "fwsafe.sshd", "fwsafe.netns_agent"])
def test_nothing_imports_the_cli(package: str) -> None:
    """The CLI is a thin layer that nothing imports (so that the Ansible collection, the lab
    or a script can drive the library)."""
    for name in MODULES:
        if name == package or name.startswith(package + "."):
            bad = {m for m in imports(name, top_level_only=False) if m.startswith("fwsafe.cli")}
            assert not bad, f"{name} imports {bad}"


# What fwsafe.core may import (function-local imports count): itself, the backends' registry and
# interface (fwsafe.backends, .base) and nf_tables' generation (.nflist), never a specific
# backend; the tools (runner), the on-disk formats (ondisk), the typed errors, the run's
# context, the failpoints (a leaf on context), paramiko's compatibility layer (sshcompat, a
# leaf: core.probe_kinds' ssh probes).
CORE_MAY_IMPORT = ("fwsafe.core", "fwsafe.backends", "fwsafe.backends.base",
                   "fwsafe.backends.nflist", "fwsafe.runner", "fwsafe.ondisk", "fwsafe.errors",
                   "fwsafe.context", "fwsafe.failpoints", "fwsafe.sshcompat")
def _allowed_in_core(module: str) -> bool:
    return module in CORE_MAY_IMPORT or module.startswith(
        tuple(p + "." for p in CORE_MAY_IMPORT if p in ("fwsafe.core", "fwsafe.ondisk")))


def test_core_depends_on_nothing_above_it() -> None:
    """`core` is the spine the rest stands on: what lives above it (the lockout check, sshd's
    lockout check, the boot unit, the history, the revert's access proof, the guard's escape
    hatch) is handed to it by its callers (ApplyOptions' steps: fwsafe/steps.py; `prover`:
    fwsafe/check/proof.py; recover's `remove_hatch`: fwsafe/guard/hatch.py), what drives the
    guard lives above both (fwsafe/control), a backend's knowledge is asked through the Layer
    interface or the registry."""
    upward = set()
    for name in MODULES:
        if name == "fwsafe.core" or name.startswith("fwsafe.core."):
            upward |= {(name, m) for m in imports(name, top_level_only=False)
                       if not _allowed_in_core(m)}
    assert sorted(upward) == [], "core imports from above it"


# Who may import fwsafe.control (the apply flow and the Manager, which drive core and the
# guard): the layers above it alone. core and the guard below it never do.
CONTROL_USERS = ("fwsafe.control", "fwsafe.cli", "fwsafe.steps", "fwsafe.remote")


def test_only_the_layers_above_import_control() -> None:
    """The guard process and its backstop use core alone: they never load the flow that starts
    them (nor the Manager that talks to them), so `control` sits above both."""
    wrong = []
    for name in MODULES:
        if name == "fwsafe.control" or name.startswith("fwsafe.control."):
            continue
        wrong += [f"{name} -> {m}" for m in imports(name, top_level_only=False)
                  if m.startswith("fwsafe.control") and not (
                      name in CONTROL_USERS
                      or name.startswith(tuple(u + "." for u in CONTROL_USERS)))]
    assert wrong == []


def test_rescue_and_ondisk_need_only_the_standard_library() -> None:
    allowed = ("fwsafe.errors", "fwsafe.ondisk", "fwsafe.rescue", "fwsafe.context", "fwsafe")
    for name, path in MODULES.items():
        if not name.startswith(("fwsafe.rescue", "fwsafe.ondisk")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                if mod.startswith("fwsafe"):
                    assert mod == "fwsafe" or mod.startswith(allowed[:-1]), f"{name}: {mod}"
                else:
                    top = mod.split(".")[0]
                    assert top in sys.stdlib_module_names or top == "__future__", f"{name}: {mod}"


def test_the_sandbox_agent_needs_only_the_standard_library() -> None:
    """fwsafe.netns_agent runs by path in the sandbox's namespaces (``python3 -I -S``: no site,
    nothing but the standard library and its own package): it imports nothing else of fwsafe,
    so that the check and the audit may both start it from below them."""
    for name, path in MODULES.items():
        if not name.startswith("fwsafe.netns_agent"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [resolve(name, node)]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                assert mod.startswith("fwsafe.netns_agent") or top in sys.stdlib_module_names \
                    or top == "__future__", f"{name}: {mod}"


def test_context_needs_only_the_standard_library() -> None:
    tree = ast.parse(MODULES["fwsafe.context"].read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            for mod in mods:
                top = mod.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", mod


MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "add", "discard", "update",
            "setdefault", "popitem", "__setitem__"}


def test_no_hidden_channels_outside_the_context_module() -> None:
    """Module-level lists, dicts and sets that some code changes are process-wide channels
    between modules: only fwsafe.context keeps such state (`RUN`). Constants (never changed
    after import) are fine, and so is a module's private cache or lock table (`_NAME`, which
    no other module may touch: see the private-names test)."""
    holders: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign):
                target, value = node.target, node.value
            if isinstance(target, ast.Name) and (
                    isinstance(value, (ast.List, ast.Dict, ast.Set))
                    or (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                        and value.func.id in ("list", "dict", "set", "defaultdict"))):
                holders.setdefault(target.id, set()).add(name)
    changed = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            held = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in MUTATORS:
                held = node.func.value
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                held = next((t.value for t in targets if isinstance(t, ast.Subscript)), None)
            elif isinstance(node, ast.Global):
                changed += [f"{name}: global {n}" for n in node.names if not n.startswith("_")]
            if isinstance(held, ast.Attribute):   # module.NAME.append(...)
                held = ast.Name(id=held.attr)
            if isinstance(held, ast.Name) and held.id in holders and held.id.isupper() \
                    and not held.id.startswith("_"):   # a private cache or lock table is no channel
                changed.append(f"{name}: changes {held.id} (of {sorted(holders[held.id])})")
    assert changed == [], "\n".join(changed)


def test_every_module_has_a_name_of_its_own() -> None:
    """A module's file name says what it is without its folder: no two modules share a basename
    (four sshd.py in four folders made every reader ask which one). Package files aside."""
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_class_is_too_large_to_read() -> None:
    large = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    large.append(f"{name}.{node.name}: {size} lines")
    assert large == []


# Modules over MAX_MODULE_LINES left for now, each with why (take it off once it is split).
LONG_MODULES_LEFT: dict[str, str] = {}


def test_no_module_is_too_long_to_read() -> None:
    """A module is one role a newcomer reads in one sitting: none over MAX_MODULE_LINES lines
    (split along its seams, each part named for its role), but for those listed with why."""
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    over = sorted(f"{name}: {lines} lines" for name, lines in long.items()
                  if lines > MAX_MODULE_LINES and name not in LONG_MODULES_LEFT)
    assert over == [], "\n".join(over)
    short = sorted(name for name in LONG_MODULES_LEFT if long.get(name, 0) <= MAX_MODULE_LINES)
    assert short == [], "short enough now: take it off LONG_MODULES_LEFT"


def test_test_files_have_unique_names() -> None:
    """pytest imports test modules by basename (rootdir-relative, no packages): two files of
    the same name in tests/unit and tests/lab stop the whole run at collection."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


LAYER_NAMES = {"ipv4", "ipv6", "ipv4-legacy", "ipv6-legacy", "nft", "ufw", "firewalld", "sshd"}
# The registry itself, and the standard-library-only modules for the offline rescue tool (which
# cannot import it: they know the on-disk formats' own layer names).
LAYER_REGISTRY = ("fwsafe.backends", "fwsafe.rescue", "fwsafe.ondisk")


def test_layer_facts_live_in_the_registry() -> None:
    """Which layers are netfilter, files, checked for a lockout, ... is asked of the registry
    (fwsafe.backends: `layers_with`, `layer_has`; the facts on each Layer class): a tuple, list
    or set of two or more layer names anywhere else is a second copy of a fact that drifts."""
    found = []
    for name, path in MODULES.items():
        if name in LAYER_REGISTRY or name.startswith(LAYER_REGISTRY[1:]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant)
                         and e.value in LAYER_NAMES]
                if len(names) >= 2:
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == [], "\n".join(found)


# What still keys a dict by a layer name, compares with one, tests one's membership or
# subscripts by one outside the registry (module, the start of the code as ast.unparse gives
# it), each with why it is left. Move a fact onto its backend (a fact in `Layer.facts`, an
# attribute or method of the Layer class, fwsafe.backends.families) and take its line off; a
# new one fails the test below.
LAYER_NAME_BRANCHES_LEFT = {
    # not a layer: a program's or a command's name that happens to be a layer's too
    ("fwsafe.audit.facts", "(proc / pid / 'comm').read_text().strip() != 'sshd'"),
    ("fwsafe.audit.facts", "(proc / ppid / 'comm').read_text().strip() == 'sshd'"),
    ("fwsafe.check.check_report", "run[0].rsplit('/', 1)[-1] == 'ufw'"),
    ("fwsafe.cli.common", "{'apply': 'apply', 'ufw': 'apply', 'firewall-cmd': 'apply', "),
    ("fwsafe.persistence.command_shims", "{'ufw': '/usr/sbin/ufw', "
                                         "'firewall-cmd': '/usr/bin/firewall-cmd'}"),
    ("fwsafe.persistence.command_shims", "tool == 'ufw'"),
    ("fwsafe.persistence.command_shims", "comm == 'sshd'"),
    # `--backend nft`: the option's value, which a user types, picks the nft layer
    ("fwsafe.core.change", "backend == 'nft'"),
    # the remote `fwsafe apply` command line: the ipv4 file is its positional argument, the
    # ipv6 file `--rules6`'s (the options a user types), uploaded under the names of the files
    # on the server, a wire format that remote.scripts.APPLY_SCRIPT names too
    ("fwsafe.remote.scripts", "{'ipv4': 'rules.v4', 'ipv6': 'rules.v6'}"),
    ("fwsafe.remote.arm", "'ipv4' in job.local_paths"),
    ("fwsafe.remote.arm", "'ipv6' in job.local_paths"),
    ("fwsafe.remote.arm", "REMOTE_NAMES['ipv4']"),
    ("fwsafe.remote.arm", "REMOTE_NAMES['ipv6']"),
    # the power cycle reads what the next boot loads with fwsafe.ondisk (the boot files, ufw's
    # files, /etc/firewalld's tree, sshd's) and keeps it under the history format's layer
    # names (fwsafe.ondisk.history_format's, which the rescue tool reads without the
    # registry); it puts /etc/firewalld back as that tree (fwsafe.ondisk.firewalld_files:
    # modes, owners, directories, files that appeared since removed) in place of the rescue
    # plan's (fwsafe.rescue.rescue_plan) writes for that on-disk layer
    ("fwsafe.persistence.powercycle", "layers['ufw']"),
    ("fwsafe.persistence.powercycle", "layers['firewalld']"),
    ("fwsafe.persistence.powercycle", "layers['sshd']"),
    ("fwsafe.persistence.powercycle", "change.layer != 'firewalld'"),
    ("fwsafe.persistence.powercycle", "'firewalld' not in entry.layers"),
    ("fwsafe.persistence.powercycle", "entry.layers['firewalld']"),
}


def _names_a_layer(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value in LAYER_NAMES


def layer_name_branches(tree: ast.AST) -> set[str]:
    """The code (ast.unparse) in `tree` that keys a dict by a layer name (`{"nft": ...}`),
    compares with one (`layer == "nft"`), tests one's membership (`"nft" in layers`,
    `"sshd" not in names`) or subscripts by one (`before["ufw"]`)."""
    found = set()
    for node in ast.walk(tree):
        keyed = isinstance(node, ast.Dict) and any(
            k is not None and _names_a_layer(k) for k in node.keys)
        compared = isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops) and any(
            _names_a_layer(side) for side in (node.left, *node.comparators))
        member = isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
            and _names_a_layer(node.left)
        subscript = isinstance(node, ast.Subscript) and _names_a_layer(node.slice)
        if keyed or compared or member or subscript:
            found.add(ast.unparse(node))
    return found


def test_no_branch_on_a_layer_name_outside_the_registry() -> None:
    """A dict keyed by layer names (`{"nft": [...]}`), a comparison with one (`layer ==
    "nft"`), a membership test (`"nft" in layers`) or a subscript (`before["ufw"]`) outside
    the registry is a layer's fact kept apart from its backend: asked of the registry instead
    (`layer_has(name, NFT_TABLES)`, `first_with(NFT_TABLES, layers)`, `restore_command(name)`,
    `owned_elsewhere`, `Layer.capture_under`, fwsafe.backends.families). What is left is
    listed, with why, above."""
    found = set()
    for name, path in MODULES.items():
        if name.startswith(LAYER_REGISTRY):   # the registry, the backends, the rescue tool
            continue
        found |= {(name, code) for code in layer_name_branches(ast.parse(path.read_text()))}

    def left(module: str, code: str) -> bool:
        return any(module == m and code.startswith(start) for m, start in LAYER_NAME_BRANCHES_LEFT)

    assert sorted(f for f in found if not left(*f)) == []
    moved = [(m, start) for m, start in LAYER_NAME_BRANCHES_LEFT
             if not any(m == module and code.startswith(start) for module, code in found)]
    assert moved == [], "moved: take it off the list"


def test_the_layer_name_check_sees_each_kind_of_branch() -> None:
    code = ('x = {"nft": 1}\nif name == "ufw":\n    pass\nif "nft" in layers:\n    pass\n'
            'if "sshd" not in names:\n    pass\ny = before["ufw"]\n'
            'z = name in ("a",)\nw = before[name]\nv = "nft" if a else "b"\n')
    assert layer_name_branches(ast.parse(code)) == {
        "{'nft': 1}", "name == 'ufw'", "'nft' in layers", "'sshd' not in names", "before['ufw']"}


def _import_blocks(body: list[ast.stmt]) -> list[list[ast.stmt]]:
    """The runs of import statements one after the other in a statement list (blank lines
    between them or not: one block, as isort groups them)."""
    blocks: list[list[ast.stmt]] = []
    previous: ast.stmt | None = None
    for statement in body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            if isinstance(previous, (ast.Import, ast.ImportFrom)):
                blocks[-1].append(statement)
            else:
                blocks.append([statement])
        previous = statement
    return blocks


def test_every_function_local_import_says_why() -> None:
    """An import inside a function is a choice (the CLI starts faster, the guard stays small,
    paramiko is slow to load): a comment on the line above the block of imports (or on one of
    its lines) says which, so that nobody moves it up, or adds one out of habit."""
    silent = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        for function in ast.walk(ast.parse(text)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            todo: list[ast.AST] = [function]
            while todo:
                node = todo.pop()
                for field in ("body", "orelse", "finalbody", "handlers"):
                    body = getattr(node, field, None)
                    if not isinstance(body, list):
                        continue
                    for block in _import_blocks([s for s in body if isinstance(s, ast.stmt)]):
                        first, last = block[0], block[-1]
                        said = lines[first.lineno - 2].strip().startswith("#") or any(
                            "#" in lines[n - 1]
                            for n in range(first.lineno, (last.end_lineno or last.lineno) + 1))
                        if not said:
                            silent.append(f"{name}:{first.lineno}: {ast.unparse(first)}")
                    todo += [s for s in body if isinstance(s, ast.AST) and not isinstance(
                        s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    assert silent == [], "function-local imports without a comment saying why:\n" + \
        "\n".join(silent)


#: Readers or writers of iptables-save text allowed outside fwsafe/backends/iptsave.py: its
#: lowest level, the line reader (fwsafe.ondisk.iptsave_lines: standard library only, for the
#: history's normal form too), the rescue tool (standard library only, by rule: an empty table)
#: and the lab's demo script.
IPTSAVE_ELSEWHERE = ("fwsafe.ondisk.iptsave_lines", "fwsafe.rescue.rescue_plan", "fwsafe.lab.lab_demo")
_IPTSAVE_LITERALS = ("COMMIT", "^\\*", "\\n\\*", "^:(", "^\\[(")


def _iptsave_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """The string literals (docstrings aside) of a module that read or write iptables-save's
    frame: COMMIT, a regex for `*table`, `:CHAIN` or `[counters]` at a line's start, an
    f-string that starts `*{table}`."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings \
                and any(part in node.value for part in _IPTSAVE_LITERALS):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr) and len(node.values) > 1 \
                and isinstance(node.values[0], ast.Constant) \
                and node.values[0].value in ("*", "\n*") \
                and isinstance(node.values[1], ast.FormattedValue):
            found.append((node.lineno, "f'*{...}'"))
    return sorted(found)


def test_one_reader_and_writer_of_iptables_save_text() -> None:
    """iptables-save text is parsed and written by fwsafe.backends.iptsave (its blocks,
    declaration, uncounted, parse_ruleset, table_text, render) on the line reader of
    fwsafe.ondisk.iptsave_lines (which the history's normal form uses too): no second parser
    comes back."""
    for name, path in MODULES.items():
        if name.startswith("fwsafe.backends") or name in IPTSAVE_ELSEWHERE:
            continue
        assert not _iptsave_literals(ast.parse(path.read_text())), \
            f"{name}: read or write iptables-save text with fwsafe.backends.iptsave"


def test_the_iptables_save_check_sees_a_second_parser() -> None:
    code = 'import re\nX = re.compile(r"^:(\\S+)")\nif line == "COMMIT":\n    pass\n' \
           'y = f"*{table}\\n"\n'
    assert [line for line, _ in _iptsave_literals(ast.parse(code))] == [2, 3, 5]
    assert not _iptsave_literals(ast.parse('"""A docstring on COMMIT."""\nz = f"a*{b}"\n'))
