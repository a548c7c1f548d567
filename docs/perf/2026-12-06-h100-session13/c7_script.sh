# session 13, call 7 (H100): the persistent kernels' config sweep on OLMoE's six products (random top-8
# loads) now that the row-grouped products store by TMA: does warp specialisation overlap the stores?
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 190 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe 2>&1 | grep -v "^{" | tee $OUT/tma_sweep.log | grep -E "best|all:"; date -u
