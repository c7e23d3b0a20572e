#!/usr/bin/env bash
# Roll a firewall change out to several hosts with `fwsafe apply --host`, one host at a time.
#
# Each change is made under the host's dead-man's switch and kept only if a NEW SSH login to
# the host works afterwards (established connections survive rules that drop new ones, so the
# old session proves nothing). The rollout stops at the first host that does not end up
# confirmed, so a bad rule set never reaches the next host.
#
# Usage:
#   deploy.sh [-t SECONDS] [-i KEY] [-k KNOWN_HOSTS] [-6 RULES6] [-p PROBE]... RULES HOST...
#
#   HOST is [USER@]HOST[:PORT] (IPv6 in brackets: root@[2001:db8::10]) or a [hosts.NAME]
#   from fwsafe's configuration. Every option is passed on to `fwsafe apply`.
#
# Example:
#   deploy.sh -t 60 -i ~/.ssh/deploy_ed25519 -6 web.rules6 -p tcp://127.0.0.1:443 \
#       web.rules web1 web2 root@[2001:db8::12]
#
# Exit status: 0 if every host confirmed, else fwsafe's exit code for the host that stopped
# the rollout (see `fwsafe --help`). The JSON result of every host goes to ./deploy-logs/.

set -u

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

args=()
while getopts "t:i:k:6:p:h" opt; do
    case "$opt" in
        t) args+=(--timeout "$OPTARG") ;;
        i) args+=(-i "$OPTARG") ;;
        k) args+=(--known-hosts "$OPTARG") ;;
        6) args+=(--rules6 "$OPTARG") ;;
        p) args+=(--probe "$OPTARG") ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || usage
rules=$1
shift

fwsafe=${FWSAFE:-fwsafe}
logdir=${DEPLOY_LOGS:-./deploy-logs}
mkdir -p "$logdir" || exit 2
done_hosts=()

say() { printf '%s deploy: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

summary() {
    if [ ${#done_hosts[@]} -gt 0 ]; then
        say "hosts that KEEP the new rules: ${done_hosts[*]+${done_hosts[*]}}"
    else
        say "no host was changed"
    fi
}

for host in "$@"; do
    log="$logdir/$(printf '%s' "$host" | tr -c 'A-Za-z0-9._-' '_').json"
    say "=== $host: applying $rules"
    "$fwsafe" apply --host "$host" --json ${args[@]+"${args[@]}"} "$rules" >"$log"
    code=$?
    case $code in
        0)
            say "$host: confirmed through a new SSH login; the new rules stay ($log)"
            done_hosts+=("$host")
            continue
            ;;
        2)
            say "$host: usage or configuration error (see above); nothing was changed"
            ;;
        3)
            say "$host: REJECTED before any change (invalid rules, unknown or changed host key,"
            say "        host unreachable): nothing was changed there. Fix the cause and rerun."
            ;;
        4)
            say "$host: REVERTED: the change was applied, then undone (no new SSH login got in,"
            say "        or a probe failed). The old rules are back on $host. Stopping the rollout"
            say "        so the other hosts do not get the same rules."
            ;;
        5)
            say "$host: !!! REVERT FAILED or STATE UNKNOWN !!! The host may still hold the new"
            say "        rules. Reach it (console if need be) and run: fwsafe status; fwsafe recover"
            ;;
        6)
            say "$host: another fwsafe change is pending there; confirm or revert it first"
            ;;
        *)
            say "$host: fwsafe exited with unexpected status $code"
            ;;
    esac
    say "details: $(cat "$log" 2>/dev/null)"
    summary
    exit "$code"
done

say "all ${#done_hosts[@]} host(s) confirmed"
summary
exit 0
