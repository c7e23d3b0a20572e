"""The rescue tool as one file: a zipapp of the standard-library-only modules it needs
(`python3 -m fwsafe.rescue --build-zipapp OUT`; the boot hook keeps one in the state
directory). Standard library only, bundled in the zipapp itself.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

from fwsafe.ondisk.atomic_files import write_file_atomically

ZIPAPP_MODULES = ("errors.py", "ondisk/__init__.py", "ondisk/atomic_files.py", "ondisk/ufw_files.py",
                  "ondisk/sshd_files.py", "ondisk/firewalld_files.py", "ondisk/iptsave_lines.py",
                  "ondisk/history_format.py", "ondisk/nft_text.py", "ondisk/boot.py",
                  "rescue/__init__.py", "rescue/tool.py",
                  "rescue/rescue_plan.py", "rescue/rescue_write.py", "rescue/rescue_zipapp.py")
ZIPAPP_MAIN = (
    "# fwsafe rescue, as a single file: python3 fwsafe.pyz rescue --root /mnt --list\n"
    "import sys\n\n"
    "from fwsafe.rescue.tool import main\n\n"
    "sys.exit(main())\n"
)


def build_zipapp(out: Path, *, mode: int = 0o755) -> Path:
    """Write the rescue tool as one file: stdlib-only modules and a __main__ (atomically)."""
    source = Path(__file__).resolve().parent.parent   # the fwsafe package
    version = "0"
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (source / "__init__.py").read_text())
    if match:
        version = match.group(1)
    stamp = (2020, 1, 1, 0, 0, 0)
    buffer = io.BytesIO()
    buffer.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        def add(name: str, text: str) -> None:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, text)

        add("__main__.py", ZIPAPP_MAIN)
        add("fwsafe/__init__.py", f'"""fwsafe rescue (zipapp)."""\n\n__version__ = "{version}"\n')
        for name in ZIPAPP_MODULES:
            add(f"fwsafe/{name}", (source / name).read_text())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out, buffer.getvalue(), mode)
    return out


