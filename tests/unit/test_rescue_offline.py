"""`fwsafe rescue` on a fake server root: no netfilter, no lab needed. Runs the real command
(the module, the click CLI and the zipapp) as subprocesses."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwsafe.core.statedir import StateDir
from fwsafe.errors import ExitCode
from fwsafe.ondisk import boot
from fwsafe.ondisk.ufw_files import capture_ufw_files
from fwsafe.persistence import known_good
from fwsafe.rescue import rescue_plan, rescue_zipapp
from fwsafe.rescue import tool as rescue

GOOD_V4 = (
    "*filter\n"
    ":INPUT DROP [0:0]\n"
    ":FORWARD DROP [0:0]\n"
    ":OUTPUT ACCEPT [0:0]\n"
    "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n"
    "COMMIT\n"
)
BAD_V4 = (
    "*filter\n"
    ":INPUT DROP [0:0]\n"
    ":FORWARD DROP [0:0]\n"
    ":OUTPUT ACCEPT [0:0]\n"
    "-A INPUT -p tcp -m tcp --dport 22 -j DROP\n"
    "COMMIT\n"
)
V6 = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
GOOD_USER_RULES = (
    "*filter\n"
    "### tuple ### allow tcp 22 0.0.0.0/0 any 0.0.0.0/0 in\n"
    "-A ufw-user-input -p tcp --dport 22 -j ACCEPT\n"
    "COMMIT\n"
)
BAD_USER_RULES = (
    "*filter\n"
    "### tuple ### deny tcp 22 0.0.0.0/0 any 0.0.0.0/0 in\n"
    "-A ufw-user-input -p tcp --dport 22 -j DROP\n"
    "COMMIT\n"
)
DEBIAN_NFT_CONF = (
    "#!/usr/sbin/nft -f\n"
    "\n"
    "flush ruleset\n"
    "\n"
    "table inet filter {\n"
    "\tchain input {\n"
    "\t\ttype filter hook input priority filter;\n"
    "\t}\n"
    "}\n"
)
GOOD_NFT = (
    "table inet fw {\n"
    "\tchain input {\n"
    "\t\ttype filter hook input priority filter; policy drop;\n"
    "\t\ttcp dport 22 accept\n"
    "\t}\n"
    "}\n"
)


def put(root: Path, path: str, text: str, mode: int = 0o644) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    return p


def server_root(tmp_path: Path) -> Path:
    """A server disk: ufw, netfilter-persistent and nftables; a known-good state recorded; then
    broken by hand (SSH dropped in rules.v4 and in ufw's user.rules)."""
    root = tmp_path / "mnt"
    put(root, "/etc/ufw/ufw.conf", "# ufw.conf\nENABLED=yes\nLOGLEVEL=low\n")
    put(root, "/etc/ufw/user.rules", GOOD_USER_RULES, 0o640)
    put(root, "/etc/ufw/before.rules", "*filter\nCOMMIT\n", 0o640)
    put(root, "/etc/ufw/applications.d/openssh-server", "[OpenSSH]\nports=22/tcp\n")
    put(root, "/etc/default/ufw", 'DEFAULT_INPUT_POLICY="DROP"\n')
    put(root, "/etc/iptables/rules.v4", GOOD_V4, 0o640)
    put(root, "/etc/iptables/rules.v6", V6, 0o640)
    put(root, "/etc/nftables.conf", DEBIAN_NFT_CONF, 0o755)
    state = StateDir(root / "var/lib/fwsafe")
    state.ensure()
    known_good.add_entry(state, {"ipv4": GOOD_V4.encode(), "ipv6": V6.encode(), "nft": GOOD_NFT.encode(),
                              "ufw": capture_ufw_files(root)},
                      {"tx": "T1", "who": {"SUDO_USER": "alice"}}, now=time.time() - 60,
                      entry_id="20260101T000000Z-good")
    # what persist wrote on that confirm
    for layer in ("ipv4", "ipv6", "nft"):
        content = {"ipv4": GOOD_V4, "ipv6": V6, "nft": GOOD_NFT}[layer].encode()
        put(root, boot.BOOT_FILES[layer],
            boot.boot_file_content(layer, content, "20260101T000000Z-good",
                                     flush_ruleset=False).decode(),
            boot.BOOT_FILE_MODES[layer])
    # the bad change, made by hand
    put(root, "/etc/iptables/rules.v4", BAD_V4, 0o640)
    put(root, "/etc/ufw/user.rules", BAD_USER_RULES, 0o640)
    put(root, "/etc/ufw/applications.d/extra", "[Extra]\nports=9/tcp\n")
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file under root/etc with its hash and mode (to prove nothing changed)."""
    out = {}
    for dirpath, _, files in os.walk(root / "etc"):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = (
                hashlib.sha256(p.read_bytes()).hexdigest() + f" {p.stat().st_mode & 0o7777:o}")
    return out


def run_rescue(*args: str, via: str = "module", stdin: str | None = "",
               ) -> subprocess.CompletedProcess[str]:
    argv = {"module": [sys.executable, "-m", "fwsafe.rescue", "rescue"],
            "cli": [sys.executable, "-m", "fwsafe", "rescue"]}[via]
    return subprocess.run([*argv, *args], capture_output=True, text=True, input=stdin,
                          timeout=60, check=False)


def test_last_good_restores_every_boot_file_and_keeps_backups(tmp_path: Path) -> None:
    root = server_root(tmp_path)
    result = run_rescue("--root", str(root), "--last-good", "--yes")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "-A INPUT -p tcp -m tcp --dport 22 -j DROP" in out           # the diff was shown
    assert "+-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in out
    assert "umount" in out and "fwsafe status" in out
    v4 = (root / "etc/iptables/rules.v4").read_bytes()
    assert v4 == boot.boot_file_content("ipv4", GOOD_V4.encode(), "20260101T000000Z-good")
    assert (root / "etc/iptables/rules.v4.fwsafe-bak").read_text() == BAD_V4
    assert (root / "etc/ufw/user.rules").read_text() == GOOD_USER_RULES
    assert (root / "etc/ufw/user.rules").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/ufw/user.rules.fwsafe-bak").read_text() == BAD_USER_RULES
    # a profile that did not exist then is moved out of applications.d (ufw reads all of it)
    assert not (root / "etc/ufw/applications.d/extra").exists()
    assert (root / "etc/ufw/applications.d.fwsafe-bak/extra").exists()
    assert (root / "etc/nftables.conf").read_text().count("table inet fw") == 3
    # a second run has nothing to do
    again = run_rescue("--root", str(root), "--last-good", "--yes")
    assert again.returncode == 0 and "nothing to write" in again.stdout


def test_without_tty_and_without_yes_it_refuses(tmp_path: Path) -> None:
    root = server_root(tmp_path)
    before = tree(root)
    result = run_rescue("--root", str(root), "--last-good")
    assert result.returncode == int(ExitCode.USAGE)
    assert "--yes" in result.stderr and "=== replace /etc/iptables/rules.v4" in result.stdout
    assert tree(root) == before


def _pty_run(argv: list[str], answer: bytes) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(argv[0], argv)
    seen = b""
    sent = False
    end = time.monotonic() + 30
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        if not sent and b"Type 'yes'" in seen:
            os.write(fd, answer)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_on_a_terminal_it_asks(tmp_path: Path) -> None:
    root = server_root(tmp_path)
    before = tree(root)
    argv = [sys.executable, "-m", "fwsafe.rescue", "rescue", "--root", str(root), "--last-good"]
    code, out = _pty_run(argv, b"y\r")
    assert code == int(ExitCode.REJECTED) and "nothing written" in out
    assert tree(root) == before
    code, out = _pty_run(argv, b"yes\r")
    assert code == 0, out
    assert (root / "etc/ufw/user.rules").read_text() == GOOD_USER_RULES


def test_disable_firewall(tmp_path: Path) -> None:
    root = server_root(tmp_path)
    result = run_rescue("--root", str(root), "--disable-firewall", "--yes", via="cli")
    assert result.returncode == 0, result.stderr
    conf = (root / "etc/ufw/ufw.conf").read_text()
    assert "ENABLED=no\n" in conf and "ENABLED=yes" not in conf and "LOGLEVEL=low" in conf
    for name in ("rules.v4", "rules.v6"):
        text = (root / "etc/iptables" / name).read_text()
        assert text == rescue_plan.ACCEPT_ALL_IPTABLES
    assert (root / "etc/nftables.conf").read_text() == rescue_plan.ACCEPT_ALL_NFT
    assert (root / "etc/nftables.conf").stat().st_mode & 0o777 == 0o755
    assert "WITHOUT a firewall" in result.stdout
    assert run_rescue("--root", str(root), "--disable-firewall", "--to", "x").returncode == 2


def test_missing_and_damaged_state_change_nothing(tmp_path: Path) -> None:
    root = server_root(tmp_path)
    before = tree(root)
    missing = run_rescue("--root", str(root), "--last-good", "--yes",
                         "--state-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 3 and "no fwsafe state directory" in missing.stderr
    entry = root / "var/lib/fwsafe/history/20260101T000000Z-good"
    (entry / "ipv4.rules").write_text("*filter\n:INPUT DROP [0:0]\nCOMMIT\n")
    damaged = run_rescue("--root", str(root), "--last-good", "--yes")
    assert damaged.returncode == 3 and "checksum" in damaged.stderr, damaged.stderr
    explicit = run_rescue("--root", str(root), "--to", "20260101T000000Z-good", "--yes")
    assert explicit.returncode == 3 and "damaged" in explicit.stderr
    (entry / "meta.json").write_text("{ not json")
    garbled = run_rescue("--root", str(root), "--list")
    assert garbled.returncode == 3 and "DAMAGED" in garbled.stdout
    assert tree(root) == before
    other = server_root(tmp_path / "other")
    before = tree(other)
    state = other / "var/lib/fwsafe"
    shutil.rmtree(state)
    state.write_text("not a directory\n")
    broken = run_rescue("--root", str(other), "--last-good", "--yes")
    assert broken.returncode == 3 and "not a directory" in broken.stderr
    assert tree(other) == before


def test_unknown_id_and_list_and_json(tmp_path: Path) -> None:
    root = server_root(tmp_path)
    listed = run_rescue("--root", str(root), "--list")
    assert listed.returncode == 0 and "20260101T000000Z-good" in listed.stdout
    assert "<- last good" in listed.stdout and "alice" in listed.stdout
    unknown = run_rescue("--root", str(root), "--to", "nope", "--yes")
    assert unknown.returncode == 3 and "no snapshot 'nope'" in unknown.stderr
    data = json.loads(run_rescue("--root", str(root), "--to", "2026", "--yes", "--json").stdout)
    assert data["ok"] and data["entry"]["id"] == "20260101T000000Z-good"
    assert "/etc/iptables/rules.v4" in data["written"] and data["next_steps"]
    assert run_rescue("--root", str(tmp_path / "absent"), "--list").returncode == 2


def test_only_files_the_server_uses(tmp_path: Path) -> None:
    """A server without netfilter-persistent and ufw: only nftables.conf is written."""
    root = tmp_path / "mnt"
    put(root, "/etc/nftables.conf", DEBIAN_NFT_CONF, 0o755)
    state = StateDir(root / "var/lib/fwsafe")
    state.ensure()
    known_good.add_entry(state, {"ipv4": GOOD_V4.encode(), "nft": GOOD_NFT.encode()}, {}, now=1.0)
    result = run_rescue("--root", str(root), "--last-good", "--yes")
    assert result.returncode == 0, result.stderr
    assert not (root / "etc/iptables").exists() and not (root / "etc/ufw").exists()
    assert "does not use netfilter-persistent" in result.stdout
    text = (root / "etc/nftables.conf").read_text()
    assert "flush ruleset" in text and "tcp dport 22 accept" in text


def test_pending_baseline_before_any_confirm(tmp_path: Path) -> None:
    root = tmp_path / "mnt"
    put(root, "/etc/iptables/rules.v4", BAD_V4, 0o640)
    tx = root / "var/lib/fwsafe/tx/20260101T000000Z-aaaa"
    tx.mkdir(parents=True)
    (tx / "before.ipv4").write_text("# Generated\n" + GOOD_V4)
    (tx / "record.json").write_text(json.dumps({"created": 5.0, "who": {}}))
    result = run_rescue("--root", str(root), "--to", "baseline", "--yes")
    assert result.returncode == 0, result.stderr
    assert (root / "etc/iptables/rules.v4").read_text().endswith(GOOD_V4)
    assert "has no ipv6 layer" in result.stdout


def test_zipapp_with_a_bare_python(tmp_path: Path) -> None:
    pyz = tmp_path / "dist/fwsafe.pyz"
    built = subprocess.run([sys.executable, "-m", "fwsafe.rescue", "--build-zipapp", str(pyz)],
                           capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    import zipfile

    assert sorted(zipfile.ZipFile(pyz).namelist()) == [
        "__main__.py", "fwsafe/__init__.py", "fwsafe/errors.py", "fwsafe/ondisk/__init__.py",
        "fwsafe/ondisk/atomic_files.py", "fwsafe/ondisk/boot.py", "fwsafe/ondisk/firewalld_files.py",
        "fwsafe/ondisk/history_format.py", "fwsafe/ondisk/iptsave_lines.py",
        "fwsafe/ondisk/nft_text.py", "fwsafe/ondisk/sshd_files.py", "fwsafe/ondisk/ufw_files.py",
        "fwsafe/rescue/__init__.py", "fwsafe/rescue/rescue_plan.py", "fwsafe/rescue/rescue_write.py",
        "fwsafe/rescue/rescue_zipapp.py", "fwsafe/rescue/tool.py"]
    assert stat.S_IMODE(pyz.stat().st_mode) == 0o755
    root = server_root(tmp_path)
    pythons = [sys.executable] + [p for p in (os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3"),
                                              "/usr/bin/python3") if os.access(p, os.X_OK)]
    for python in pythons:  # -I -S: no site-packages at all, so no click and no fwsafe install
        result = subprocess.run([python, "-I", "-S", str(pyz), "rescue", "--root", str(root),
                                 "--list"], capture_output=True, text=True, cwd=tmp_path,
                                timeout=60, check=False)
        assert result.returncode == 0, (python, result.stderr)
    result = subprocess.run([pythons[-1], "-I", "-S", str(pyz), "rescue", "--root", str(root),
                             "--last-good", "--yes"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert (root / "etc/ufw/user.rules").read_text() == GOOD_USER_RULES


def _module_name(bundled: str) -> str:
    """fwsafe/ondisk/boot.py -> fwsafe.ondisk.boot; fwsafe/ondisk/__init__.py -> fwsafe.ondisk"""
    name = "fwsafe." + bundled[:-len(".py")].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


@pytest.mark.parametrize("module", rescue_zipapp.ZIPAPP_MODULES)
def test_rescue_modules_use_the_standard_library_only(module: str) -> None:
    """Every module the zipapp bundles imports the standard library and bundled modules only
    (so that the zipapp runs under `python3 -I -S`, and nothing it needs is left out)."""
    source = (Path(rescue.__file__).parent.parent / module).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module if node.module.startswith("fwsafe") else
                         node.module.split(".")[0])
    fwsafe_mods = {m for m in imported if m.startswith("fwsafe")}
    assert fwsafe_mods <= {_module_name(m) for m in rescue_zipapp.ZIPAPP_MODULES}, fwsafe_mods
    others = imported - fwsafe_mods - {"__future__"}
    assert all(m in sys.stdlib_module_names for m in others), others
    assert "subprocess" not in imported   # the rescue never runs a netfilter tool


def test_firewalld_files_come_back_offline(tmp_path: Path) -> None:
    """A firewalld server: the entry's /etc/firewalld is written back (a zone file that
    appeared is moved aside, a changed one replaced with its mode); nftables.conf gets the
    entry's own tables but never firewalld's (firewalld makes them at its start)."""
    from fwsafe.ondisk.firewalld_files import read_tree, tree_json

    root = tmp_path / "mnt"
    put(root, "/etc/firewalld/firewalld.conf", "DefaultZone=public\n", 0o644)
    put(root, "/etc/firewalld/zones/internal.xml", "<zone>internal</zone>\n", 0o600)
    put(root, "/etc/nftables.conf", DEBIAN_NFT_CONF, 0o755)
    layer = {"running": True, "runtime": None, "kernel": {}, **tree_json(*read_tree(root))}
    nft = ("table inet firewalld {\n\tchain filter_INPUT {\n\t\ttcp dport 22 accept\n\t}\n}\n"
           + GOOD_NFT)
    state = StateDir(root / "var/lib/fwsafe")
    state.ensure()
    known_good.add_entry(state, {"nft": nft.encode(), "firewalld": json.dumps(layer).encode()},
                      {"tx": "T1"}, now=time.time() - 60, entry_id="20260101T000000Z-good")
    put(root, "/etc/firewalld/firewalld.conf", "DefaultZone=drop\n", 0o644)
    put(root, "/etc/firewalld/zones/public.xml", "<zone>no ssh</zone>\n")
    (root / "etc/firewalld/zones/internal.xml").chmod(0o644)
    result = run_rescue("--root", str(root), "--last-good", "--yes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "etc/firewalld/firewalld.conf").read_text() == "DefaultZone=public\n"
    assert not (root / "etc/firewalld/zones/public.xml").exists()
    assert (root / "etc/firewalld/zones/internal.xml").stat().st_mode & 0o777 == 0o600
    conf = (root / "etc/nftables.conf").read_text()
    assert "table inet fw " in conf and "table inet firewalld" not in conf
    again = run_rescue("--root", str(root), "--last-good", "--yes")
    assert again.returncode == 0 and "nothing to write" in again.stdout, again.stdout
