#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (unit + lab tests with real sshd,
# netfilter, nft and ufw in network namespaces). Needs root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check fwsafe tests bench
.venv/bin/mypy fwsafe
exec .venv/bin/python -m pytest -v -rs --durations=25 -p no:cacheprovider "$@"
