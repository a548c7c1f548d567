# session 29, call 4 (an H100, carry .whl .devdata): (1) document masking with the dataset's document numbers
# (since this call's commit) through the trainer, 8 OLMoE layers, compiled, 14 steps, steps 11-12 profiled (the
# profile's phase header on a GPU for the first time); (2) target 4's full steps, the small MoE against its dense
# twin (session 20's small settings, 30 steps), each with steps 25-26 profiled: where each step's time goes.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD COMPILE_ONLY=1 SKIP_LAYER_BENCH=1
OUT=$OUT/doc TAG=s29-doc- STEPS=14 EXTRA="model.attention_mask=document train.profile_steps=[11,12]" \
    timeout $((130 - SECONDS)) bash bench/train_device.sh 8 2>&1 | grep -v "^name"
head -9 runs/s29-doc-L8-compile/profile/steps11-12/rank0.txt; cp runs/s29-doc-L8-compile/profile/steps11-12/rank0.txt $OUT/doc/
date -u; rm -rf runs
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32 train.profile_steps=[25,26]"
for v in moe dense; do extra="$SMALL"; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"
  OUT=$OUT/$v TAG=s29-small-$v- STEPS=30 EXTRA="$extra" timeout $((330 - SECONDS)) bash bench/train_device.sh 8 2>&1 | grep -v "^name"
  head -9 runs/s29-small-$v-L8-compile/profile/steps25-26/rank0.txt; cp runs/s29-small-$v-L8-compile/profile/steps25-26/rank0.txt $OUT/$v/; date -u
done; rm -rf runs
