# session 19, call 3: which expert product loses when it reads token rows in place through the row index
# (OLMoE's shapes: both in-place reads made the forward+backward 8.7% slower in c1), each config of the sweep
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
P="fwd w1,fwd w1 +gather,wgrad w1,wgrad w1 +gather,dgrad w2,dgrad w2 +gather,wgrad w2,wgrad w2 +gather"
OUT=$OUT timeout 440 python3 bench/bench_grouped_gemm.py --tma --geometries olmoe,small --only "$P" 2>&1 | tee $OUT/tma_gather.log | grep -vE "^    \("; date -u
