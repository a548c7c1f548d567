#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and for trying the sbatch scripts.
#
#   slurm/local_cluster.sh start    # write configs, start munged, slurmctld, slurmd; wait idle
#   slurm/local_cluster.sh status   # daemons and sinfo
#   slurm/local_cluster.sh stop     # stop the daemons started here
#
# Needs root and Debian's slurm-wlm + munge (.ci/setup-system.sh installs them). Writes
# /etc/slurm/slurm.conf (refusing to replace one it did not write) and keeps state, logs and
# pid files in $MEGAMOE_SLURM_STATE (default /var/tmp/megamoe-slurm). No cgroups: processes
# are tracked with proctrack/linuxproc, so it also runs inside containers.
set -euo pipefail

STATE=${MEGAMOE_SLURM_STATE:-/var/tmp/megamoe-slurm}
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

write_configs() {
    mkdir -p "$CONF_DIR" "$STATE"/{ctld,spool,log}
    if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script; refusing to replace it"
    fi
    local host node
    host=$(hostname -s)
    # slurmd -C prints this machine's NodeName=... CPUs=... RealMemory=... line.
    node=$(slurmd -C | head -n1)
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=megamoe-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
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
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
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
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    fi
    munge -n | unmunge >/dev/null || die "munged is not answering; see /var/log/munge/munged.log"
}

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    require_tools
    write_configs
    start_munge
    running "$STATE/slurmctld.pid" || slurmctld
    running "$STATE/slurmd.pid" || slurmd
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            sinfo
            return 0
        fi
        # A node left down by an earlier run comes back once told to.
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    die "the node did not become idle in 60 s; see $STATE/log/slurmctld.log and slurmd.log"
}

stop() {
    for daemon in slurmd slurmctld; do
        if running "$STATE/$daemon.pid"; then
            kill "$(cat "$STATE/$daemon.pid")"
        fi
    done
}

status() {
    for daemon in slurmctld slurmd; do
        if running "$STATE/$daemon.pid"; then echo "$daemon: running"; else echo "$daemon: stopped"; fi
    done
    sinfo
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
