# The body of slurm/train.sbatch and slurm/train-multinode.sbatch (sourced by them, with the
# job's arguments): one srun task per rank runs `python -m megamoe.train "$@"`, and a run
# that stops for preemption (exit EXIT_REQUEUE) is put back in the queue to resume.
#
# MEGAMOE_DRY_RUN=1 prints the environment and the srun command instead of running them;
# it also works outside Slurm: MEGAMOE_DRY_RUN=1 bash slurm/train.sbatch --config ...

EXIT_REQUEUE=75  # megamoe.train.signals.EXIT_REQUEUE

job_id=${SLURM_JOB_ID:-0}
nodelist=${SLURM_JOB_NODELIST:-$(hostname -s)}
# Rank 0 runs on the first node of the job; its address is the node's NodeAddr (the name
# unless slurm.conf gives another address).
if command -v scontrol >/dev/null; then
    first=$(scontrol show hostnames "$nodelist" | head -n1)
    MASTER_ADDR=$(scontrol show node "$first" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    MASTER_ADDR=${MASTER_ADDR:-$first}
else
    MASTER_ADDR=$nodelist
fi
export MASTER_ADDR
# Same rule as megamoe.distributed (SLURM_PORT_BASE + job id % SLURM_PORT_SPAN).
export MASTER_PORT=$((20000 + job_id % 20000))
# Cores per rank for torch's CPU threads, unless the user chose.
if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_ON_NODE:-} && -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
    cores=$((SLURM_CPUS_ON_NODE / SLURM_NTASKS_PER_NODE))
    export OMP_NUM_THREADS=$((cores > 0 ? cores : 1))
fi
# A failed peer ends the collective with an error instead of a hang (NCCL); gloo and NCCL
# use the interface named by MEGAMOE_IFNAME when the default one is wrong.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
if [[ -n ${MEGAMOE_IFNAME:-} ]]; then
    export NCCL_SOCKET_IFNAME=$MEGAMOE_IFNAME GLOO_SOCKET_IFNAME=$MEGAMOE_IFNAME
fi

# --gpu-bind=none: every rank sees all GPUs of its node and takes GPU LOCAL_RANK (as DeepSpeed
# does); a cluster default that binds one GPU per task would leave ranks 1.. without theirs.
check=(srun --label --gpu-bind=none "${PYTHON:-python}" -m megamoe.distributed --no-init)
train=(srun --label --gpu-bind=none --kill-on-bad-exit=0 "${PYTHON:-python}" -m megamoe.train "$@")

echo "megamoe: job $job_id (restart ${SLURM_RESTART_COUNT:-0}) on $nodelist;" \
    "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
if [[ ${MEGAMOE_DRY_RUN:-0} == 1 ]]; then
    echo "megamoe: dry run, would run:"
    echo "  $(printf '%q ' "${check[@]}")"
    echo "  $(printf '%q ' "${train[@]}")"
    exit 0
fi

# Slurm's SIGTERM (scancel, time limit, preemption) reaches this shell too: let the ranks
# checkpoint, then end without requeueing. USR1 (the --signal warning before the time limit,
# or `scancel --signal=USR1 JOB` by hand) reaches only the ranks: that path requeues.
terminated=0
trap 'terminated=1; echo "megamoe: job shell got SIGTERM; the ranks save and exit"' TERM
# Each rank prints where it landed; launch mistakes fail here, in a second.
"${check[@]}"
status=0
"${train[@]}" || status=$?
if [[ $status == "$EXIT_REQUEUE" && $terminated == 0 && -n ${SLURM_JOB_ID:-} ]]; then
    echo "megamoe: preempted, checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "megamoe: training exited with status $status"
exit "$status"
