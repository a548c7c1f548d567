# session 19, call 2 (carry .whl .devdata): where the experts' in-place reads turn from a gain into a loss (the
# small MoE with F 512 alternated four ways), the small MoE's full step against its dense twin with the in-place
# reads on (the default at F 256) and off, the 8-layer trainer (target 1) on this code; then inductor's
# autotuned GEMM templates against cuBLAS in the time left.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export PYTHONPATH=/tmp/site:$PWD
S=megamoe.moe.experts
mkdir -p $OUT/f512; (cd bench && OUT=$OUT/f512 timeout 110 python3 bench_ab.py $S.READ_TOKENS_IN_PLACE=False,True,False,True $S.READ_GRADIENT_IN_PLACE=False,False,True,True --rounds 2 --back-to-back --seq 1024 --mb 32 --set model.d_model=512 model.n_heads=8 model.n_layers=8 moe.ffn_hidden=512) > $OUT/ab_f512.log 2>&1; echo "f512 rc $?"
grep -E "medians|Error|error" $OUT/ab_f512.log; date -u
SMALL="model.d_model=512 model.n_heads=8 moe.ffn_hidden=256 data.seq_length=1024 train.micro_batch_size=32 train.global_batch_size=32"
OFF="import megamoe.moe.experts as X; X.IN_PLACE_MAX_FFN = 0"
for v in moe dense gathered moe2; do extra="$SMALL"; patch=""; [ $v = dense ] && extra="$SMALL moe.num_experts=0 moe.ffn_hidden=2048"; [ $v = gathered ] && patch="$OFF"
  TAG=s19c2-small-$v- EXTRA="$extra" PATCH="$patch" COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=30 timeout 55 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; done; date -u
TAG=s19c2- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 90 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
(cd $OUT && tar czf c2_logs.tgz s19c2-* && rm -f s19c2-*)
left=$((585 - SECONDS)); echo "autotune A/B: ${left} s left"
(cd bench && OUT=$OUT timeout $left python3 bench_ab.py torch._inductor.config.max_autotune_gemm=False,True --rounds 2 --back-to-back) > $OUT/ab_autotune.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab_autotune.log; date -u
