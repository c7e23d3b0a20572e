#!/usr/bin/env bash
# Set up, then show fwsafe's main job in a throwaway namespace lab (this machine's own firewall
# is never touched).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fwsafe demo "$@"
