#!/usr/bin/env bash
# Stop the one-node SLURM cluster of up.sh: each daemon by the pid in its pid file (never by name),
# in reverse start order; SIGTERM, then SIGKILL after 20 s. State, accounting and config stay.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

stop() {
    local name=$1 pid waited=0
    if ! pid=$(live_pid "$name"); then
        say "$name: not running"
        return
    fi
    kill -TERM "$pid"
    while [ -d "/proc/$pid" ] && [ "$waited" -lt 40 ]; do sleep 0.5; waited=$((waited + 1)); done
    if [ -d "/proc/$pid" ]; then
        say "$name (pid $pid) still running after 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    say "$name (pid $pid) stopped"
}

[ "$(id -u)" = 0 ] || die "make slurm-down needs root (the daemons run as root or as their users)"
for entry in $(echo "$DAEMONS" | tr ' ' '\n' | tac); do
    stop "${entry%%|*}"
done
