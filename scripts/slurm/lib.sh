# Shared by up.sh and down.sh: where the one-node cluster keeps its files, and pid helpers.
# Paths are Debian's defaults, so that sinfo/sbatch/sacct find /etc/slurm/slurm.conf unaided.
SLURM_ETC=${SLURM_ETC:-/etc/slurm}
SLURM_RUN=${SLURM_RUN:-/run/slurm}
SLURM_LOG=${SLURM_LOG:-/var/log/slurm}
SLURM_STATE=${SLURM_STATE:-/var/lib/slurm}
MUNGE_RUN=/run/munge
MYSQL_RUN=/run/mysqld
CLUSTER=${SLURM_CLUSTER:-mllmrec}

# name|pid file, in start order (down.sh stops them in reverse)
DAEMONS="munged|$MUNGE_RUN/munged.pid mariadbd|$MYSQL_RUN/mysqld.pid slurmdbd|$SLURM_RUN/slurmdbd.pid slurmctld|$SLURM_RUN/slurmctld.pid slurmd|$SLURM_RUN/slurmd.pid"

say() { printf 'slurm: %s\n' "$*"; }
die() { printf 'slurm: error: %s\n' "$*" >&2; exit 1; }

pidfile_of() {  # pidfile_of <daemon>
    local entry
    for entry in $DAEMONS; do
        [ "${entry%%|*}" = "$1" ] && { echo "${entry#*|}"; return; }
    done
}

# the pid in the daemon's pid file when that process is alive and is that daemon, else nothing
live_pid() {
    local pidfile pid
    pidfile=$(pidfile_of "$1")
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc 0-9 < "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$1" ] || return 1
    echo "$pid"
}

# wait_for <seconds> <what> <command...>: rerun the command until it succeeds, or fail naming <what>
wait_for() {
    local limit=$1 what=$2 start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - start)) -lt "$limit" ] || return 1
        sleep 0.5
    done
}
