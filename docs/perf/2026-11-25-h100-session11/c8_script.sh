export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 100 python3 bench/bench_grouped_gemm.py --skew 1,4,8 --geometries small 2>&1 | tail -8
SMALL="model.n_layers=8 model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
COMMON="train.compile=true parallel.zero_stage=0 data.paths=[.devdata/corpus] data.tokenizer=.devdata/tokenizer.model train.precision=bf16 train.device=cuda train.log_interval=1 train.eval_interval=100000 train.save_interval=100000 optim.warmup_steps=5 run.tensorboard=false"
rm -rf runs/p-moe; timeout 150 python3 bench/bench_train_step.py --name small-moe --profile --steps 8 -- $COMMON run.dir=runs/p-moe $SMALL 2>/tmp/p-moe.err | tail -1
head -1 $OUT/gaps_small-moe.txt; grep -E "_weight_grad|_sum_pieces|_rows_mm" $OUT/gaps_small-moe.txt | head -4
date -u
