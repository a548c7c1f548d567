# session 22, call 1 (carry .peers .whl .devdata): one call for what session 21's two scripts held, ordered by
# what decides code (device starts were scarce): the model A/B of grouped_gemm.ROWS_TWO_PER_SM_MAX_K on the small
# MoE (0 / 512) and OLMoE (0 / 1024 / 2048), then target 3 on this code (H100: the 11-layer trainer run; H200:
# the full OLMoE-1B-7B through the trainer), then the peers; LIMIT (s, default 585) bounds the whole.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=${LIMIT:-585}
date -u; G=$(nvidia-smi --query-gpu=name --format=csv,noheader); nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
W=megamoe.moe.grouped_gemm.ROWS_TWO_PER_SM_MAX_K
mkdir -p $OUT/small $OUT/olmoe
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/small timeout 100 python3 bench_ab.py $W=0,512 --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=256) > $OUT/ab_small.log 2>&1; echo "small rc $?"
grep -E "medians|Error|error" $OUT/ab_small.log; date -u
left=$((L - SECONDS)); (cd bench && PYTHONPATH=$PWD/.. OUT=$OUT/olmoe timeout $((left < 200 ? left : 200)) python3 bench_ab.py $W=0,1024,2048 --rounds 2 --back-to-back) > $OUT/ab_olmoe.log 2>&1; echo "olmoe rc $?"
grep -E "medians|Error|error" $OUT/ab_olmoe.log; date -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
left=$((L - SECONDS)); echo "target 3: $left s left"
if [ $left -ge 150 ]; then
  if echo "$G" | grep -q H200; then n=16; else n=11; fi
  PYTHONPATH=/tmp/site:$PWD OUT=$OUT/t3 TAG=s22c1- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=12 timeout $((left < 330 ? left : 330)) bash bench/train_device.sh $n 2>&1 | grep -v "^name"; date -u
fi
left=$((L - SECONDS)); [ $left -ge 150 ] && OUT=$OUT/peers BENCH_DEADLINE_S=120 timeout 140 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile 2>&1 | grep -E "tok|Error|error" | tail -6; date -u
rm -rf runs
