# Shell helpers shared by scripts/setup.sh and scripts/build-deb.sh (sourced, not run).
# The sourcing script sets LOG (the file every step's output goes to) and NAME (its own name).

step() {  # step "what" command...: run quietly, show the log's tail when it fails
    local what=$1; shift
    printf '%s: %s ... ' "$NAME" "$what"
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

missing_packages() {  # missing_packages PKG...: print those not installed, one a line
    local p
    for p in "$@"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || echo "$p"
    done
}

install_packages() {
    # Nothing installed here may start a service on this machine (fail2ban and docker run
    # inside lab namespaces only): a policy-rc.d that denies every start is in place while apt
    # runs, unless the machine already has one.
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
