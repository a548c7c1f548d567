#!/usr/bin/env bash
# torchrun → python -m megamoe.train, one rank per GPU (or --nproc_per_node CPU ranks).
#
# One node:   launchers/torchrun.sh --nproc_per_node 2 -- --config configs/tiny-cpu.yaml
# Many nodes, the same command on every node (rank 0's host as the rendezvous endpoint):
#             launchers/torchrun.sh --nnodes 2 --nproc_per_node 8 \
#                 --rdzv_endpoint node0:29400 --rdzv_id job42 -- --config ...
# Options before `--` are torchrun's own. Defaults added: --nproc_per_node = GPU count (1
# on a CPU host), --standalone for one node, --rdzv_backend c10d for several. A preempted
# run exits with EXIT_REQUEUE (75), which torchrun would turn into 1; this script keeps it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
split_args "$@"

nnodes=$(option_value --nnodes)
nnodes=${nnodes:-1}
if [[ -z $(option_value --nproc_per_node --nproc-per-node) ]]; then
    nproc=$(gpu_count)
    LAUNCH_ARGS+=(--nproc_per_node "$((nproc > 0 ? nproc : 1))")
fi
if [[ $nnodes == 1 ]]; then
    [[ -n $(option_value --rdzv_endpoint --rdzv-endpoint --master_addr --master-addr) ]] \
        || LAUNCH_ARGS+=(--standalone)
else
    [[ -n $(option_value --rdzv_endpoint --rdzv-endpoint) ]] \
        || die "--nnodes $nnodes needs --rdzv_endpoint HOST:PORT (a host of the job, the same on every node)"
    [[ -n $(option_value --rdzv_backend --rdzv-backend) ]] || LAUNCH_ARGS+=(--rdzv_backend c10d)
fi

# torch.distributed.run reports a failed worker as exit status 1; pass the worker's own
# status through instead, so that EXIT_REQUEUE reaches the job script.
exec "${PYTHON:-python}" -c '
import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    code = e.get_first_failure()[1].exitcode
    sys.exit(code if code > 0 else 128 - code)
' "${LAUNCH_ARGS[@]}" -m "${MEGAMOE_MODULE:-megamoe.train}" "${TRAIN_ARGS[@]}"
