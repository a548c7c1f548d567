export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe dense; do
  e="$SMALL"; [ $v = dense ] && e="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  timeout 150 python3 bench/bench_train_step.py --name small-$v --steps 10 --host --profile -- model.n_layers=8 train.compile=true \
    parallel.zero_stage=0 data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model train.precision=bf16 \
    train.device=cuda train.log_interval=1 train.eval_interval=100000 train.save_interval=100000 optim.warmup_steps=5 \
    run.tensorboard=false run.dir=runs/p-$v $e 2>/dev/null | grep "^{"
  head -14 $OUT/gaps_small-$v.txt
done
