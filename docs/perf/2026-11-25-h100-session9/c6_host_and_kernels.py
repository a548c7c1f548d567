import time, torch, triton
from megamoe.moe import grouped_gemm as G
torch.manual_seed(0)
bf = dict(device="cuda", dtype=torch.bfloat16)
E, T, k, d, F = 64, 8192, 8, 2048, 1024
n = T * k
choice = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.flatten()
counts = torch.zeros(E, dtype=torch.int64, device="cuda").scatter_add_(0, choice, torch.ones_like(choice))
offs = torch.cumsum(counts, 0).to(torch.int32)
x, dy, h = torch.randn(n, d, **bf), torch.randn(n, d, **bf), torch.randn(n, F, **bf)
w1, w2 = torch.randn(E, d, 2 * F, **bf) / 45, torch.randn(E, F, d, **bf) / 32
cases = {
  "fwd w2 torch": lambda: torch._grouped_mm(h, w2, offs=offs),
  "fwd w2 pointer": lambda: G.launch_rows_mm(h, w2, offs),
  "fwd w2 op": lambda: torch.ops.megamoe.grouped_rows_mm(h, w2, offs, False),
  "dgrad w2 torch": lambda: torch._grouped_mm(dy, w2.transpose(1, 2), offs=offs),
  "dgrad w2 pointer": lambda: G.launch_rows_mm(dy, w2, offs, trans_b=True),
  "dgrad w1 torch": lambda: torch._grouped_mm(x, w1.transpose(1, 2), offs=offs),
  "dgrad w1 pointer": lambda: G.launch_rows_mm(x, w1, offs, trans_b=True),
  "wgrad w2 torch": lambda: torch._grouped_mm(h.t(), dy, offs=offs),
  "wgrad w2 ours": lambda: G.launch_weight_grad_mm(h, dy, offs),
}
ref = {"dgrad w1": cases["dgrad w1 torch"]().float(), "fwd w2": cases["fwd w2 torch"]().float(), "dgrad w2": cases["dgrad w2 torch"]().float(), "wgrad w2": cases["wgrad w2 torch"]().float()}
for name, fn in cases.items():
    out = fn().float(); r = ref[" ".join(name.split()[:2])]
    err = ((out - r).norm() / r.norm()).item()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(40): fn()
    host = (time.perf_counter() - t0) / 40 * 1e6
    torch.cuda.synchronize()
    print(f"{name:18s} {ms:.3f} ms  host {host:6.1f} us/call  err {err:.1e}", flush=True)
