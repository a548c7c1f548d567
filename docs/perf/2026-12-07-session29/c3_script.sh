# session 29, call 3 (kind nvidia-h200, needs_h200: 6.92 B parameters need 103 GiB; carry .whl .devdata): target 3's
# H200 row, the full OLMoE-1B-7B (16 layers) through the trainer, compiled, bf16, micro-batch 2, 12 steps, steps
# 11-12 profiled (the phases' CUDA events on a GPU for the first time; median of steps 6+ is the row); then the same
# with FP8 experts and FP8 projections as time allows.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12
recs() { python3 -c "import json,sys; rs=[json.loads(l) for l in open(sys.argv[1])]; print([(r['step'], round(r['tokens_per_sec']), round(r.get('max_memory_gib', -1), 1)) for r in rs])" $1; }
OUT=$OUT/t3 TAG=s29-h200- EXTRA="train.profile_steps=[11,12]" timeout $((${LIMIT:-360} - SECONDS)) bash bench/train_device.sh 16 2>&1 | grep -v "^name"
date -u; recs runs/s29-h200-L16-compile/metrics.jsonl
head -8 runs/s29-h200-L16-compile/profile/steps11-12/rank0.txt; cp runs/s29-h200-L16-compile/profile/steps11-12/rank0.txt $OUT/t3/
rm -rf runs
left=$((${LIMIT:-500} - SECONDS)); [ $left -ge 150 ] && OUT=$OUT/t3 TAG=s29-h200-fp8- \
    EXTRA="moe.expert_precision=fp8 model.attention_precision=fp8" timeout $left bash bench/train_device.sh 16 2>&1 | grep -v "^name"
date -u; rm -rf runs
