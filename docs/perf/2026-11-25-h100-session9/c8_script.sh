export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R=$PWD
run() { local v=$1 name=$2; shift 2
  (cd /tmp && MEGAMOE_GROUPED_GEMM=$v PYTHONPATH=/tmp/site:$R timeout 170 python3 $R/bench/.s9run.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=30 \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$v-$name "$@" > /tmp/$v-$name.log 2>&1) || tail -3 /tmp/$v-$name.log
  cp /tmp/runs/$v-$name/metrics.jsonl $OUT/$v-$name.metrics.jsonl
  python3 - $OUT/$v-$name.metrics.jsonl $v-$name <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]}: loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}, median tok/s (steps 6+) "
      f"{statistics.median(r['tokens_per_sec'] for r in rs if r['step'] > 5):,.0f}, step ms {statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.1f}")
PY
}
fb() { local v=$1 tag=$2; shift 2; mkdir -p $OUT/fb-$tag-$v
  OUT=$OUT/fb-$tag-$v MEGAMOE_GROUPED_GEMM=$v PYTHONPATH=/tmp/site:$R timeout 170 python3 bench/bench_model.py --systems megamoe-compile "$@" > /tmp/fb-$tag-$v.log 2>&1; grep "median" /tmp/fb-$tag-$v.log | head -1 | sed "s/^/$tag $v /"; grep -E "Error" /tmp/fb-$tag-$v.log | tail -2; }
for v in triton torch; do fb $v olmoe --mb 2; done
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
run triton olmoe8 model.n_layers=8 data.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=2
run torch olmoe8 model.n_layers=8 data.seq_length=4096 train.micro_batch_size=2 train.global_batch_size=2
run triton small-moe $SMALL
run torch small-moe $SMALL
date -u
