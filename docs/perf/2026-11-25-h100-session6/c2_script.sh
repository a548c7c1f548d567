export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
R=$PWD
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
OLMOE="model.n_layers=8 data.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=2"
run() { # $1 base|new  $2 name  $3.. overrides
  local pp=$R v=$1 name=$2; shift 2; [ $v = base ] && pp=$R/.base
  rm -rf /tmp/runs/$v-$name
  (cd /tmp && PYTHONPATH=/tmp/site:$pp timeout 200 python3 -c "import sys, megamoe.train.loop as L; L.Trainer.save = lambda self: None
import megamoe; assert megamoe.__file__.startswith('$pp/'), megamoe.__file__
from megamoe.train.__main__ import main; sys.exit(main(sys.argv[1:]))" \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=${STEPS:-30} \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$v-$name "$@" > $OUT/$v-$name.log 2>&1) || tail -3 $OUT/$v-$name.log
  cp /tmp/runs/$v-$name/metrics.jsonl $OUT/$v-$name.metrics.jsonl 2>/dev/null
  python3 - $OUT/$v-$name.metrics.jsonl $v-$name <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
tps = [r["tokens_per_sec"] for r in rs if r["step"] > 5]
print(f"{sys.argv[2]}: steps {len(rs)}, loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}, median tok/s (steps 6+) "
      f"{statistics.median(tps):,.0f}, median step ms {statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.1f}")
PY
}
for r in 1 2; do for v in base new; do run $v small-moe-r$r $SMALL; done; done
for v in new base; do run $v small-dense $SMALL moe.num_experts=0 moe.ffn_hidden=2048; done
for v in base new; do run $v olmoe8 $OLMOE; done
