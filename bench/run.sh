#!/usr/bin/env bash
# Run the benchmarks (needs root; everything happens in network namespaces of its own).
# Arguments go to `python3 -m bench`, e.g. --quick or --json-out PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "${PYTHON:-python3}" -m bench "$@"
