# session 17, call 1 (from session 16's next_c1_script.sh): the whole-tile stores (grouped_gemm.WHOLE_TILE_STORES)
# through the CUDA tests, then alternated in the model, back to back, in three arms: halves (as main), whole tiles
# where three load stages already run (k >= 2,048), and whole tiles with three stages for the short reductions too
# (ROWS_SHORT_STAGES=3). An arm faster than the halves in both rounds runs the rest of the call (switched in this
# call's copy only): target 2 with CUDA graphs, back to back, then the peers; the products alone last, in the time
# left. Carry .peers.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py -k "cuda and True-True" 2>&1 | tail -1
G=megamoe.moe.grouped_gemm
(cd bench && PYTHONPATH=$PWD/.. OUT=$OUT timeout 270 python3 bench_ab.py $G.WHOLE_TILE_STORES=False,True,True $G.ROWS_SHORT_STAGES=4,4,3 --rounds 2 --back-to-back) > $OUT/ab_whole.log 2>&1; echo "ab rc $?"
grep -E "medians|Error" $OUT/ab_whole.log; date -u
python3 - $OUT/ab_whole.log <<'PY'
import re, sys
arms = {k: [float(x) for x in v.split(", ")] for k, v in re.findall(r"=(\w+,\d): medians ([\d., ]+) ms", open(sys.argv[1]).read())}
base = arms.pop("False,4", None)
won = {k: v for k, v in arms.items() if base and len(v) == 2 and all(a < b for a, b in zip(v, base))}
if won:
    whole, stages = min(won, key=lambda k: sum(won[k])).split(",")
    path = "megamoe/moe/grouped_gemm.py"
    src = open(path).read().replace("\nWHOLE_TILE_STORES = False", "\nWHOLE_TILE_STORES = True")
    open(path, "w").write(src.replace("\nROWS_SHORT_STAGES = 4", f"\nROWS_SHORT_STAGES = {stages}"))
print("the rest of the call:", f"WHOLE_TILE_STORES={whole}, ROWS_SHORT_STAGES={stages}" if won else "the halves (as main)")
PY
grep -nE "^(WHOLE_TILE_STORES|ROWS_SHORT_STAGES) =" megamoe/moe/grouped_gemm.py
mkdir -p $OUT/fb; OUT=$OUT/fb timeout 120 python3 bench/bench_model.py --systems megamoe-compile-cudagraphs --mb 2 --iters 20 --back-to-back > $OUT/fb.log 2>&1; echo "fb rc $?"
grep -E "median|failed|Error" $OUT/fb.log | head -4; date -u
OUT=$OUT/peers BENCH_DEADLINE_S=150 timeout 165 bash .peers/run.sh --mbs 2 --runs torchtitan:sdpa_compile,olmo_core:v2_compile; date -u
left=$((575 - SECONDS)); echo "sweep: ${left} s left"
[ $left -gt 40 ] && OUT=$OUT timeout $left python3 bench/bench_grouped_gemm.py --tma --geometries olmoe --whole-tile-stores > $OUT/sweep_whole.log 2>&1; echo "sweep rc $?"
grep -E "fwd|dgrad|wgrad|all:" $OUT/sweep_whole.log | cut -c1-150; date -u
