"""The optimizer step alone on one GPU: megamoe's AdamW (bf16 weights, fp32 masters, fused
Triton pass) against torch's fused AdamW, with the memory-traffic bound they are judged by.

    python3 bench/bench_optimizer.py [--layers 2]

Parameters in OLMoE-1B-7B shapes (per layer: q/k/v/o 2048², experts 64 × 2048 × 2048 and
64 × 1024 × 2048, router, norms), random values and gradients. Prints one JSON line per variant
and a table. Checks first that the kernel computes the torch form's update (fp32 and bf16).
"""

import argparse
import json
import math
from functools import partial

import torch

from megamoe.train import fused_adamw
from megamoe.train.optimizer import AdamW

LAYER = [(2048, 2048)] * 4 + [(64, 2048, 2048), (64, 1024, 2048), (64, 2048), (2048,), (2048,), (2048,), (2048,)]
ONE_RANK = type("One", (), {"tp": 1, "ep": 1, "pp": 1})()


def check_kernel() -> dict:
    """Relative error of the kernel's update against the torch form on the same GPU inputs."""
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        n = 3_000_017  # not a multiple of the block
        w = torch.randn(n, device="cuda")
        runs = []
        for force_torch in (False, True):
            p = w.to(dtype).clone()
            master = w.clone() if dtype != torch.float32 else None
            m, v = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
            for step in range(1, 4):
                g = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(step)).to(dtype)
                saved, fused_adamw.triton = fused_adamw.triton, (None if force_torch else fused_adamw.triton)
                try:
                    fused_adamw.adamw_step(p, g, master, m, v, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                           weight_decay=0.1, step=step, grad_scale=0.7)
                finally:
                    fused_adamw.triton = saved
            runs.append((p.float(), (master if master is not None else p).clone(), m, v))
        (p1, w1, m1, v1), (p2, w2, m2, v2) = runs
        rel = lambda a, b: float((a - b).norm() / b.norm())
        errors[str(dtype)] = {"master": rel(w1, w2), "exp_avg": rel(m1, m2), "exp_avg_sq": rel(v1, v2),
                              "weight": rel(p1, p2)}
        # fp32 state to rounding; the bf16 weight to one bf16 rounding step where masters differ in
        # their last bits
        assert max(v for k, v in errors[str(dtype)].items() if k != "weight") < 1e-5, errors
        assert errors[str(dtype)]["weight"] < 1e-3, errors
    return errors


def timed(fn, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(numel: int) -> float:
    """HBM bandwidth as a large device-to-device copy achieves it (bytes read + written, per s)."""
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    return 2 * numel * 4 / (timed(lambda: dst.copy_(src)) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps({"kernel_vs_torch_form_rel_err": check_kernel()}), flush=True)

    shapes = LAYER * args.layers
    n = sum(math.prod(s) for s in shapes)
    bw = copy_bandwidth(n // 2)
    rows = []

    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    opt = AdamW([{"params": params, "weight_decay": 0.1}], ONE_RANK, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                max_norm=1.0, master_weights=True)
    for p in params:
        p.data = p.data.bfloat16()
        p.grad = torch.randn_like(p) * 1e-3
    ms = timed(opt.step)
    rows.append(("megamoe AdamW: bf16 weights + fp32 masters (norm, clip, fused pass)", ms, 28))
    norm_ms = timed(partial(torch._foreach_norm, [p.grad for p in params], 2, dtype=torch.float32))
    rows.append(("  of which the gradient norm (multi-tensor)", norm_ms, 2))
    del opt, params

    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    torch_opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    rows.append(("torch AdamW(fused=True), fp32 weights and grads (no masters, no clip)",
                 timed(torch_opt.step), 28))
    del torch_opt, params

    print(f"{n / 1e9:.3f} B parameters; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'variant':<75} {'ms':>8} {'B/param':>8} {'TB/s':>6} {'ms per 3.56B':>13} {'x bound':>8}")
    for name, ms, bytes_per in rows:
        tbs = bytes_per * n / (ms / 1e3) / 1e12
        scaled = ms * 3.563e9 / n
        bound = 28 * 3.563e9 / bw * 1e3
        print(f"{name:<75} {ms:8.2f} {bytes_per:8d} {tbs:6.2f} {scaled:13.1f} {scaled / bound:8.2f}")
        print(json.dumps({"variant": name, "ms": ms, "params": n, "bytes_per_param": bytes_per,
                          "tb_per_s": tbs, "ms_per_3_56B": scaled, "x_adam_bound": scaled / bound}), flush=True)


if __name__ == "__main__":
    main()
