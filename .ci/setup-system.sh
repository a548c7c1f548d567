#!/usr/bin/env bash
# System packages the launch tests need: Open MPI (mpirun for mpi4py), Slurm and munge (the
# one-node cluster of slurm/local_cluster.sh). Idempotent: installs only what is missing.
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
