# session 14, call 2 (H100, c1's machine, c1's code: half tail tiles on, the counting sort's first tile): the
# trainer step at 8 layers and the small MoE against its dense twin; run as one command line (split here)
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD; date -u
TAG=s14c2- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 100 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe-1 dense moe-2; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"; TAG=s14c2-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 55 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u; cd $OUT && tar czf c2_logs.tgz s14c2-* && rm -f s14c2-*; ls
