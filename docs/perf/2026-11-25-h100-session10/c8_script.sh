export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
COMMON="train.compile=true parallel.zero_stage=0 data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.log_interval=1 train.eval_interval=100000 train.save_interval=100000 optim.warmup_steps=5 run.tensorboard=false"
for v in moe dense; do
  extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  rm -rf runs/p-$v; timeout 150 python3 bench/bench_train_step.py --name small-$v --profile --steps 8 -- $COMMON run.dir=runs/p-$v $extra 2>$OUT/p-$v.err | tail -1
  head -32 $OUT/kernels_small-$v.txt | cut -c1-60,100-200 | tail -28
done
rm -rf runs/h-moe; timeout 100 python3 bench/bench_train_step.py --name small-moe-host --host --steps 10 -- $COMMON run.dir=runs/h-moe $SMALL 2>$OUT/h-moe.err | tail -1
date -u
