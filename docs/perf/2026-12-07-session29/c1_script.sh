# session 29, call 1 (kind nvidia-h200 as status offered it, carry .whl .devdata): target 3's H200 row, the full
# OLMoE-1B-7B (16 layers) through the trainer, compiled, bf16, micro-batch 2, 10 steps; then, 8 layers, 14 steps
# each: the trainer's profiler on a GPU for the first time (steps 11-12, causal attention), document masking with
# FlexAttention's BlockMask (the GPU default since this session), document masking with SDPA's boolean mask.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1
recs() { python3 -c "import json,sys; rs=[json.loads(l) for l in open(sys.argv[1])]; print([(r['step'], round(r['tokens_per_sec']), round(r.get('max_memory_gib', -1), 1)) for r in rs])" $1; }
OUT=$OUT/t3 TAG=s29-h200- STEPS=10 timeout $((300 - SECONDS)) bash bench/train_device.sh 16 2>&1 | grep -v "^name"; date -u
recs runs/s29-h200-L16-compile/metrics.jsonl; rm -rf runs/s29-h200-L16-compile
left=$((420 - SECONDS)); [ $left -ge 100 ] && OUT=$OUT/prof TAG=s29- STEPS=14 EXTRA="train.profile_steps=[11,12]" \
    timeout $left bash bench/train_device.sh 8 2>&1 | grep -v "^name"
ls -la runs/s29-L8-compile/profile/steps11-12/ && head -25 runs/s29-L8-compile/profile/steps11-12/rank0.txt | cut -c1-200
cp runs/s29-L8-compile/profile/steps11-12/rank0.txt $OUT/prof/ 2>/dev/null
gzip -c runs/s29-L8-compile/profile/steps11-12/rank0.trace.json > $OUT/prof/rank0.trace.json.gz 2>/dev/null
recs runs/s29-L8-compile/metrics.jsonl; date -u; rm -rf runs/s29-L8-compile
left=$((510 - SECONDS)); [ $left -ge 80 ] && OUT=$OUT/docmask TAG=s29-flex- STEPS=14 \
    EXTRA="model.attention_mask=document" timeout $left bash bench/train_device.sh 8 2>&1 | grep -v "^name"
date -u
left=$((595 - SECONDS)); [ $left -ge 80 ] && OUT=$OUT/docmask TAG=s29-sdpa- STEPS=14 EXTRA="model.attention_mask=document" \
    PATCH="import megamoe.model.attention as A; A.FLEX_DOCUMENTS = False" timeout $left bash bench/train_device.sh 8 2>&1 | grep -v "^name"
date -u; rm -rf runs
