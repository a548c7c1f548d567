#!/bin/bash
# Full training steps (optimizer included) through the trainer on one GPU, eager and with
# train.compile, plus the MoE-layer comparison with moe.backend=deepspeed. Logs land in $OUT.
# usage: bash bench/train_device.sh [n_layers to try, largest first (default "8 6")]
#        SKIP_LAYER_BENCH=1 EAGER_ONLY=1 STEPS=10 bash bench/train_device.sh "10 9"   (sizing only)
#        COMPILE_ONLY=1: the compiled run only; EXTRA="key=value ...": more trainer overrides (they win);
#        TAG=name-: prefix of the run names (runs/ and $OUT); PATCH="python statements": run before the trainer
#        (A/B of a module switch, e.g. PATCH="import megamoe.moe.experts as X; X.IN_PLACE_MAX_FFN = 0")
# Data: an indexed dataset + tokenizer in .devdata/ (data.paths); checkpoint writing is
# switched off (Trainer.save) so a 3B-parameter run does not write ~45 GB at its last step.
export PYTHONUNBUFFERED=1 OUT=${OUT:-bench_out}
mkdir -p $OUT
if [ -z "${SKIP_LAYER_BENCH:-}" ]; then
python3 bench/bench_moe_layer.py --variants megamoe,megamoe-compile,deepspeed,deepspeed-cap1.25 \
    2>&1 | grep -v '^{' | tee $OUT/moe_layer_ds.log
fi
train() {  # $1 = n_layers, $2 = compile, $3 = run name (prefixed with $TAG; a fresh run each time)
    set -- "$1" "$2" "${TAG:-}$3"
    rm -rf runs/$3
    python3 -c "import sys, megamoe.train.loop as L; L.Trainer.save = lambda self: None
${PATCH:-}
from megamoe.train.__main__ import main; import torch; rc = main(sys.argv[1:])
import resource; print('peak GiB', torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0,
      'host peak GiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20); sys.exit(rc)" \
        model.n_layers=$1 train.compile=$2 moe.backend=megamoe parallel.zero_stage=0 \
        data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model data.seq_length=4096 \
        train.precision=bf16 train.device=cuda train.micro_batch_size=2 train.global_batch_size=2 \
        train.steps=${STEPS:-25} train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 \
        train.save_interval=100000 optim.warmup_steps=5 run.tensorboard=false run.dir=runs/$3 $EXTRA \
        > $OUT/$3.log 2>&1
    local rc=$?
    grep -E "Error|error|peak GiB" $OUT/$3.log | tail -3
    cp runs/$3/metrics.jsonl $OUT/$3.metrics.jsonl 2>/dev/null
    python3 - runs/$3/metrics.jsonl $3 $rc <<'PY'
import json, statistics, sys
try:
    rs = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    rs = []
tps = [r["tokens_per_sec"] for r in rs if r["step"] > 5 and "tokens_per_sec" in r]
print(f"{sys.argv[2]}: rc {sys.argv[3]}, steps {len(rs)}, loss {rs[0]['loss']:.3f} -> {rs[-1]['loss']:.3f}, "
      f"median tok/s (steps 6+) {statistics.median(tps):,.0f}, median step ms "
      f"{statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.0f}" if tps else f"{sys.argv[2]}: rc {sys.argv[3]}, no steps")
PY
    return $rc
}
for L in ${1:-8 6}; do  # EAGER_ONLY=1: size the model without compiling (same peak memory)
    if [ -n "${EAGER_ONLY:-}" ]; then train $L false L${L}-eager && break; continue; fi
    if train $L true L${L}-compile; then
        [ -n "${COMPILE_ONLY:-}" ] || train $L false L${L}-eager
        break
    fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/device.txt
