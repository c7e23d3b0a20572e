#!/usr/bin/env bash
# Set up fwsafe on a fresh Debian/Ubuntu machine, as root: the real firewall tools, sshd for the
# lab, and fwsafe itself (with its test tools) in a virtualenv at .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root (sudo)" >&2; exit 2; fi
export DEBIAN_FRONTEND=noninteractive
packages=(iptables nftables ufw ipset openssh-server openssh-client iproute2 util-linux procps python3)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mkdir -p /run/sshd
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || { apt-get install -y -qq python3-venv >/dev/null; python3 -m venv .venv; }
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup.sh: ready ($(.venv/bin/fwsafe --version))"
