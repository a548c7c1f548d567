export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R=$PWD
run() { local ov=$1 name=$2; shift 2
  (cd /tmp && PYTHONPATH=/tmp/site:$R timeout ${TMO:-150} python3 $R/bench/.s10run.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=30 \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$ov-$name train.overlap_read=$ov "$@" > /tmp/$ov-$name.log 2>&1) || tail -3 /tmp/$ov-$name.log
  cp /tmp/runs/$ov-$name/metrics.jsonl $OUT/$ov-$name.metrics.jsonl
  w=$(grep WALL /tmp/$ov-$name.log)
  python3 - $OUT/$ov-$name.metrics.jsonl overlap=$ov-$name "$w" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]}: loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}, median tok/s (steps 6+) "
      f"{statistics.median(r['tokens_per_sec'] for r in rs if r['step'] > 5):,.0f}, step ms {statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.1f} | {sys.argv[3]}")
PY
}
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
run true small-moe-1 $SMALL; run false small-moe-1 $SMALL
run true small-dense-1 $SMALL moe.num_experts=0 moe.ffn_hidden=2048; run false small-dense-1 $SMALL moe.num_experts=0 moe.ffn_hidden=2048
run false small-moe-2 $SMALL; run true small-moe-2 $SMALL
date -u
