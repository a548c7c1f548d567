# session 16, call 4: the trainer at 8 layers (target 1) and the small MoE against its dense twin (target 4) on
# the code with the flat weight-gradient loop on (session 15's c2_script.sh, these lines as they were)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONPATH=/tmp/site:$PWD
TAG=s16c4- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 90 bash bench/train_device.sh 8 2>&1 | grep -v "^name"
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
for v in moe dense moe2; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"; TAG=s16c4-small-$v- EXTRA="$extra" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 50 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u; cd $OUT && tar czf c4_logs.tgz s16c4-* && rm -f s16c4-*
