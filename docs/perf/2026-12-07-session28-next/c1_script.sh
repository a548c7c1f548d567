# session 28's plan for the next H100 call (carry .whl .devdata; written without a machine, not yet run).
# 1. The trainer's profiler on a GPU (train.profile_steps, new in session 28, tested on CPU only): 8 OLMoE layers,
#    compiled, bf16, 12 steps, steps 9-10 profiled; the trace, the table's head and max_memory_gib come back.
# 2. bf16 forward+backward with inductor's row reductions up to 2,048 persistent against its own heuristics
#    (megamoe.model.compile.PERSISTENT_ROWS; FP8 lost 0.4-0.5% with it in session 27's c5, bf16 never timed).
# 3. Document masking (model.attention_mask=document, new in session 28, CPU-tested only) through the trainer,
#    8 layers compiled, against step 1's causal run above: does it run, at what tokens/s and memory.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=$OUT/prof TAG=s28- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 EXTRA="train.profile_steps=[9,10]" \
    timeout $((${LIMIT:-300} - SECONDS)) bash bench/train_device.sh 8 2>&1 | grep -v "^name"
ls -la runs/s28-L8-compile/profile/steps9-10/ && head -25 runs/s28-L8-compile/profile/steps9-10/rank0.txt | cut -c1-200
cp runs/s28-L8-compile/profile/steps9-10/rank0.txt $OUT/prof/ 2>/dev/null
gzip -c runs/s28-L8-compile/profile/steps9-10/rank0.trace.json > $OUT/prof/rank0.trace.json.gz 2>/dev/null
python3 -c "import json; rs=[json.loads(l) for l in open('runs/s28-L8-compile/metrics.jsonl')]; print([(r['step'], round(r['tokens_per_sec']), round(r.get('max_memory_gib', -1), 1)) for r in rs])"
date -u; cd bench
left=$((570 - SECONDS)); [ $left -ge 200 ] && timeout $left python3 bench_ab.py megamoe.model.compile.PERSISTENT_ROWS=0,2048 \
    torch._inductor.config.fx_graph_cache=False,False --rounds 2 --back-to-back > $OUT/ab_rows_bf16.log 2>&1
grep -E "medians|rror" $OUT/ab_rows_bf16.log 2>/dev/null | tail -4; date -u; cd ..
left=$((590 - SECONDS)); [ $left -ge 90 ] && OUT=$OUT/docmask TAG=s28-doc- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 \
    EXTRA="model.attention_mask=document" timeout $left bash bench/train_device.sh 8 2>&1 | grep -v "^name"
date -u; rm -rf runs
