# session 14, call 6 (H100, c5's machine): the final code's trainer step at 8 layers (target 1) and the small
# MoE against its dense twin (target 4); run as one command line (here split over lines)
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD; date -u
TAG=s14c6- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 90 bash bench/train_device.sh 8 2>&1 | grep -v "^name"
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe dense; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"; TAG=s14c6-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 50 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u; cd $OUT && tar czf c6_logs.tgz s14c6-* && rm -f s14c6-*
