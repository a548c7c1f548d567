#!/bin/bash
# Issue 9's measurements in one device call (logs in $OUT):
#   1. the optimizer step alone against its memory-traffic bound (bench/bench_optimizer.py);
#   2. the full trainer step, tokens/s from metrics.jsonl (bench/train_device.sh, no host syncs added);
#   3. where that step's time goes, phase by phase and kernel by kernel (bench/bench_train_step.py).
# usage: LAYERS=8 COMPILE="true" STEPS=20 bash bench/step_device.sh
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/device.txt
[ -n "${SKIP_OPT:-}" ] || python3 bench/bench_optimizer.py --layers 2 2>&1 | tee $OUT/optimizer.log
L=${LAYERS:-8}
for c in ${COMPILE:-true}; do
    SKIP_LAYER_BENCH=1 EAGER_ONLY=$([ $c = false ] && echo 1) COMPILE_ONLY=1 STEPS=${STEPS:-20} \
        bash bench/train_device.sh "$L"
    rm -rf runs/phases-$L-$c; [ -n "${SKIP_PHASES:-}" ] || python3 bench/bench_train_step.py --name L$L-$c --profile --steps 10 -- \
        model.n_layers=$L train.compile=$c parallel.zero_stage=0 data.paths=[.devdata/corpus] \
        data.tokenizer=.devdata/tokenizer.model data.seq_length=4096 train.precision=bf16 train.device=cuda \
        train.micro_batch_size=2 train.global_batch_size=2 train.log_interval=1 train.eval_interval=100000 \
        train.save_interval=100000 optim.warmup_steps=5 run.tensorboard=false run.dir=runs/phases-$L-$c $EXTRA \
        2>$OUT/phases-$L-$c.err | tee -a $OUT/phases.jsonl
    tail -3 $OUT/phases-$L-$c.err
done
