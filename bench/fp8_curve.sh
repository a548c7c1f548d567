#!/bin/bash
# Issue 9, target 2: the loss curve of moe.expert_precision=fp8 against bf16 over a few hundred steps
# of a small OLMoE (d 512, 8 layers, 64 experts x 256, top-8, seq 1024, micro-batch 32, compiled),
# same data and seed; prints both curves in windows of 25 steps and their largest gap.
#   usage: STEPS=300 bash bench/fp8_curve.sh      (logs in $OUT)
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 \
train.global_batch_size=32 optim.warmup_steps=50 optim.lr=1e-3"
for p in model fp8; do
    TAG=curve-$p- EXTRA="$SMALL moe.expert_precision=$p" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=${STEPS:-300} \
        bash bench/train_device.sh 8
done
python3 - $OUT/curve-model-L8-compile.metrics.jsonl $OUT/curve-fp8-L8-compile.metrics.jsonl <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
print(f"{'steps':>9} {'bf16 loss':>10} {'fp8 loss':>10} {'rel gap':>8}")
gaps = []
for s in range(0, min(len(a), len(b)), 25):
    la = sum(r["lm_loss"] for r in a[s:s + 25]) / len(a[s:s + 25])
    lb = sum(r["lm_loss"] for r in b[s:s + 25]) / len(b[s:s + 25])
    gaps.append((lb - la) / la)
    print(f"{s + 1:>4}-{s + 25:<4} {la:10.4f} {lb:10.4f} {gaps[-1]:8.4f}")
print(json.dumps({"max_abs_rel_gap_25_step_windows": max(map(abs, gaps)), "final_eval": [a[-1].get("eval_loss"), b[-1].get("eval_loss")]}))
PY
