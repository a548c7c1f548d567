export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R=$PWD
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 200 python3 bench/bench_model.py --systems megamoe-compile --mb 2 > /tmp/fb.log 2>&1; grep "median" /tmp/fb.log | head -3; grep -E "Error" /tmp/fb.log | tail -2
run() { local name=$1; shift 1
  (cd /tmp && PYTHONPATH=/tmp/site:$R timeout ${TMO:-150} python3 $R/bench/.s11run.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=30 \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$name "$@" > /tmp/$name.log 2>&1) || tail -3 /tmp/$name.log
  cp /tmp/runs/$name/metrics.jsonl $OUT/$name.metrics.jsonl
  w=$(grep -E "WALL|SYNC" /tmp/$name.log | tr "\n" " ")
  python3 - $OUT/$name.metrics.jsonl $name "$w" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]}: loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}, median tok/s (steps 6+) "
      f"{statistics.median(r['tokens_per_sec'] for r in rs if r['step'] > 5):,.0f}, step ms {statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.1f} | {sys.argv[3]}")
PY
}
TMO=170 run olmoe8 model.n_layers=8 data.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=2
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
COMMON="train.compile=true parallel.zero_stage=0 data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.log_interval=1 train.eval_interval=100000 train.save_interval=100000 optim.warmup_steps=5 run.tensorboard=false"
for v in moe dense; do
  extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  rm -rf runs/p-$v; timeout 150 python3 bench/bench_train_step.py --name small-$v --profile --steps 8 -- $COMMON run.dir=runs/p-$v $extra 2>/tmp/p-$v.err | tail -1
  head -3 $OUT/gaps_small-$v.txt
done
date -u
