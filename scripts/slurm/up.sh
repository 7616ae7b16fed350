#!/usr/bin/env bash
# A one-node SLURM cluster on this machine from Debian's packages (`make slurm-up`):
# munged, MariaDB + slurmdbd (accounting: sacct), slurmctld and slurmd, with a `debug` default
# partition sized from this machine's CPUs and memory. Installs the packages when missing
# (apt-get; needs root), starts the daemons without systemd, and is idempotent: a daemon that is
# already running is left alone (restarted only when its generated config changed).
# `make slurm-down` (down.sh) stops them by pid. docs/launchers.md walks through a grid on it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
T0=$SECONDS

PACKAGES="munge slurmctld slurmd slurmdbd slurm-client mariadb-server"
[ "$(id -u)" = 0 ] || die "make slurm-up needs root (apt-get install, daemons under their own users); run it as root or with sudo"

install_packages() {
    local missing="" cmd
    for cmd in munged mungekey slurmctld slurmd slurmdbd sinfo sacctmgr mariadbd mariadb; do
        command -v "$cmd" >/dev/null 2>&1 || missing="$missing $cmd"
    done
    [ -z "$missing" ] && return
    say "installing $PACKAGES (missing:$missing)"
    command -v apt-get >/dev/null || die "apt-get not found: install $PACKAGES by hand (Debian/Ubuntu package names)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # policy-rc.d may forbid the packages' own service starts; this script starts them instead
    apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null || die "apt-get install $PACKAGES failed"
    say "installed in $((SECONDS - T0)) s"
}

# render <template> <dest> <mode> <owner>: fill the @KEYS@; prints "changed" when dest changed
render() {
    local tmp
    tmp=$(mktemp "$2.XXXXXX")
    sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" -e "s|@RUN@|$SLURM_RUN|g" \
        -e "s|@LOG@|$SLURM_LOG|g" -e "s|@STATE@|$SLURM_STATE|g" -e "s|@NODE_LINE@|$NODE_LINE|g" \
        -e "s|@GRES_TYPES@|$GRES_TYPES|g" -e "s|@DEF_MEM@|$DEF_MEM|g" -e "s|@DBPASS@|$DBPASS|g" "$1" > "$tmp"
    chmod "$3" "$tmp"
    chown "$4" "$tmp"
    if cmp -s "$tmp" "$2"; then rm -f "$tmp"; else mv -f "$tmp" "$2"; echo changed; fi
}

write_configs() {
    HOST=$(hostname -s)
    # this machine as slurmd sees it: NodeName=<host> CPUs=.. Sockets.. Cores.. RealMemory=..
    NODE_LINE=$(slurmd -C | head -n 1)
    case "$NODE_LINE" in NodeName=*) ;; *) die "slurmd -C did not describe this node: $NODE_LINE" ;; esac
    local cpus mem
    cpus=$(echo "$NODE_LINE" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    mem=$(echo "$NODE_LINE" | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
    DEF_MEM=$((mem / cpus))
    GRES_TYPES=""
    local gpus=0
    command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "$gpus" -gt 0 ]; then  # GPUs become gres gpu:N (the devices listed in gres.conf)
        GRES_TYPES="GresTypes=gpu"
        NODE_LINE="$NODE_LINE Gres=gpu:$gpus"
        printf 'NodeName=%s Name=gpu File=/dev/nvidia[0-%d]\n' "$HOST" $((gpus - 1)) > "$SLURM_ETC/gres.conf"
    fi
    mkdir -p "$SLURM_ETC" "$SLURM_RUN" "$SLURM_LOG" "$SLURM_STATE/slurmctld" "$SLURM_STATE/slurmd"
    chown slurm:slurm "$SLURM_RUN" "$SLURM_LOG" "$SLURM_STATE/slurmctld"
    # the DB password: kept from the existing slurmdbd.conf, else a new random one
    DBPASS=$(sed -n 's/^StoragePass=//p' "$SLURM_ETC/slurmdbd.conf" 2>/dev/null || true)
    [ -n "$DBPASS" ] || DBPASS=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
    SLURM_CONF_CHANGED=$(render "$HERE/slurm.conf.in" "$SLURM_ETC/slurm.conf" 644 root:root)
    DBD_CONF_CHANGED=$(render "$HERE/slurmdbd.conf.in" "$SLURM_ETC/slurmdbd.conf" 600 slurm:slurm)
    say "node: $NODE_LINE; partition debug (default)"
}

# restart_if_changed <daemon> <changed>: stop a running daemon whose config changed
restart_if_changed() {
    local pid
    if [ -n "$2" ] && pid=$(live_pid "$1"); then
        say "$1: config changed, restarting"
        kill -TERM "$pid"
        wait_for 20 "$1 to stop" test ! -d "/proc/$pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    if live_pid munged >/dev/null; then say "munged: running"; return; fi
    mkdir -p "$MUNGE_RUN" && chown munge:munge "$MUNGE_RUN"
    runuser -u munge -- /usr/sbin/munged
    wait_for 20 munged sh -c 'munge -n | unmunge' || die "munged did not start (see /var/log/munge/munged.log)"
    say "munged: started"
}

start_mariadb() {
    if ! live_pid mariadbd >/dev/null; then
        if [ ! -d /var/lib/mysql/mysql ]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        fi
        mkdir -p "$MYSQL_RUN" && chown mysql:mysql "$MYSQL_RUN"
        setsid mariadbd --user=mysql --datadir=/var/lib/mysql --pid-file="$MYSQL_RUN/mysqld.pid" \
            --socket="$MYSQL_RUN/mysqld.sock" --bind-address=127.0.0.1 \
            </dev/null >>"$SLURM_LOG/mariadb.log" 2>&1 &
        wait_for 60 mariadb mariadb-admin ping || die "MariaDB did not start (see $SLURM_LOG/mariadb.log)"
        say "mariadb: started"
    else
        say "mariadb: running"
    fi
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost';
                ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "could not create the slurm DB user"
}

start_slurmdbd() {
    restart_if_changed slurmdbd "$DBD_CONF_CHANGED"
    if live_pid slurmdbd >/dev/null; then say "slurmdbd: running"; else
        slurmdbd
        wait_for 60 slurmdbd sacctmgr -n show cluster || die "slurmdbd did not answer (see $SLURM_LOG/slurmdbd.log)"
        say "slurmdbd: started"
    fi
    if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    restart_if_changed slurmctld "$SLURM_CONF_CHANGED"
    if live_pid slurmctld >/dev/null; then say "slurmctld: running"; return; fi
    slurmctld
    wait_for 60 slurmctld scontrol ping || die "slurmctld did not answer (see $SLURM_LOG/slurmctld.log)"
    say "slurmctld: started"
}

start_slurmd() {
    restart_if_changed slurmd "$SLURM_CONF_CHANGED"
    if live_pid slurmd >/dev/null; then say "slurmd: running"; else
        slurmd
        say "slurmd: started"
    fi
    node_ready() { sinfo -h -n "$HOST" -o %T | grep -Eqx 'idle|mixed|allocated|completing'; }
    if ! wait_for 60 "node $HOST" node_ready; then
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true  # drained by an earlier run
        wait_for 30 "node $HOST" node_ready \
            || die "node $HOST is $(sinfo -h -n "$HOST" -o '%T: %E') (see $SLURM_LOG/slurmd.log)"
    fi
}

install_packages
T1=$SECONDS
write_configs
start_munge
start_mariadb
start_slurmdbd
start_slurmctld
start_slurmd
say "up in $((SECONDS - T0)) s (daemons: $((SECONDS - T1)) s): $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %G %T')"
