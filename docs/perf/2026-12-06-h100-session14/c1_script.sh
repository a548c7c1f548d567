# session 14, call 1 (H100): the CUDA tests of this session's kernels (a kernel whose test fails is switched
# off for the rest of the call); then this session's changes together (the row-grouped products' half tail
# tiles, the counting sort, the residual added in the token sum, the loss backward's one-pass scaling)
# against all four off, alternated in one process (forward+backward, 16 layers, mb 2, compiled), the first
# profiled; then the peers (torchtitan 0.3.0, OLMo-core 3.0.0) in the same call (target 2)
export PYTHONUNBUFFERED=1
mkdir -p /tmp/ab; : > /tmp/ab/sitecustomize.py; export PYTHONPATH=/tmp/ab:$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SW=""
check() {  # $1 = switch, $2.. = pytest selection
  local sw=$1; shift
  if timeout 80 python3 -m pytest -q -p no:cacheprovider "$@" > $OUT/test_${sw##*.}.log 2>&1; then SW="$SW $sw=True,False"
  else printf 'import %s\n%s = False\n' "${sw%.*}" "$sw" >> /tmp/ab/sitecustomize.py; fi
  echo "$sw: $(tail -1 $OUT/test_${sw##*.}.log)"; }
check megamoe.moe.fused_sort.ENABLED tests/test_kernels.py -k "counting_sort"
check megamoe.model.olmoe.FUSED_RESIDUAL tests/test_kernels.py -k "residual or permutation"
check megamoe.train.fused_cross_entropy.FUSED_SCALE tests/test_loss.py -k "scale"
check megamoe.moe.grouped_gemm.ROWS_HALF_TAILS tests/test_grouped_gemm.py -k "cuda"
cat /tmp/ab/sitecustomize.py; echo "A/B of:$SW"; date -u
(cd bench && timeout 200 python3 bench_ab.py $SW --rounds 2 --profile) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "median|first step|largest|Error|error" $OUT/ab.log | head -30; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=190 timeout 210 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
