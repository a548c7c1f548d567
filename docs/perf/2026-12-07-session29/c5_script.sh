# session 29, call 5 (an H100, carry .whl .devdata): the small MoE and its dense twin (session 20's small settings,
# 30 steps, compiled), steps 26-27 profiled: the profile's header now also times step 25 unprofiled (its phases
# without the profiler's host overhead, which c4 showed stretching these small steps).
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32 train.profile_steps=[26,27]"
for v in moe dense; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  OUT=$OUT/$v TAG=s29-small-$v- EXTRA="$extra" timeout $((${LIMIT:-200} - SECONDS)) bash bench/train_device.sh 8 2>&1 | grep -v "^name"
  head -10 runs/s29-small-$v-L8-compile/profile/steps26-27/rank0.txt; cp runs/s29-small-$v-L8-compile/profile/steps26-27/rank0.txt $OUT/$v/
  rm -f $OUT/$v/device.txt; date -u
done; rm -rf runs
