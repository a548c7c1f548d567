# session 14, call 4 (H100, c1's machine): half tail tiles off and on with the other three changes on,
# alternated in one process; the counting sort's tile swept against the torch sort (one command line)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; date -u
(cd bench && timeout 170 python3 bench_ab.py megamoe.moe.grouped_gemm.ROWS_HALF_TAILS=False,True --rounds 2) > $OUT/ab.log 2>&1
# then, in the same command: for T, k, E in (8192, 8, 64), (32768, 8, 64): random expert ids, the torch form
# (argsort of the uint8 keys, the inverse by scatter, token_idx[order]) and fused_sort.sort_by_expert for each
# TILE block in (512, 1024, 2048, 4096) × (elements, warps) in ((8192, 4), (16384, 8), (16384, 4)), each checked
# equal to the torch form, timed by triton.testing.do_bench (the output is in c4_sort_sweep.txt)
