# for the next session, call 1 (no carry; not run in session 24): FP8 ≥ 70k needs ~2 ms more of the 119.3 ms step.
# The three quantizing passes alone, their (rows, warps) sweep (the combine's backward ran at ~75% of the HBM's
# rate in c3's profile); then inductor's multi-kernel reductions off / on alternated (session 23's next_c1_script.sh:
# bf16 and cached FP8, two rounds; session 24's c3 had one FP8 round: -1.2%).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 bench/bench_fp8_fused.py 2>&1 | tail -8; date -u
LIMIT=$((SECONDS + 430)) bash docs/perf/2026-12-07-h100-session23/next_c1_script.sh
