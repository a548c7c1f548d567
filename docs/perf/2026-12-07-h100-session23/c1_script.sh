# session 23, call 1 (carry .peers): target 2 with all three stacks in one call: megamoe's forward+backward
# (16 layers, mb 2, compiled, back to back as the peers time theirs), then torchtitan and OLMo-core with a
# deadline that leaves OLMo-core its time. LIMIT (s, default 585) bounds the whole.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=${LIMIT:-585}
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p $OUT/peers
timeout 200 python3 bench/bench_model.py --mb 2 --back-to-back --systems megamoe-compile > $OUT/megamoe.log 2>&1; echo "megamoe rc $?"
grep -E "tok/s|Error|error" $OUT/megamoe.log | tail -3; date -u
left=$((L - SECONDS)); echo "peers: $left s left"
OUT=$OUT/peers BENCH_DEADLINE_S=$((left - 25)) timeout $((left - 10)) bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile 2>&1 | grep -E "tok|Error|error" | tail -6; date -u
