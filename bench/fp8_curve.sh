#!/bin/bash
# Issue 9, target 2: the loss curves of FP8 against bf16 over a few hundred steps of a small OLMoE (d 512,
# 8 layers, 64 experts x 256, top-8, seq 1024, micro-batch 32, compiled), same data and seed: the arms
# `fp8` (moe.expert_precision=fp8) and, with ATTENTION=1, `fp8-attention` (the experts and attention's
# projections, model.attention_precision=fp8); prints each curve in windows of 25 steps against bf16's
# and its largest gap.
#   usage: STEPS=300 [ATTENTION=1] bash bench/fp8_curve.sh      (logs in $OUT)
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 \
train.global_batch_size=32 optim.warmup_steps=50 optim.lr=1e-3"
declare -A ARM=([model]="moe.expert_precision=model" [fp8]="moe.expert_precision=fp8"
                [fp8-attention]="moe.expert_precision=fp8 model.attention_precision=fp8")
ARMS="model fp8"; [ "${ATTENTION:-0}" = 1 ] && ARMS="$ARMS fp8-attention"
for p in $ARMS; do
    TAG=curve-$p- EXTRA="$SMALL ${ARM[$p]}" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=${STEPS:-300} \
        bash bench/train_device.sh 8
done
OTHERS=$(for p in $ARMS; do [ $p != model ] && echo $OUT/curve-$p-L8-compile.metrics.jsonl; done)
python3 - $OUT/curve-model-L8-compile.metrics.jsonl $OTHERS <<'PY'
import json, os, sys
a = [json.loads(l) for l in open(sys.argv[1])]
for path in sys.argv[2:]:
    if not os.path.exists(path):
        print(f"{path}: missing"); continue
    b = [json.loads(l) for l in open(path)]
    name = os.path.basename(path).split("-L8")[0].removeprefix("curve-")
    print(f"\n{'steps':>9} {'bf16 loss':>10} {name + ' loss':>18} {'rel gap':>8}")
    gaps = []
    for s in range(0, min(len(a), len(b)), 25):
        la = sum(r["lm_loss"] for r in a[s:s + 25]) / len(a[s:s + 25])
        lb = sum(r["lm_loss"] for r in b[s:s + 25]) / len(b[s:s + 25])
        gaps.append((lb - la) / la)
        print(f"{s + 1:>4}-{s + 25:<4} {la:10.4f} {lb:18.4f} {gaps[-1]:8.4f}")
    print(json.dumps({"arm": name, "max_abs_rel_gap_25_step_windows": max(map(abs, gaps)),
                      "final_eval": [a[-1].get("eval_loss"), b[-1].get("eval_loss")]}))
PY
