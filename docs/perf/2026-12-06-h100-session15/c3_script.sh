# session 15, call 3: e2fb2c3+ (PDL through apply_compile's inductor options) against PDL off, and with PDL on:
# inductor's coordinate-descent tuning of its own kernels, the mix-order reductions' split size autotuned,
# and that split size set to 64 rows (the heuristic picks 16 at 8,192 rows: 512 partial rows summed by
# aten::sum, 64 such sums a step); forward+backward, 16 layers, mb 2, compiled, alternated, two rounds
export PYTHONUNBUFFERED=1
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
C=torch._inductor.config
(cd bench && PYTHONPATH=$PWD/.. timeout 540 python3 bench_ab.py megamoe.model.compile.PDL=False,True,True,True,True \
  $C.coordinate_descent_tuning=False,False,True,False,False \
  $C.triton.mix_order_reduction_autotune_split_size=False,False,False,True,False \
  $C.triton.mix_order_reduction_split_size=null,null,null,null,64 --rounds 2) > $OUT/ab.log 2>&1; echo "ab rc $?"
grep -E "medians|first step|Error|error" $OUT/ab.log | head -24; date -u
