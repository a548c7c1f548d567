# session 25, call 2 (carry .whl .devdata): FP8's loss curve against bf16 on this code (`STEPS=300 bash
# bench/fp8_curve.sh`: small OLMoE, 300 steps each, same data and seed), then the trainer's step with 8 micro-batches
# a step, 8 layers, compiled, bf16 and FP8 (session 24's c4) as time allows.
export PYTHONUNBUFFERED=1; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
OUT=$OUT/curve STEPS=300 timeout 330 bash bench/fp8_curve.sh 2>&1 | grep -v "^name" | tail -16; date -u
export SKIP_LAYER_BENCH=1 COMPILE_ONLY=1 STEPS=10
for arm in bf16 fp8; do
  left=$((585 - SECONDS)); [ $left -lt 120 ] && break
  case $arm in bf16) X="";; fp8) X="moe.expert_precision=fp8";; esac
  OUT=$OUT/$arm TAG=s25c2-$arm- EXTRA="train.global_batch_size=16 $X" timeout $left bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
done
rm -rf runs
