#!/usr/bin/env bash
# Open MPI's mpirun → python -m megamoe.train; ranks come from OMPI_COMM_WORLD_*, and rank
# 0's address reaches the others through mpi4py unless MASTER_ADDR/MASTER_PORT are set.
#
# One node:   launchers/mpirun.sh -np 8 -- --config configs/olmoe-1b-7b.yaml
# CPU ranks:  launchers/mpirun.sh -np 2 -- --config configs/tiny-cpu.yaml
# Many nodes: launchers/mpirun.sh -np 16 --hostfile hosts -- --config ...
# Options before `--` are mpirun's own. Added here: --allow-run-as-root when root,
# --bind-to none (torch runs its own threads), and -x for the variables ranks on other
# nodes need (PATH, PYTHONPATH, LD_LIBRARY_PATH, MASTER_*, NCCL_*, OMP_NUM_THREADS).
# MPICH / Intel MPI: run `mpiexec -n N python -m megamoe.train ...` directly (PMI_RANK).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
split_args "$@"

require_hostfile --hostfile -hostfile --machinefile -machinefile >/dev/null
if [[ -z $(option_value -np -n --np -c) ]]; then
    nproc=$(gpu_count)
    LAUNCH_ARGS+=(-np "$((nproc > 0 ? nproc : 1))")
fi
[[ $(id -u) != 0 ]] || LAUNCH_ARGS+=(--allow-run-as-root)
LAUNCH_ARGS+=(--bind-to none)
for var in $(compgen -e); do
    case $var in
        PATH | PYTHONPATH | LD_LIBRARY_PATH | MASTER_ADDR | MASTER_PORT | OMP_NUM_THREADS | NCCL_* | GLOO_*)
            LAUNCH_ARGS+=(-x "$var") ;;
    esac
done

exec mpirun "${LAUNCH_ARGS[@]}" "${PYTHON:-python}" -m "${MEGAMOE_MODULE:-megamoe.train}" \
    "${TRAIN_ARGS[@]}"
