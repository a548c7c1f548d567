export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
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
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
SYNC_DEBUG=1 run true small-moe-bias $SMALL moe.bias_update_rate=0.001; run false small-moe-bias $SMALL moe.bias_update_rate=0.001
TAG=s10c6- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 timeout 300 bash bench/train_device.sh 11
date -u
