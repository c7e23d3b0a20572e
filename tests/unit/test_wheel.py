"""pip and pipx: a wheel built from this tree gives a working `fwsafe` in a fresh virtualenv.

pip builds the wheel as `python -m build` and `pipx install .` do: in an isolated environment
with the setuptools of the day (from PyPI), from a copy of the tree (so that the build writes
nothing into the checkout). The build must say nothing about the license (the LICENSE file is
found by setuptools' default patterns, here as with Debian 12's setuptools 66). The wheel goes
into a new virtualenv with `--no-deps`; click and paramiko come from this interpreter's
site-packages through a .pth file (its editable fwsafe is not seen: a .pth in a plain path entry
is not processed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _copy_tree(dest: Path) -> Path:
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "fwsafe", dest / "fwsafe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_a_wheel_builds_without_license_warnings_and_runs(tmp_path: Path) -> None:
    src = _copy_tree(tmp_path / "src")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(wheels), str(src)],
        capture_output=True, text=True, timeout=600, check=False)
    output = build.stdout + build.stderr
    assert build.returncode == 0, output[-4000:]
    noisy = [ln for ln in output.splitlines() if "licen" in ln.lower()
             and any(word in ln.lower() for word in ("warn", "deprecat", "error"))]
    assert noisy == [], "\n".join(noisy)

    [wheel] = wheels.glob("fwsafe-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert any(n.startswith(f"{info}/") and n.endswith("/LICENSE") or n == f"{info}/LICENSE"
               for n in names), names
    assert "License-File: LICENSE" in metadata
    assert "fwsafe = fwsafe.entry:main" in entry_points
    assert "fwsafe/rescue/tool.py" in names and not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--disable-pip-version-check", str(wheel)],
                   check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(tmp_path)}
    fwsafe = venv / "bin" / "fwsafe"
    version = subprocess.run([str(fwsafe), "--version"], capture_output=True, text=True,
                             timeout=60, env=env, cwd=tmp_path, check=False)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("fwsafe, version "), version.stdout
    assert f"installed: pip ({venv}" in version.stdout, version.stdout
    helped = subprocess.run([str(fwsafe), "--help"], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path, check=False)
    assert helped.returncode == 0 and "apply" in helped.stdout, helped.stderr
    where = subprocess.run([str(python), "-c", "import fwsafe; print(fwsafe.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path,
                           check=True).stdout.strip()
    assert where.startswith(str(site)), where   # the wheel's fwsafe, not the checkout's
