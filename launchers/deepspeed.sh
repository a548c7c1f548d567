#!/usr/bin/env bash
# The `deepspeed` launcher → python -m megamoe.train.
#
# One node:   launchers/deepspeed.sh --num_gpus 8 -- --config configs/olmoe-1b-7b.yaml
# CPU ranks:  launchers/deepspeed.sh --num_gpus 2 -- --config configs/tiny-cpu.yaml
# Many nodes: launchers/deepspeed.sh --hostfile hosts --num_nodes 2 -- --config ...
#             (run once, on the first host; it reaches the others over passwordless ssh)
# Options before `--` are the deepspeed launcher's own. Added here: --no_local_rank and
# --module (megamoe.train takes key=value overrides, not --local_rank), and on a host
# without GPUs DS_ACCELERATOR=cpu with --num_gpus 1 unless given or a hostfile sets the slots (DeepSpeed's CPU
# accelerator would otherwise start one rank per NUMA node), and --master_port $MASTER_PORT
# when that is set.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
split_args "$@"

hostfile=$(require_hostfile --hostfile -H)
num_nodes=$(option_value --num_nodes)
if [[ ${num_nodes:-1} -gt 1 && -z $hostfile ]]; then
    die "--num_nodes $num_nodes needs --hostfile FILE listing the nodes (see launchers/hostfile.example)"
fi
if [[ -n ${MASTER_PORT:-} && -z $(option_value --master_port) ]]; then
    LAUNCH_ARGS+=(--master_port "$MASTER_PORT")
fi
if ! has_gpu; then
    export DS_ACCELERATOR=cpu
    [[ -n $(option_value --num_gpus) || -n $hostfile ]] || LAUNCH_ARGS+=(--num_gpus 1)
fi

exec deepspeed "${LAUNCH_ARGS[@]}" --no_local_rank --module \
    "${MEGAMOE_MODULE:-megamoe.train}" "${TRAIN_ARGS[@]}"
