export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
R=$PWD
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
run() { # $1 base|new  $2 name  $3.. overrides
  local pp=$R v=$1 name=$2; shift 2; [ $v = base ] && pp=$R/.base
  rm -rf /tmp/runs/$v-$name
  (cd /tmp && PYTHONPATH=/tmp/site:$pp timeout 200 python3 $R/bench/.s6run.py \
    train.compile=true moe.backend=megamoe parallel.zero_stage=0 data.paths=[$R/.devdata/corpus] \
    data.tokenizer=$R/.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.steps=${STEPS:-30} \
    train.log_interval=1 train.eval_interval=100000 train.eval_batches=1 train.save_interval=100000 \
    optim.warmup_steps=5 run.dir=/tmp/runs/$v-$name "$@" > $OUT/$v-$name.log 2>&1) || tail -3 $OUT/$v-$name.log
  grep WALL $OUT/$v-$name.log | sed "s|^|$v $name |"
}
for v in base new; do run $v moe-tb $SMALL run.tensorboard=true; run $v moe $SMALL run.tensorboard=false; done
for v in base new; do run $v dense $SMALL moe.num_experts=0 moe.ffn_hidden=2048 run.tensorboard=false; done
export PYTHONPATH=/tmp/site:$PWD
for v in moe dense; do
  e="$SMALL"; [ $v = dense ] && e="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  timeout 150 python3 bench/bench_train_step.py --name host-small-$v --steps 15 --host -- train.compile=true \
    parallel.zero_stage=0 data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model train.precision=bf16 \
    train.device=cuda train.log_interval=1 train.eval_interval=100000 train.save_interval=100000 optim.warmup_steps=5 \
    run.tensorboard=false run.dir=runs/h-$v $e 2>&1 | grep "^{\|Error"
done
