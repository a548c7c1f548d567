# session 14, call 1 (H100): the CUDA tests of this session's kernels (a kernel whose test fails is switched
# off for the rest of the call); then this session's changes together (the row-grouped products' half tail
# tiles, the counting sort, the residual added in the token sum, the loss backward's one-pass scaling)
# against all four off, alternated in one process (forward+backward, 16 layers, mb 2, compiled), both
# profiled; then the trainer's full step at 8 layers (target 1)
export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
mkdir -p /tmp/ab; : > /tmp/ab/sitecustomize.py; export PYTHONPATH=/tmp/ab:/tmp/site:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SW=""
check() {  # $1 = switch, $2.. = pytest selection
  local sw=$1; shift
  if timeout 90 python3 -m pytest -q -p no:cacheprovider "$@" > $OUT/test_${sw##*.}.log 2>&1; then SW="$SW $sw=True,False"
  else printf 'import %s\n%s = False\n' "${sw%.*}" "$sw" >> /tmp/ab/sitecustomize.py; fi
  echo "$sw: $(tail -1 $OUT/test_${sw##*.}.log)"; }
check megamoe.moe.fused_sort.ENABLED tests/test_kernels.py -k "counting_sort"
check megamoe.model.olmoe.FUSED_RESIDUAL tests/test_kernels.py -k "residual or permutation"
check megamoe.train.fused_cross_entropy.FUSED_SCALE tests/test_loss.py
check megamoe.moe.grouped_gemm.ROWS_HALF_TAILS tests/test_grouped_gemm.py
cat /tmp/ab/sitecustomize.py; echo "A/B of:$SW"; date -u
(cd bench && timeout 240 python3 bench_ab.py $SW --rounds 2 --profile-all) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "median|first step|largest|Error|error" $OUT/ab.log | head -30; date -u
TAG=s14c1- COMPILE_ONLY=1 SKIP_LAYER_BENCH=1 STEPS=20 timeout 100 bash bench/train_device.sh 8 2>&1 | grep -v "^name"; date -u
cd $OUT && tar czf c1_train_logs.tgz s14c1-* && rm -f s14c1-*; ls
