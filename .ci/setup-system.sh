#!/usr/bin/env bash
# System packages the launch tests need: Open MPI (mpirun for mpi4py), Slurm and munge (the
# local cluster of slurm/local_cluster.sh). Idempotent: installs only what is missing.
# Then: slurm/local_cluster.sh start
set -euo pipefail

packages=(openmpi-bin libopenmpi-dev slurm-wlm munge)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { echo "setup-system.sh: run as root to install ${missing[*]}" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
echo "setup-system.sh: $(mpirun --version | head -n1); $(sinfo --version)"

# DeepSpeed compiles its CPU shared-memory collective op the first time a process group is
# created on a CPU host (about 90 s on 2 cores, cached in ~/.cache/torch_extensions). Build
# it here so that no test pays for it; skipped until deepspeed is installed.
if ! command -v nvidia-smi >/dev/null && python -c "import deepspeed" 2>/dev/null; then
    DS_ACCELERATOR=cpu python -c "
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder('ShareMemCommBuilder').load()" 2>/dev/null
    echo "setup-system.sh: DeepSpeed's CPU shared-memory op is built"
fi
