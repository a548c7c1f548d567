#!/usr/bin/env bash
# A Slurm cluster on this machine, for tests and for trying the sbatch scripts: slurmctld and
# $MEGAMOE_SLURM_NODES (default 2) slurmd daemons, each a node (node1, node2, ...) with all of
# this host's CPUs at address 127.0.0.1, so that multi-node jobs run here too.
#
#   slurm/local_cluster.sh start    # write configs, start munged, slurmctld, slurmds; wait idle
#   slurm/local_cluster.sh status   # daemons and sinfo
#   slurm/local_cluster.sh running  # exit status 0 when slurmctld is up
#   slurm/local_cluster.sh stop     # stop the daemons started here (munged too, if it did)
#
# Needs root and Debian's slurm-wlm + munge (.ci/setup-system.sh installs them). Writes
# /etc/slurm/slurm.conf (refusing to replace one it did not write) and keeps state, logs and
# pid files in $MEGAMOE_SLURM_STATE (default /var/tmp/megamoe-slurm). No cgroups: processes
# are tracked with proctrack/linuxproc, so it also runs inside containers.
set -euo pipefail

STATE=${MEGAMOE_SLURM_STATE:-/var/tmp/megamoe-slurm}
NODES=${MEGAMOE_SLURM_NODES:-2}
CONF_DIR=/etc/slurm
MARK="# written by megamoe slurm/local_cluster.sh"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

require_tools() {
    [[ $(id -u) == 0 ]] || die "run as root (it writes /etc/slurm and starts daemons)"
    for tool in slurmctld slurmd munged sinfo scontrol; do
        command -v "$tool" >/dev/null \
            || die "$tool not found; install Slurm and munge first: .ci/setup-system.sh"
    done
}

node_names() { seq -f "node%g" "$NODES"; }

pid_files() {  # one per daemon this script starts
    echo "$STATE/slurmctld.pid"
    for name in $(node_names); do echo "$STATE/slurmd-$name.pid"; done
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_configs() {
    mkdir -p "$CONF_DIR" "$STATE"/{ctld,log}
    if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script; refusing to replace it"
    fi
    local host hardware name
    host=$(hostname -s)
    # slurmd -C prints "NodeName=<host> CPUs=... RealMemory=..."; every node gets that hardware.
    hardware=$(slurmd -C | head -n1 | cut -d' ' -f2-)
    {
        cat <<EOF
$MARK
ClusterName=megamoe-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
        # Several slurmd on one host: each node its own name and port; NodeHostname is this host.
        for name in $(node_names); do
            echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((17000 + ${name#node}))" \
                "$hardware State=UNKNOWN"
        done
    } >"$CONF_DIR/slurm.conf"
    cat >"$CONF_DIR/cgroup.conf" <<EOF
$MARK
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
EOF
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    local started=
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        started=1
    fi
    munge -n | unmunge >/dev/null || die "munged is not answering; see /var/log/munge/munged.log"
    if [[ $started ]]; then cp /run/munge/munged.pid "$STATE/munged.pid"; fi  # for stop
}

start() {
    require_tools
    write_configs
    start_munge
    running "$STATE/slurmctld.pid" || slurmctld
    for name in $(node_names); do
        mkdir -p "$STATE/spool-$name"
        running "$STATE/slurmd-$name.pid" || slurmd -N "$name"
    done
    for _ in $(seq 60); do
        if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) == "$NODES" ]]; then
            sinfo
            return 0
        fi
        # Nodes left down by an earlier run come back once told to.
        scontrol update nodename="$(node_names | paste -sd,)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    die "the nodes did not become idle in 60 s; see $STATE/log/slurmctld.log and slurmd-*.log"
}

stop() {  # the Slurm daemons, then munged if start started it; waits until they are gone
    local pid_file pids=()
    for pid_file in $(pid_files) "$STATE/munged.pid"; do
        if running "$pid_file"; then pids+=("$(cat "$pid_file")"); kill "${pids[-1]}"; fi
    done
    for _ in $(seq 30); do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 1
    done
    die "daemons ${pids[*]} did not stop in 30 s"
}

status() {
    local pid_file
    for pid_file in $(pid_files); do
        if running "$pid_file"; then echo "$(basename "$pid_file" .pid): running"
        else echo "$(basename "$pid_file" .pid): stopped"; fi
    done
    sinfo
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    running) running "$STATE/slurmctld.pid" ;;
    *) die "usage: $0 start|stop|status|running" ;;
esac
