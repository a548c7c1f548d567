export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
R=$PWD
run() { local name=$1; shift 1
  (cd /tmp && TAG=$name SYNC_DEBUG=1 PYTHONPATH=/tmp/site:$R timeout 170 python3 $R/bench/.s10prof.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=30 \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.tensorboard=false run.dir=/tmp/runs/$name "$@" > /tmp/$name.log 2>&1) || tail -3 /tmp/$name.log
  echo "== $name"; grep -A60 "^WALL" /tmp/$name.log | head -70
  head -50 $OUT/${name}_cprofile.txt | tail -40
}
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
run small-moe $SMALL
run small-dense $SMALL moe.num_experts=0 moe.ffn_hidden=2048
date -u
