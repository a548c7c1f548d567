#!/usr/bin/env bash
# Submit N jobs that train one run in turn, each resuming from the previous one's checkpoint:
#
#   slurm/chain.sh 4 slurm/train.sbatch --time=04:00:00 -- --config configs/olmoe-1b-7b.yaml run.dir=runs/big
#
# Options before `--` go to sbatch, the rest to python -m megamoe.train. Each job waits for the
# one before it with --dependency=afterany (it starts after a time-out or failure too, and a
# finished run makes the rest end at once). MEGAMOE_DRY_RUN=1 prints the sbatch commands.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launchers/common.sh"

(($# >= 2)) || die "usage: $0 N SBATCH_SCRIPT [sbatch options] -- [train arguments]"
count=$1 script=$2
shift 2
[[ $count =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of jobs, got '$count'"
[[ -f $script ]] || die "sbatch script '$script' not found (slurm/train.sbatch, slurm/train-multinode.sbatch)"
split_args "$@"

previous=""
for ((i = 1; i <= count; i++)); do
    cmd=(sbatch --parsable ${previous:+--dependency=afterany:$previous} "${LAUNCH_ARGS[@]}"
         "$script" "${TRAIN_ARGS[@]}")
    if [[ ${MEGAMOE_DRY_RUN:-0} == 1 ]]; then
        echo "$(printf '%q ' "${cmd[@]}")"
        previous="JOB$i"
    else
        previous=$("${cmd[@]}" | cut -d';' -f1)
        echo "megamoe: job $i/$count: $previous"
    fi
done
