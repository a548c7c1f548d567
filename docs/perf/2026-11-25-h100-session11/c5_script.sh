export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log --oneline -1 2>/dev/null
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py tests/test_experts.py -k "not triton_kernels_compute and not fused_swiglu_backward_kernel" 2>&1 | tail -3
OUT=$OUT timeout 150 python3 bench/bench_grouped_gemm.py --skew 1,2,4,8 --geometries small 2>&1 | tail -20
R=$PWD
run() { local cut=$1 name=$2; shift 2
  (cd /tmp && CUT=$cut PYTHONPATH=/tmp/site:$R timeout ${TMO:-150} python3 $R/bench/.s11run.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=30 \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$cut-$name "$@" > /tmp/$cut-$name.log 2>&1) || tail -3 /tmp/$cut-$name.log
  cp /tmp/runs/$cut-$name/metrics.jsonl $OUT/cut$cut-$name.metrics.jsonl
  w=$(grep -E "WALL|SYNC" /tmp/$cut-$name.log | tr "\n" " ")
  python3 - $OUT/cut$cut-$name.metrics.jsonl cut=$cut-$name "$w" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
lm = [v for r in rs if r['step'] > 5 for v in r.get('load_max_over_mean', [])]
print(f"{sys.argv[2]}: loss {rs[0]['loss']:.4f} -> {rs[-1]['loss']:.4f}, median tok/s (steps 6+) "
      f"{statistics.median(r['tokens_per_sec'] for r in rs if r['step'] > 5):,.0f}, step ms {statistics.median(r['step_time_ms'] for r in rs if r['step'] > 5):.1f}"
      + (f", load max/mean {min(lm):.1f}-{max(lm):.1f}" if lm else "") + f" | {sys.argv[3]}")
PY
}
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
run 1 small-moe-1 $SMALL; run 0 small-moe-1 $SMALL
run 1 small-dense-1 $SMALL moe.num_experts=0 moe.ffn_hidden=2048
run 1 small-moe-2 $SMALL; run 0 small-moe-2 $SMALL
date -u
