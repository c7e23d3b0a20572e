#!/usr/bin/env bash
# Set up fwsafe on a fresh Debian/Ubuntu machine, as root: the real firewall tools, sshd for the
# lab, and fwsafe itself (with its test tools) in a virtualenv at .venv.
#
#   bash scripts/setup.sh           what the demo needs
#   bash scripts/setup.sh --test    also what the whole test suite needs: fail2ban, docker.io
#                                   and busybox-static (run inside lab namespaces only), and
#                                   systemd-container + mmdebstrap (the systemd lab)
#
# One line per step; the full output of every step goes to .venv-setup.log, shown on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root (or with sudo)" >&2; exit 2; fi
export DEBIAN_FRONTEND=noninteractive
LOG="$PWD/.venv-setup.log"
: > "$LOG"

NAME=setup.sh
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

packages=(iptables nftables ufw ipset openssh-server openssh-client iproute2 util-linux procps
          python3 python3-venv)
if [ "${1:-}" = "--test" ]; then
    packages+=(fail2ban docker.io busybox-static systemd-container mmdebstrap)
fi
mapfile -t missing < <(missing_packages "${packages[@]}")


if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}" install_packages "${missing[@]}"
else
    echo "setup.sh: system packages ... already installed"
fi
mkdir -p /run/sshd
if [ ! -x .venv/bin/python ]; then
    step "create .venv (python3 -m venv)" /usr/bin/python3 -m venv .venv
fi
step "upgrade pip in .venv" .venv/bin/python -m pip install --upgrade pip
step "install fwsafe and its test tools into .venv (pip install -e .[test])" \
    .venv/bin/python -m pip install -e '.[test]'
echo "setup.sh: ready ($(.venv/bin/fwsafe --version | head -n 1)); full log: $LOG"
