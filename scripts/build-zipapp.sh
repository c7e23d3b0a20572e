#!/usr/bin/env bash
# Build the rescue tool as one file, dist/fwsafe.pyz (standard library only, Python 3.9+):
#   python3 dist/fwsafe.pyz rescue --root /mnt --list
# `fwsafe install-boot-hook` also keeps a copy on the server, in its state directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist/fwsafe.pyz}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m fwsafe.rescue --build-zipapp "$out"
