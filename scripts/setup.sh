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

step() {  # step "what" command...: run quietly, show the log's tail when it fails
    local what=$1; shift
    printf 'setup.sh: %s ... ' "$what"
    if "$@" >> "$LOG" 2>&1; then
        echo ok
    else
        local rc=$?
        echo "FAILED (exit $rc)"
        echo "---- last lines of $LOG ----" >&2
        tail -n 40 "$LOG" >&2
        exit "$rc"
    fi
}

packages=(iptables nftables ufw ipset openssh-server openssh-client iproute2 util-linux procps
          python3 python3-venv)
if [ "${1:-}" = "--test" ]; then
    packages+=(fail2ban docker.io busybox-static systemd-container mmdebstrap)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done

install_packages() {
    # Daemons installed here (fail2ban, docker) must not start on this machine: the tests run
    # them inside lab namespaces only. A policy-rc.d that denies every start is in place while
    # apt runs, unless the machine already has one.
    local own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    apt-get update -q && apt-get install -y -q --no-install-recommends "$@" || rc=$?
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    return "$rc"
}

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
echo "setup.sh: ready ($(.venv/bin/fwsafe --version)); full log: $LOG"
