export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_step_stats.py 2>&1 | tail -2
R=$PWD
run() { local ov=$1 name=$2; shift 2
  nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader | sed "s/^/  gpu before $ov-$name: /"
  (cd /tmp && SYNC_DEBUG=${SYNC_DEBUG:-} PYTHONPATH=/tmp/site:$R timeout ${TMO:-150} python3 $R/bench/.s10run.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=30 \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$ov-$name train.overlap_read=$ov "$@" > /tmp/$ov-$name.log 2>&1) || tail -3 /tmp/$ov-$name.log
  cp /tmp/runs/$ov-$name/metrics.jsonl $OUT/$ov-$name.metrics.jsonl
  w=$(grep -E "WALL|SYNC" /tmp/$ov-$name.log | tr "\n" " ")
  python3 - $OUT/$ov-$name.metrics.jsonl overlap=$ov-$name "$w" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]}: loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}, median tok/s (steps 6+) "
      f"{statistics.median(r['tokens_per_sec'] for r in rs if r['step'] > 5):,.0f}, step ms {statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.1f} | {sys.argv[3]}")
PY
}
OL="model.n_layers=8 data.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=2"
TMO=170 run true olmoe8-1 $OL; TMO=120 run false olmoe8-1 $OL; TMO=120 run true olmoe8-2 $OL; TMO=120 run false olmoe8-2 $OL
date -u
