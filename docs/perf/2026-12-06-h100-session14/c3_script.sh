# session 14, call 3 (H100, c1's machine): the row-grouped products at the model's recorded loads (c1's) with
# half tail tiles and without; the counting sort against the torch sort at OLMoE's and the small model's sizes
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
for v in True False; do timeout 60 python3 -c "import sys; sys.path.insert(0, 'bench'); import megamoe.moe.grouped_gemm as G; G.ROWS_HALF_TAILS = $v; sys.argv = ['bench_grouped_gemm.py', '--geometries', 'olmoe', '--loads', 'docs/perf/2026-12-06-h100-session14/c1_bench_ab.jsonl']; import runpy; runpy.run_path('bench/bench_grouped_gemm.py', run_name='__main__')" > $OUT/gg_$v.log 2>&1; echo "gg $v rc $?"; grep -E "ours" $OUT/gg_$v.log; done; date -u
timeout 60 python3 - <<'PY'
import torch, triton
from megamoe.moe import fused_sort, dispatch
for T, k, E in ((8192, 8, 64), (32768, 8, 64)):
    idx = torch.randint(0, E, (T * k,), device="cuda")
    load = torch.bincount(idx, minlength=E)
    token_idx = torch.arange(T, device="cuda").repeat_interleave(k)  # the router's, made before dispatch
    def ours():
        return fused_sort.sort_by_expert(idx, load, k)
    def torch_form():
        order = torch.argsort(dispatch.sort_keys(idx, E), stable=True)
        tok = token_idx[order]
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device="cuda"))
        return order, inv, tok
    a, b = ours(), torch_form()
    same = all(torch.equal(x, y) for x, y in zip(a, (b[0], b[1], b[2])))
    print(f"T={T} k={k} E={E}: counting sort {triton.testing.do_bench(ours) * 1e3:.1f} us, torch "
          f"{triton.testing.do_bench(torch_form) * 1e3:.1f} us, same {same}")
PY
date -u
