#!/bin/bash
# Issue 9, target 4: a small MoE (d 512, 8 layers, 64 experts x 256, top-8, seq 1024, micro-batch 32,
# compiled) against its dense twin of equal active parameters (one SwiGLU FFN of width 8 x 256), full
# trainer steps, then each one's phases. Logs in $OUT.   usage: bash bench/small_device.sh
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for variant in moe dense; do
    extra="$SMALL"; [ $variant = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
    TAG=small-$variant- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=${STEPS:-30} bash bench/train_device.sh 8
    rm -rf runs/phases-small-$variant
    python3 bench/bench_train_step.py --name small-$variant --steps 12 -- model.n_layers=8 train.compile=true \
        parallel.zero_stage=0 data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model \
        train.precision=bf16 train.device=cuda train.log_interval=1 train.eval_interval=100000 \
        train.save_interval=100000 optim.warmup_steps=5 run.tensorboard=false run.dir=runs/phases-small-$variant \
        $extra 2>$OUT/phases-small-$variant.err | tee -a $OUT/phases-small.jsonl
done
